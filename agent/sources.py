"""Sources read by hash scan: a raw image file or a block device.

Guarantee: the point holds what the source held while it was read. For a device or file that
is written during the backup the point is not crash-consistent (use a snapshot source then).
"""

from __future__ import annotations

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

    def close(self) -> None:
        """Close the file."""
        os.close(self.fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(spec: str) -> FileSource:
    """The source named on the command line (image file or block device for now)."""
    return FileSource(spec)
