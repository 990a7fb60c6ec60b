"""What every exporter shares: the exporter interface, atomic output, and the parallel pipeline.

Why here: each format module should only know its own byte layout. Reading the point, skipping
zero runs, spreading decompression and compression over the cores, reporting progress, and
making sure an interrupted export never leaves a file that looks finished (write to a temporary
name in the destination directory, fsync, then rename) are the same for every format.

Exporters read a *point source*: ``archive.PointReader`` or anything with the same small
interface (``PointSource`` below), so that size-limit tests can feed a huge sparse stand-in.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, Protocol, TypeVar

from lifeboat.archive.durable import fsync_dir
from lifeboat.archive.errors import DestinationError, SourceError
from lifeboat.archive.files import file_kind

SECTOR = 512
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB

Progress = Callable[[int], None]
T = TypeVar("T")

# Work in flight is bounded in bytes, so memory stays flat whatever the chunk size.
MAX_BYTES_IN_FLIGHT = 96 * MiB


def default_workers() -> int:
    """Threads for decompression/compression: one per core (zstd and deflate release the GIL)."""
    return max(2, os.cpu_count() or 2)


class PointSource(Protocol):
    """What an exporter reads: the read side of ``archive.PointReader``."""

    size: int
    chunk_size: int

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        ...

    def extents(self) -> Iterator[tuple[int, int, bool]]:
        """Runs of ``(offset, length, is_zero)`` covering the whole point."""
        ...


class ImageTooLarge(DestinationError):
    """The point is larger than the chosen image format can hold."""


class ImageError(SourceError):
    """A disk image to import is malformed: the message names the file and the field."""


class UnsupportedImage(ImageError):
    """A valid disk image that uses a feature lifeboat does not import (backing file, encryption…)."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    path: Path
    format: str
    virtual_size: int
    file_size: int
    allocated_bytes: int
    seconds: float


def round_up(n: int, to: int) -> int:
    """``n`` rounded up to a multiple of ``to``."""
    return -(-n // to) * to


def human(n: int) -> str:
    """A byte count for messages: ``2 TiB``, ``1.5 GiB``, ``512 B``."""
    for unit, size in (("PiB", PiB), ("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n} B"


class Exporter(ABC):
    """Writes one point as one image file of one format.

    Call order: construct (options only, no I/O) -> ``check_size(size)`` (optional, raises
    ``ImageTooLarge``) -> ``write(reader, out)``, which checks the size again, streams the point
    into a temporary file next to ``out``, fsyncs it and renames it to ``out``. On any error
    or interruption the temporary file is removed and ``out`` is untouched.
    """

    format: ClassVar[str]  # the name on the command line (--format)
    qemu_format: ClassVar[str]  # the name qemu-img uses for the same format
    max_size: ClassVar[int]  # largest virtual size the format can describe, in bytes
    min_size: ClassVar[int] = 0  # smallest point the format can describe
    description: ClassVar[str]

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        self.out_name = "disk"  # the final file name, for formats that record it (VMDK descriptors)

    def virtual_size(self, size: int) -> int:
        """The image's virtual size for a point of ``size`` bytes (sector formats round up)."""
        return round_up(size, SECTOR)

    def check_size(self, size: int) -> None:
        """Raise ``ImageTooLarge`` when a point of ``size`` bytes does not fit the format."""
        if size < self.min_size:
            raise DestinationError(
                f"--format {self.format}: the point is {size} bytes; a {self.description} image "
                f"must hold at least {self.min_size} byte(s)"
            )
        if self.virtual_size(size) > self.max_size:
            raise ImageTooLarge(
                f"--format {self.format}: the point is {human(size)} ({size} bytes), "
                f"more than the {human(self.max_size)} a {self.description} image can hold"
            )

    def write(
        self,
        reader: PointSource,
        out: str | os.PathLike[str],
        progress: Progress | None = None,
        *,
        overwrite: bool = False,
    ) -> ExportResult:
        """Write the whole point to ``out`` atomically; ``overwrite`` allows replacing a file."""
        self.check_size(reader.size)
        started = time.monotonic()
        path = Path(out)
        self.out_name = path.name
        with atomic_output(path, overwrite=overwrite) as fd:
            self._write(reader, fd, progress or (lambda n: None))
        st = os.stat(path)
        return ExportResult(
            path=path,
            format=self.format,
            virtual_size=self.virtual_size(reader.size),
            file_size=st.st_size,
            allocated_bytes=st.st_blocks * 512,
            seconds=time.monotonic() - started,
        )

    @abstractmethod
    def _write(self, reader: PointSource, fd: int, progress: Progress) -> None:
        """Write the image into the open, empty file ``fd`` (positional writes only)."""


@contextmanager
def atomic_output(path: Path, *, overwrite: bool) -> Iterator[int]:
    """An fd on a new temporary file beside ``path``; renamed to ``path`` only on success."""
    try:
        mode: int | None = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise DestinationError(f"{path}: cannot inspect it ({e.strerror})") from None
    if mode is not None and not stat.S_ISREG(mode):
        # never replaced, --force or not: no format streams, so a device, FIFO or link is no place for an image
        raise DestinationError(f"{path} is a {file_kind(mode)}; an export writes a new regular file only")
    if mode is not None and not overwrite:
        raise DestinationError(f"{path} already exists (use --force to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DestinationError(f"{path}: directory {parent} does not exist")
    tmp = parent / f".{path.name}.lifeboat-partial-{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DestinationError(f"{path}: cannot create a file in {parent} ({e.strerror})") from None
    done = False
    try:
        yield fd
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobber silently
            except FileExistsError:
                raise DestinationError(f"{path} already exists (use --force to replace it)") from None
            except OSError:
                os.rename(tmp, path)  # file systems without hard links
            else:
                os.unlink(tmp)
        done = True
        fsync_dir(parent)
    except OSError as e:
        raise DestinationError(f"{path}: write failed ({e.strerror})") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if not done:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def data_units(reader: PointSource, unit: int) -> Iterator[int]:
    """Indices of the ``unit``-sized, aligned spans of the point that hold any non-zero chunk."""
    last = -1
    for offset, length, zero in reader.extents():
        if zero or length == 0:
            continue
        first_u = max(offset // unit, last + 1)
        end_u = (offset + length - 1) // unit
        yield from range(first_u, end_u + 1)
        last = max(last, end_u)


class UnitPipeline(Generic[T]):
    """Runs ``work(index, data)`` on every data unit of a point in a thread pool, in order.

    ``work`` gets the unit's bytes (short for the point's last unit) and runs in a worker: put
    the CPU-heavy part there (decompression happens in ``reader.read``; compression, zero
    detection). Results come back in unit order with bounded memory. Progress is reported in
    bytes of the point, zero runs included.
    """

    def __init__(
        self, reader: PointSource, unit: int, work: Callable[[int, bytes], T], workers: int, progress: Progress
    ) -> None:
        self.reader = reader
        self.unit = unit
        self.work = work
        self.workers = workers
        self.progress = progress
        self.ahead = max(2, min(4 * workers, MAX_BYTES_IN_FLIGHT // unit))
        self._reported = 0

    def _run(self, k: int) -> T:
        off = k * self.unit
        data = self.reader.read(off, min(self.unit, self.reader.size - off))
        return self.work(k, data)

    def _advance_to(self, pos: int) -> None:
        pos = min(pos, self.reader.size)
        if pos > self._reported:
            self.progress(pos - self._reported)
            self._reported = pos

    def __iter__(self) -> Iterator[tuple[int, T]]:
        pending: deque[tuple[int, Future[T]]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="export") as pool:
            try:
                for k in data_units(self.reader, self.unit):
                    pending.append((k, pool.submit(self._run, k)))
                    if len(pending) >= self.ahead:
                        idx, fut = pending.popleft()
                        yield idx, fut.result()
                        self._advance_to((idx + 1) * self.unit)
                while pending:
                    idx, fut = pending.popleft()
                    yield idx, fut.result()
                    self._advance_to((idx + 1) * self.unit)
            finally:
                for _, fut in pending:
                    fut.cancel()
        self._advance_to(self.reader.size)


def nonzero_runs(data: bytes, granularity: int) -> list[tuple[int, int]]:
    """``(start, end)`` byte ranges of ``data`` not made of all-zero ``granularity`` blocks."""
    n = len(data)
    if n == 0:
        return []
    zero = bytes(granularity)
    if n <= granularity:
        return [] if data == zero[:n] else [(0, n)]
    runs: list[tuple[int, int]] = []
    mv = memoryview(data)
    start = -1
    for pos in range(0, n, granularity):
        end = min(pos + granularity, n)
        is_zero = mv[pos:end] == (zero if end - pos == granularity else zero[: end - pos])
        if is_zero:
            if start >= 0:
                runs.append((start, pos))
                start = -1
        elif start < 0:
            start = pos
    if start >= 0:
        runs.append((start, n))
    return runs


def nonzero_clusters(data: bytes, cluster: int) -> list[tuple[int, memoryview]]:
    """``(index, view)`` of every cluster of ``data`` that is not all zeros, each padded to
    ``cluster`` bytes (only the point's last, short unit needs padding). Views, not copies."""
    out: list[tuple[int, memoryview]] = []
    zero = bytes(cluster)
    n = len(data)
    if n % cluster:
        data = data + bytes(cluster - n % cluster)
        n = len(data)
    mv = memoryview(data)
    for i, pos in enumerate(range(0, n, cluster)):
        piece = mv[pos : pos + cluster]
        if piece != zero:
            out.append((i, piece))
    return out


def read_exact(fd: int, name: str, offset: int, length: int, what: str) -> bytes:
    """``length`` bytes at ``offset`` of an image being imported, or ``ImageError`` naming ``what``."""
    if offset < 0 or length < 0 or offset + length >= 2**63:
        raise ImageError(f"image {name}: {what} has an impossible offset {offset} or length {length}")
    try:
        data = os.pread(fd, length, offset)
    except OSError as e:
        raise ImageError(f"image {name}: cannot read {what} at offset {offset} ({e.strerror})") from None
    if len(data) != length:
        raise ImageError(
            f"image {name}: {what} at offset {offset} (+{length} bytes) lies beyond the end of the file (truncated?)"
        )
    return data
