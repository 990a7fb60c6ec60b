"""The BlockSource over a raw image file or a block device, read by hash scan.

It lives in the archive package because both the agent (devices, LVM snapshots) and the
exporters (raw images) read through it, and they may not import each other.

Guarantee: the point holds what the source held while it was read. For a device or file that
is written during the backup the point is not crash-consistent (use a snapshot source then).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from pathlib import Path

from lifeboat.archive.errors import SourceError

#: Alignment of offsets, lengths and buffers for O_DIRECT reads: a multiple of any logical block size in use.
DIRECT_ALIGN = 4096


class FileSource:
    """A raw image file or block device, read with ``pread`` (thread-safe, GIL released).

    ``read_view`` reads through a second descriptor opened with ``O_DIRECT`` where the platform and
    file system allow it: no copy out of the page cache, and a backup does not evict the machine's
    page cache. Where ``O_DIRECT`` is refused (tmpfs before Linux 6.6, some network or FUSE file
    systems, non-Linux) it reads with plain ``pread`` instead. Without read-ahead, ``O_DIRECT``
    reads wait for the device: read from more threads than there are cores to keep them busy.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"source {self.path}: cannot open ({e.strerror})") from None
        st = os.fstat(self.fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(self.fd)
            raise SourceError(f"source {self.path}: not a regular file or block device")
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self._direct_fd = open_direct(self.path)
        self._views = threading.local()  # .buf: this thread's page-aligned read_view buffer

    @property
    def direct(self) -> bool:
        """Whether ``read_view`` reads with ``O_DIRECT`` (for diagnostics)."""
        return self._direct_fd is not None

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise SourceError(f"source {self.path}: read error at offset {offset} ({e.strerror})") from None
        if len(data) != length:
            raise SourceError(f"source {self.path}: file shrank while being read (offset {offset})")
        return data

    def read_view(self, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset`` as a read-only view into this thread's buffer, valid until
        the same thread calls ``read_view`` again (no allocation, no page-cache copy where
        ``O_DIRECT`` works). Any offset and length, aligned or not, the file's tail included."""
        if offset < 0 or length < 0:
            raise ValueError(f"read_view: negative offset or length ({offset}, {length})")
        start = offset - offset % DIRECT_ALIGN if self._direct_fd is not None else offset
        end = offset + length
        span = -(-(end - start) // DIRECT_ALIGN) * DIRECT_ALIGN  # whole blocks, covering the request
        buf = self._buffer(span)
        done = 0
        if self._direct_fd is not None and length:
            try:
                done = os.preadv(self._direct_fd, [buf[:span]], start)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this file or device wants other alignment
                    raise SourceError(f"source {self.path}: read error at offset {offset} ({e.strerror})") from None
        while done < end - start:  # the rest (or all, without O_DIRECT) buffered: any alignment
            try:
                n = os.preadv(self.fd, [buf[done : end - start]], start + done)
            except OSError as e:
                raise SourceError(f"source {self.path}: read error at offset {start + done} ({e.strerror})") from None
            if n == 0:
                raise SourceError(f"source {self.path}: file shrank while being read (offset {offset})")
            done += n
        return buf[offset - start : end - start].toreadonly()

    def _buffer(self, size: int) -> memoryview:
        """This thread's page-aligned buffer of at least ``size`` bytes (grown, never shrunk)."""
        buf: memoryview | None = getattr(self._views, "buf", None)
        if buf is None or len(buf) < size:
            # anonymous mmap: page-aligned, as O_DIRECT wants; a view still held by the caller
            # keeps the old map alive, so it is never closed here
            buf = memoryview(mmap.mmap(-1, max(size, DIRECT_ALIGN)))
            self._views.buf = buf
        return buf

    def data_extents(self) -> list[tuple[int, int]] | None:
        """Allocated extents of a regular file (SEEK_DATA/SEEK_HOLE), so holes are never read;
        None for a block device or a file system that cannot tell."""
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            return None
        extents = []
        pos = 0
        try:
            while pos < self.size:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
                end = os.lseek(self.fd, start, os.SEEK_HOLE)
                extents.append((start, end - start))
                pos = end
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return extents
            return None
        return extents

    def close(self) -> None:
        """Close the file."""
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        os.close(self.fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_KINDS = {
    stat.S_IFREG: "regular file",
    stat.S_IFBLK: "block device",
    stat.S_IFCHR: "character device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symbolic link",
}


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: messages that refuse a destination say what is there."""
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def open_direct(path: str | os.PathLike[str], mode: int = os.O_RDONLY) -> int | None:
    """A descriptor of ``path`` opened with ``O_DIRECT``, or None where that is not possible
    (no ``O_DIRECT`` on this platform, EINVAL from tmpfs and some file systems, ...): the caller
    then uses plain ``pread``/``pwrite``, a supported configuration."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, mode | flag)
    except OSError:
        return None
