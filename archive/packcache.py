"""A bounded local disk cache of pack blocks, for serving from a remote (S3) archive.

Each chunk read from an object store is a round trip: a ranged GET per 1-4 MiB chunk makes a
boot wait on the link's latency thousands of times. Packs are immutable and a backup stores a
machine's chunks in slot order, so the bytes stored near a chunk are mostly the chunks read next.
``PackCache`` therefore fetches aligned blocks of a pack (``block`` bytes, one GET each), keeps
them as files in a directory of its own, and evicts the least recently used ones once they hold
more than ``max_bytes``. A block read right after its predecessor (a reader going through a pack
in order: hydration, a booting kernel reading its initramfs) starts a read-ahead of the next
``readahead`` blocks on a small pool.

The directory is private to one process (created under ``parent``, removed by ``close``), so
any number of ``lifeboat serve`` processes, on one host or many, read one bucket at once: reads
of an archive take no lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lifeboat.archive.backend import Backend

DEFAULT_BLOCK = 4 * 1024 * 1024
DEFAULT_READAHEAD = 2  # blocks
Block = tuple[str, int]  # pack key, block number


class PackCache:
    """Pack blocks of up to ``max_bytes`` in files under a new directory in ``parent``."""

    def __init__(self, max_bytes: int, parent: str | os.PathLike[str] | None = None, *,
                 block: int = DEFAULT_BLOCK, readahead: int = DEFAULT_READAHEAD) -> None:
        if block <= 0 or max_bytes < 0:
            raise ValueError("block and max_bytes must be positive")
        self.max_bytes = max_bytes
        self.block = block
        self.readahead = readahead
        self.dir = Path(tempfile.mkdtemp(prefix="lifeboat-pack-cache-", dir=parent))
        self.fetches = 0  # GETs made (for tests and the bench)
        self._lru: OrderedDict[Block, int] = OrderedDict()  # cached block -> its length
        self._bytes = 0
        self._ends: dict[str, int] = {}  # pack -> blocks it has, once its last was read
        self._inflight: dict[Block, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._queued = 0
        self._pool = ThreadPoolExecutor(max(1, readahead), thread_name_prefix="pack-readahead")

    @property
    def held(self) -> int:
        """Bytes of the blocks held now (at most ``max_bytes``)."""
        with self._lock:
            return self._bytes

    def _path(self, blk: Block) -> Path:
        return self.dir / f"{hashlib.sha256(blk[0].encode()).hexdigest()[:32]}-{blk[1]}"

    def read(self, backend: Backend, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of pack ``key`` at ``offset`` (fewer past its end), through the cache;
        ``KeyError`` when the pack is absent and no block of the range is cached."""
        first, last = offset // self.block, (offset + length - 1) // self.block
        if length <= 0:
            return b""
        parts = []
        for b in range(first, last + 1):
            lo = max(offset, b * self.block) - b * self.block
            hi = min(offset + length, (b + 1) * self.block) - b * self.block
            parts.append(self._slice(backend, (key, b), lo, hi))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _slice(self, backend: Backend, blk: Block, lo: int, hi: int) -> bytes:
        """Bytes ``lo..hi`` of a block: from its file when cached, else fetched (and cached)."""
        prev = (blk[0], blk[1] - 1)
        with self._lock:
            cached = blk in self._lru
            if cached:
                self._lru.move_to_end(blk)
            sequential = prev in self._lru or prev in self._inflight
        data = None
        if cached:
            try:
                with open(self._path(blk), "rb") as f:
                    data = os.pread(f.fileno(), hi - lo, lo)
            except FileNotFoundError:  # evicted meanwhile: fetch it again
                pass
        if data is None:
            data = self._fetch(backend, blk)[lo:hi]  # the demand first, then what follows it
        if sequential:  # keep the next blocks coming, whether this one was read ahead or not
            self._prefetch(backend, blk)
        return data

    def _fetch(self, backend: Backend, blk: Block) -> bytes:
        """A whole block, one GET shared by concurrent callers."""
        with self._lock:
            fut = self._inflight.get(blk)
            owner = fut is None
            if fut is None:
                fut = self._inflight[blk] = Future()
        if owner:
            try:
                data = backend.get_range(blk[0], blk[1] * self.block, self.block)
                with self._lock:
                    self.fetches += 1
                    if len(data) < self.block:
                        self._ends[blk[0]] = blk[1] + 1
                self._store(blk, data)
                fut.set_result(data)
            except BaseException as e:
                fut.set_exception(e)
            finally:
                with self._lock:
                    del self._inflight[blk]
        return fut.result()

    def _store(self, blk: Block, data: bytes) -> None:
        """Keep a block, first evicting the least recently used ones so that the files never
        hold more than ``max_bytes`` (its room is reserved before it is written)."""
        if not data or len(data) > self.max_bytes:
            return
        with self._lock:
            if blk in self._lru:
                return
            while self._bytes + len(data) > self.max_bytes:
                old, n = self._lru.popitem(last=False)
                self._bytes -= n
                with contextlib.suppress(FileNotFoundError):
                    self._path(old).unlink()
            self._bytes += len(data)
        try:
            self._path(blk).write_bytes(data)
        except BaseException:
            with self._lock:
                self._bytes -= len(data)
            with contextlib.suppress(OSError):
                self._path(blk).unlink()
            raise
        with self._lock:
            self._lru[blk] = len(data)

    def _prefetch(self, backend: Backend, blk: Block) -> None:
        """Fetch the next blocks of the pack in the background (bounded; best effort)."""
        key, b = blk
        for nxt in range(b + 1, b + 1 + self.readahead):
            with self._lock:
                end = self._ends.get(key)
                if (end is not None and nxt >= end) or (key, nxt) in self._lru or (key, nxt) in self._inflight:
                    continue
                if self._queued >= self.readahead * 2:
                    return
                self._queued += 1
            self._pool.submit(self._prefetch_one, backend, (key, nxt))

    def _prefetch_one(self, backend: Backend, blk: Block) -> None:
        try:
            with self._lock:
                done = blk in self._lru  # a demand read was quicker
            if not done:
                self._fetch(backend, blk)
        except Exception:  # noqa: BLE001 - the demand read will report it
            pass
        finally:
            with self._lock:
                self._queued -= 1

    def close(self) -> None:
        """Stop the read-ahead and remove the directory."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.dir, ignore_errors=True)

