"""File writing shared by the archive, the NBD server and the exporters.

``pwrite_all`` writes every byte (``pwrite`` may write fewer). ``create_durably`` is the POSIX
recipe for a new file: write a temporary file in the destination folder, fsync it, rename it
over the final name, fsync the folder; after a crash the file is there whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path


def pwrite_all(fd: int, buffers: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
    """Write ``buffers`` contiguously at ``offset`` (one ``pwritev``, retried on short writes)."""
    total = sum(len(b) for b in buffers)
    done = os.pwritev(fd, buffers, offset)
    if done == total:
        return
    rest = memoryview(b"".join(buffers))[done:]
    while rest:
        n = os.pwrite(fd, rest, offset + done)
        done += n
        rest = rest[n:]


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename or unlink in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Buffer = bytes | bytearray | memoryview
_IOV_BATCH = 512  # well under IOV_MAX (1024 on Linux)


def create_durably(path: Path, tmp: Path, data: Buffer | Sequence[Buffer], size: int | None = None) -> None:
    """Make ``path`` hold ``data`` — one buffer, or parts written back to back without joining
    them — (extended with zeros to ``size`` bytes if given) through the temporary file ``tmp``
    in the same folder; ``tmp`` is removed on failure (OSError raised)."""
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            offset = 0
            for start in range(0, len(parts), _IOV_BATCH):
                batch = parts[start:start + _IOV_BATCH]
                pwrite_all(fd, batch, offset)
                offset += sum(len(b) for b in batch)
            if size is not None:
                os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
