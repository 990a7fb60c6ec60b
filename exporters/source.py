"""The read side of the image formats: a foreign disk image presented as a backup source.

Why: ``Archive.backup`` reads any object with ``name``, ``size`` and ``read(offset, length)``;
each format module maps virtual clusters to places in the file (``_locate``) and this base does
the rest the same way for all of them — bounds checks, coalescing adjacent clusters into one
``pread``, zero clusters, thread safety (``pread`` only; table caches are locked).

Sparse images cost their data, not their virtual size: ``data_extents`` walks the allocation
tables (``_data_clusters``: qcow2 L1/L2, VMDK grain directory/tables, VHDX BAT) and names the
virtual ranges that hold data, the interface ``archive.files.FileSource`` offers for a file's
holes, so ``Archive.backup`` never reads what the tables say is unallocated or zero. The walk
checks every entry it passes (the same checks as ``_locate``), so a damaged table is refused
before a backup stores anything. A second-level table (L2 table, grain table) used by two
entries of the first level is refused, so the walk costs at most the tables the file holds;
what it then reads is what the tables map, as for qemu.

Robustness rules every reader follows (images come from elsewhere and may be damaged or
hostile): every offset and count read from the file is checked before use, no allocation is
larger than the file itself or a fixed cap, decompression is bounded to one cluster, and every
failure is an ``ImageError`` (exit status 2) naming the file and the field at fault.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, Self

from lifeboat.exporters.base import ImageError, read_exact

ZERO = -1  # _locate: the cluster reads as zeros
SPECIAL = -2  # _locate: the cluster is produced by _special (compressed)


class ImageSource:
    """A disk image opened read-only; subclasses parse their headers in ``_parse``."""

    format: ClassVar[str] = ""
    size: int
    cluster_size: int

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageError(f"image {self.path}: cannot open ({e.strerror})") from None
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ImageError(f"image {self.path}: not a regular file or block device")
            self.file_size = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self.fd)
            raise
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- what subclasses provide --------------------------------------------------------
    def _parse(self) -> None:
        """Read and check the headers; set ``size`` and ``cluster_size``."""
        raise NotImplementedError

    def _locate(self, index: int) -> int:
        """Byte offset in the file of virtual cluster ``index``, or ``ZERO`` / ``SPECIAL``."""
        raise NotImplementedError

    def _special(self, index: int) -> bytes:
        """The ``cluster_size`` bytes of a cluster that ``_locate`` called ``SPECIAL``."""
        raise NotImplementedError

    def _data_clusters(self) -> Iterator[int]:
        """The indexes, ascending, of the clusters ``_locate`` does not call ``ZERO``, found by
        walking the allocation tables (never by visiting every cluster of the virtual size)."""
        raise NotImplementedError

    # -- helpers for subclasses ---------------------------------------------------------
    def fail(self, message: str) -> ImageError:
        """An ``ImageError`` about this file."""
        return ImageError(f"{self.format} image {self.name}: {message}")

    def pread(self, offset: int, length: int, what: str) -> bytes:
        """Exactly ``length`` bytes at ``offset`` of the file, or ``ImageError``."""
        return read_exact(self.fd, self.name, offset, length, what)

    # -- the source interface -----------------------------------------------------------
    def data_extents(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of the virtual ranges that may hold data; the rest reads as zeros.

        ``Archive.backup`` reads only these (as it skips a ``FileSource``'s holes), so an empty
        16 GiB image costs its tables, not 16 GiB of reads."""
        cs = self.cluster_size
        runs: list[tuple[int, int]] = []
        for idx in self._data_clusters():
            start = idx * cs
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + cs)
            else:
                runs.append((start, cs))
        if runs and runs[-1][0] + runs[-1][1] > self.size:
            runs[-1] = (runs[-1][0], self.size - runs[-1][0])
        return runs

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the virtual disk at ``offset``."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.fail(f"read of {length} bytes at {offset} is outside the virtual size {self.size}")
        cs = self.cluster_size
        parts: list[bytes] = []
        pos, end = offset, offset + length
        run_host = run_len = 0  # a pending run of file bytes, contiguous in the file
        while pos < end:
            idx, inner = divmod(pos, cs)
            take = min(cs - inner, end - pos)
            loc = self._locate(idx)
            if loc >= 0:
                host = loc + inner
                if run_len and run_host + run_len == host:
                    run_len += take
                else:
                    if run_len:
                        parts.append(self._read_data(run_host, run_len))
                    run_host, run_len = host, take
            else:
                if run_len:
                    parts.append(self._read_data(run_host, run_len))
                    run_len = 0
                if loc == ZERO:
                    parts.append(bytes(take))
                else:
                    data = self._special(idx)
                    parts.append(data[inner : inner + take])
            pos += take
        if run_len:
            parts.append(self._read_data(run_host, run_len))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_data(self, host: int, length: int) -> bytes:
        """Data clusters; the part past the end of the file reads as zeros (as qemu does), but
        a run that starts past the end is an error."""
        if host >= self.file_size or host + length >= 2**63:
            raise self.fail(f"data at file offset {host} lies beyond the end of the file ({self.file_size} bytes)")
        try:
            data = os.pread(self.fd, length, host)
        except OSError as e:
            raise self.fail(f"read error at file offset {host} ({e.strerror})") from None
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class TableCache:
    """A small, locked LRU of parsed metadata tables (L2 tables, grain tables)."""

    def __init__(self, load: Callable[[int], tuple[int, ...]], capacity: int = 256) -> None:
        self._load = load
        self._capacity = capacity
        self._data: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int) -> tuple[int, ...]:
        """The table stored at file offset ``key``, loaded on first use."""
        with self._lock:
            table = self._data.get(key)
            if table is not None:
                self._data.move_to_end(key)
                return table
        table = self._load(key)
        with self._lock:
            self._data[key] = table
            while len(self._data) > self._capacity:
                self._data.popitem(last=False)
        return table
