"""Restore: write a whole point to a sparse file or a block device, decoding on every core.

A block device is written in place; any other existing destination that is not a regular file
(a character device, FIFO, socket, directory) is refused even with ``--force``: replacing
``/dev/something`` with a regular file would silently break the machine.

A file is written under a temporary name and renamed when complete, so an interrupted restore
never leaves a file that looks finished. Whole chunks are written with ``O_DIRECT`` where the
file system allows it: copying gigabytes through the page cache cost as much CPU as decoding
them, and a restore should not evict the machine's cache. A block device has no holes: zero chunks are written
as zeros (``BLKZEROOUT`` would be faster but not every device honours it).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lifeboat.archive.durable import pwrite_all
from lifeboat.archive.errors import DestinationError, StorageError
from lifeboat.archive.files import DIRECT_ALIGN, file_kind, open_direct
from lifeboat.archive.store import AHEAD, IO_THREADS, PointReader, Progress, ordered_map


def restore(reader: PointReader, dest: str | os.PathLike[str], *, force: bool = False,
            progress: Progress | None = None) -> None:
    """Write every byte of the point to ``dest`` (a new file, or an existing block device)."""
    path = Path(dest)
    try:
        mode: int | None = os.stat(path).st_mode  # follows links: /dev/disk/by-id/... names a device
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise DestinationError(f"destination {path}: cannot inspect it ({e.strerror})") from None
    device = mode is not None and stat.S_ISBLK(mode)
    if mode is not None and not device and not stat.S_ISREG(mode):
        # never replaced, not even with --force: a character device, FIFO or socket is not a disk
        raise DestinationError(f"destination {path} is a {file_kind(mode)}; restore writes a regular file "
                               "or a block device, nothing else")
    if mode is not None and not device and not force:
        raise DestinationError(f"destination {path} exists (use --force to replace it)")
    if not device and not path.parent.is_dir():
        raise DestinationError(f"destination {path}: folder {path.parent} does not exist")
    target = path if device else path.with_name(f".{path.name}.lifeboat-{secrets.token_hex(4)}")
    try:
        fd = os.open(target, os.O_WRONLY | (0 if device else os.O_CREAT | os.O_EXCL), 0o600)
    except OSError as e:
        raise DestinationError(f"destination {path}: cannot open ({e.strerror})") from None
    direct = open_direct(target, os.O_WRONLY)
    try:
        if device:
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if dev_size < reader.size:
                raise DestinationError(f"device {path} holds {dev_size} bytes, the point needs {reader.size}")
        else:
            os.ftruncate(fd, reader.size)
        cs = reader.chunk_size
        buffers = threading.local()

        def write(data: bytes, off: int) -> None:
            nonlocal direct
            if direct is not None and off % DIRECT_ALIGN == 0 and len(data) % DIRECT_ALIGN == 0:
                buf = getattr(buffers, "buf", None)
                if buf is None:
                    buf = buffers.buf = mmap.mmap(-1, cs)  # page-aligned, as O_DIRECT wants
                buf[:len(data)] = data
                try:
                    pwrite_all(direct, [memoryview(buf)[:len(data)]], off)
                    return
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    direct = None  # the file system refused after all: write through the cache
            pwrite_all(fd, [data], off)

        def work(i: int) -> int:
            length = reader.chunk_length(i)
            if reader.is_zero(i) and not device:
                return length
            write(reader.chunk(i), i * cs)
            return length

        with ThreadPoolExecutor(IO_THREADS) as pool:
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
        if direct is not None:
            os.close(direct)
    if not device:
        os.replace(target, path)
