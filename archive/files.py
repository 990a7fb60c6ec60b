"""The BlockSource over a raw image file or a block device, read by hash scan.

It lives in the archive package because both the agent (devices, LVM snapshots) and the
exporters (raw images) read through it, and they may not import each other.

Guarantee: the point holds what the source held while it was read. For a device or file that
is written during the backup the point is not crash-consistent (use a snapshot source then).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from archive.errors import SourceError


class FileSource:
    """A raw image file or block device, read with ``pread`` (thread-safe, GIL released)."""

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

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise SourceError(f"source {self.path}: read error at offset {offset} ({e.strerror})") from None
        if len(data) != length:
            raise SourceError(f"source {self.path}: file shrank while being read (offset {offset})")
        return data

    def readinto(self, offset: int, buf: bytearray) -> None:
        """Fill ``buf`` from ``offset`` (no new allocation: the backup reuses one buffer a thread)."""
        try:
            n = os.preadv(self.fd, [buf], offset)
        except OSError as e:
            raise SourceError(f"source {self.path}: read error at offset {offset} ({e.strerror})") from None
        if n != len(buf):
            raise SourceError(f"source {self.path}: file shrank while being read (offset {offset})")

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
        os.close(self.fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
