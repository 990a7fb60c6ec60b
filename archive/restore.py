"""Restore: write a whole point to a sparse file or a block device, decoding on every core.

A file is written under a temporary name and renamed when complete, so an interrupted restore
never leaves a file that looks finished. A block device has no holes: zero chunks are written
as zeros (``BLKZEROOUT`` would be faster but not every device honours it).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from archive.errors import DestinationError, StorageError
from archive.store import AHEAD, WORKERS, PointReader, Progress, ordered_map


def restore(reader: PointReader, dest: str | os.PathLike[str], *, force: bool = False,
            progress: Progress | None = None) -> None:
    """Write every byte of the point to ``dest`` (a new file, or an existing block device)."""
    path = Path(dest)
    device = path.exists() and stat.S_ISBLK(path.stat().st_mode)
    if path.exists() and not device and not force:
        raise DestinationError(f"destination {path} exists (use --force to replace it)")
    if path.is_dir():
        raise DestinationError(f"destination {path} is a directory")
    if not device and not path.parent.is_dir():
        raise DestinationError(f"destination {path}: folder {path.parent} does not exist")
    target = path if device else path.with_name(f".{path.name}.lifeboat-{secrets.token_hex(4)}")
    try:
        fd = os.open(target, os.O_WRONLY | (0 if device else os.O_CREAT | os.O_EXCL), 0o600)
    except OSError as e:
        raise DestinationError(f"destination {path}: cannot open ({e.strerror})") from None
    try:
        if device:
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if dev_size < reader.size:
                raise DestinationError(f"device {path} holds {dev_size} bytes, the point needs {reader.size}")
        else:
            os.ftruncate(fd, reader.size)
        cs = reader.chunk_size

        def work(i: int) -> int:
            length = reader.chunk_length(i)
            if reader.is_zero(i) and not device:
                return length
            data = reader.chunk(i)
            view = memoryview(data)
            off = i * cs
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
            return length

        with ThreadPoolExecutor(WORKERS) as pool:
            for length in ordered_map(pool, work, range(reader.count), ahead=AHEAD):
                if progress:
                    progress(length)
        os.fsync(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            if not device:
                os.unlink(target)
        raise StorageError(f"cannot write {path}: {e.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            if not device:
                os.unlink(target)
        raise
    finally:
        os.close(fd)
    if not device:
        os.replace(target, path)
