"""The local-directory backend: one file per object under the archive directory.

Durability follows the usual POSIX recipe: write a temporary file in the target directory,
fsync it, rename it over the final name, fsync the directory. Temporary files carry
``.tmp-`` in their name; ``list`` never shows them and ``cleanup_incomplete`` removes them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path

from lifeboat.archive.backend import Backend
from lifeboat.archive.durable import create_durably, fsync_dir
from lifeboat.archive.errors import Locked, StorageError

_TMP_MARK = ".tmp-"
_MAX_OPEN = 256
_RACY_NS = 2_000_000_000  # a folder changed more recently than this may change again unseen
_REPLACEABLE = "points/"  # the only objects a put replaces (point manifests): never read through a kept fd


class LocalBackend(Backend):
    """Objects as files below ``root``; keys map to relative paths."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._fd_lock = threading.Lock()

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/") or _TMP_MARK in key:
            raise ValueError(f"invalid object key {key!r}")
        return self.root / key

    def _fd(self, key: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(key)
            if fd is not None:
                self._fds.move_to_end(key)
                return fd
            try:
                fd = os.open(self._path(key), os.O_RDONLY)
            except FileNotFoundError:
                raise KeyError(key) from None
            self._fds[key] = fd
            while len(self._fds) > _MAX_OPEN:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return fd

    def _forget(self, key: str) -> None:
        with self._fd_lock:
            fd = self._fds.pop(key, None)
            if fd is not None:
                os.close(fd)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # a file where the archive should be: no archive
            raise KeyError(key) from None
        except OSError as e:
            raise StorageError(f"cannot read {self._path(key)}: {e.strerror}") from e

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            if key.startswith(_REPLACEABLE):  # another process may have replaced it: a kept fd reads the old one
                try:
                    fd = os.open(self._path(key), os.O_RDONLY)
                except FileNotFoundError:
                    raise KeyError(key) from None
                try:
                    return os.pread(fd, length, offset)
                finally:
                    os.close(fd)
            return os.pread(self._fd(key), length, offset)
        except OSError as e:
            raise StorageError(f"cannot read {self._path(key)}: {e.strerror}") from e

    def put(self, key: str, data: bytes) -> None:
        self.put_parts(key, [data])

    def put_parts(self, key: str, parts: Sequence[bytes]) -> None:
        path = self._path(key)
        tmp = path.with_name(f"{path.name}{_TMP_MARK}{secrets.token_hex(4)}")
        try:
            if not path.parent.is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
                fsync_dir(path.parent.parent)
            create_durably(path, tmp, parts)
        except OSError as e:
            what = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
            raise StorageError(f"cannot write {path}: {what}") from e
        self._forget(key)

    def delete(self, key: str) -> None:
        self._forget(key)
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            raise StorageError(f"cannot delete {path}: {e.strerror}") from e
        fsync_dir(path.parent)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise KeyError(key) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                if _TMP_MARK in name:
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key

    def change_stamps(self, prefix: str) -> dict[str, Hashable] | None:
        """A folder's modification and change times (and inode): a create, rename or unlink in it
        moves them. A folder changed less than ``_RACY_NS`` ago gets a fresh ``object()``, equal to
        nothing: the file system's clock is coarse, so a second change within the same tick could
        leave the same times (git's "racy" case); such a folder is re-read until it settles."""
        horizon = time.time_ns() - _RACY_NS
        try:
            entries = os.scandir(self._path(prefix.rstrip("/")))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        stamps: dict[str, Hashable] = {}
        with entries:
            for e in entries:
                if not e.is_dir(follow_symlinks=False):
                    continue
                st = e.stat(follow_symlinks=False)
                settled = max(st.st_mtime_ns, st.st_ctime_ns) < horizon
                stamps[e.name] = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino) if settled else object()
        return stamps

    @contextlib.contextmanager
    def lock(self, exclusive: bool, wait: bool = True) -> Iterator[None]:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                raise Locked(f"archive {self.root} is locked by another lifeboat process") from None
            yield
        finally:
            os.close(fd)

    def cleanup_incomplete(self) -> int:
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if _TMP_MARK in name:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
        return removed

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
