"""What an export serves: a ``Volume`` with explicit capabilities, and the archive-backed ones.

Modelled on nbdkit's plugin API: the protocol layer asks a volume what it can do (``can_write``,
``can_multi_conn``, …) and calls ``read``/``write``/``zero``/``trim``/``flush``/``extents``. Every
method is thread-safe and may block; ``read_fast`` is the non-blocking path the event loop tries
first (decoded chunk in memory, or local file in the page cache) before it hands a request to a
worker thread. That split is what keeps one slow archive fetch from stalling other requests.

Volumes stack: ``PointVolume`` reads an archive point; ``overlay.CowVolume`` puts writes in a
local copy-on-write file over any volume; ``hydrate.HydrateVolume`` copies a volume into a
local disk and serves from it.
"""

from __future__ import annotations

import abc
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from lifeboat.archive.formats import slot_length
from lifeboat.archive.store import PointReader
from lifeboat.plumbing import nbd as P
from lifeboat.plumbing.errors import LifeboatError

MiB = 1024 * 1024
MAX_PAYLOAD = 32 * MiB
Extents = list[tuple[int, int]]  # (length, base:allocation flags)
ZERO_FLAGS = P.STATE_HOLE | P.STATE_ZERO


class VolumeError(LifeboatError):
    """An I/O request that failed: carries the NBD error number and a message for the client."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class Volume(abc.ABC):
    """An export's block storage. Lifecycle: created by the caller, shared by every connection
    to the export, ``close()``d once when the server stops (flushes whatever is pending)."""

    size: int
    minimum_block = 1
    preferred_block = 4096
    max_payload = MAX_PAYLOAD
    description = ""

    def can_write(self) -> bool:
        """Whether WRITE, WRITE_ZEROES and TRIM are accepted."""
        return False

    def can_multi_conn(self) -> bool:
        """Safe to advertise NBD_FLAG_CAN_MULTI_CONN: true when all connections share this one
        object, so a FLUSH on any connection covers every completed write."""
        return True

    def can_fast_zero(self) -> bool:
        """Whether WRITE_ZEROES with FAST_ZERO can succeed (else it fails fast with ENOTSUP)."""
        return False

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (may block on the archive)."""

    def read_fast(self, offset: int, length: int) -> bytes | None:
        """The bytes if they can be had without blocking, else None."""
        return None

    def read_background(self, offset: int, length: int) -> bytes:
        """``read`` for a background copy: not counted as client access, so it starts no
        read-ahead that would queue on the archive link ahead of what clients ask for."""
        return self.read(offset, length)

    def reads_zero(self, offset: int, length: int) -> bool:
        """Cheaply known to read as zeros (lets READ answer with a hole chunk)."""
        return False

    def extents(self, offset: int, length: int) -> Extents:
        """``base:allocation`` runs from ``offset``, covering at least one byte."""
        return [(length, 0)]

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        """Store ``data`` at ``offset``; with ``fua`` durable before returning."""
        raise VolumeError(P.EPERM, "the export is read-only")

    def zero(self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool) -> None:
        """Make a range read as zeros; ``fast`` demands it cost less than a write."""
        raise VolumeError(P.EPERM, "the export is read-only")

    def trim(self, offset: int, length: int, *, fua: bool) -> None:
        """Discard a range (a hint: whole blocks only)."""
        raise VolumeError(P.EPERM, "the export is read-only")

    def flush(self) -> None:  # noqa: B027 - optional capability, nothing to do when read-only
        """Make every completed write durable."""

    def cache(self, offset: int, length: int) -> None:  # noqa: B027 - a hint; ignoring it is allowed
        """A hint that the client will read this range soon."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release files and threads."""


class PointChunks:
    """Chunks of one archive point, decoded at most once at a time.

    Concurrent requests for the same chunk share one fetch (nbdcopy's parallel requests would
    otherwise decode each 1 MiB chunk several times), and a chunk read right after its
    predecessor starts a bounded read-ahead on a small pool, so sequential readers get
    decoding on every core.
    """

    def __init__(self, reader: PointReader, *, readahead: int = 4, workers: int | None = None) -> None:
        self.reader = reader
        self.cache = reader.archive.cache
        self.size = reader.size
        self.chunk_size = reader.chunk_size
        self.count = reader.count
        self._zero_flags = bytes(reader.is_zero(i) for i in range(self.count))
        self.readahead = readahead
        self._lock = threading.Lock()
        self._inflight: dict[int, Future[bytes]] = {}
        self._touched = bytearray(self.count)
        self._pool = ThreadPoolExecutor(workers or max(2, os.cpu_count() or 2), thread_name_prefix="readahead")
        self._queued = 0
        self._zero = bytes(self.chunk_size)

    def chunk_length(self, i: int) -> int:
        """Length of chunk ``i`` (the last one may be short)."""
        return slot_length(self.size, self.chunk_size, i)

    def is_zero(self, i: int) -> bool:
        """Whether chunk ``i`` is all zeros (stored as nothing)."""
        return bool(self._zero_flags[i])

    def cached(self, i: int) -> bytes | None:
        """Chunk ``i`` if it needs no fetch."""
        if self._zero_flags[i]:
            n = self.chunk_length(i)
            return self._zero if n == self.chunk_size else bytes(n)
        return self.cache.get(self.reader.cache_key(i))

    def get(self, i: int) -> bytes:
        """Chunk ``i``, fetched and decoded if needed; concurrent callers share one fetch."""
        data = self.cached(i)
        if data is not None:
            return data
        with self._lock:
            fut = self._inflight.get(i)
            owner = fut is None
            if fut is None:
                fut = self._inflight[i] = Future()
        if owner:
            try:
                fut.set_result(self.reader.chunk(i))
            except BaseException as e:
                fut.set_exception(e)
            finally:
                with self._lock:
                    del self._inflight[i]
        return fut.result()

    def touch(self, first: int, last: int) -> None:
        """Note client access to chunks ``first..last``; read ahead when it looks sequential."""
        t = self._touched
        if first > 0 and t[first - 1] and not t[last]:
            self.prefetch(last + 1, last + self.readahead)
        for i in range(first, last + 1):
            t[i] = 1

    def prefetch(self, first: int, last: int) -> None:
        """Start fetching chunks ``first..last`` in the background (bounded; best effort)."""
        for i in range(max(first, 0), min(last, self.count - 1) + 1):
            if self.is_zero(i) or i in self._inflight or self.cached(i) is not None:
                continue
            with self._lock:
                if self._queued >= self.readahead * 2:
                    return
                self._queued += 1
            self._pool.submit(self._prefetch_one, i)

    def _prefetch_one(self, i: int) -> None:
        try:
            self.get(i)
        except Exception:  # noqa: BLE001 - the demand read will report it
            pass
        finally:
            with self._lock:
                self._queued -= 1

    def read(self, offset: int, length: int, *, client: bool = True) -> bytes:
        """Bytes of the point (blocking); ``client=False`` for background copies."""
        return self._read(offset, length, block=True, client=client) or b""

    def read_fast(self, offset: int, length: int) -> bytes | None:
        """Bytes of the point if every chunk is already decoded."""
        return self._read(offset, length, block=False)

    def _read(self, offset: int, length: int, block: bool, client: bool = True) -> bytes | None:
        if length == 0:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        if client and not (first == last and self._touched[first]):
            self.touch(first, last)
        if first == last:
            data = self.get(first) if block else self.cached(first)
            if data is None:
                return None
            inner = offset - first * cs
            return data if inner == 0 and length == len(data) else data[inner : inner + length]
        parts = []
        pos, end = offset, offset + length
        for i in range(first, last + 1):
            data = self.get(i) if block else self.cached(i)
            if data is None:
                return None
            inner = pos - i * cs
            take = min(cs - inner, end - pos)
            parts.append(data if inner == 0 and take == len(data) else data[inner : inner + take])
            pos += take
        return b"".join(parts)

    def all_zero(self, offset: int, length: int) -> bool:
        """Whether every chunk of the range is a zero chunk."""
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        return all(self._zero_flags[first:last + 1])

    def extents(self, offset: int, length: int) -> Extents:
        """Runs of zero (hole) and data chunks from ``offset`` to the end of its last chunk."""
        cs = self.chunk_size
        flags = self._zero_flags
        first, last = offset // cs, (offset + length - 1) // cs
        out: Extents = []
        run_start = offset
        run_zero = flags[first]
        for i in range(first + 1, last + 1):
            z = flags[i]
            if z != run_zero:
                out.append((i * cs - run_start, ZERO_FLAGS if run_zero else 0))
                run_start, run_zero = i * cs, z
        end = min(self.size, (last + 1) * cs)
        out.append((end - run_start, ZERO_FLAGS if run_zero else 0))
        return out

    def close(self) -> None:
        """Stop the read-ahead workers."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class PointVolume(Volume):
    """A read-only archive point."""

    def __init__(self, reader: PointReader, description: str = "", *, readahead: int = 4) -> None:
        self.chunks = PointChunks(reader, readahead=readahead)
        self.reader = reader
        self.size = reader.size
        self.description = description

    def read(self, offset: int, length: int) -> bytes:
        return self.chunks.read(offset, length)

    def read_fast(self, offset: int, length: int) -> bytes | None:
        return self.chunks.read_fast(offset, length)

    def read_background(self, offset: int, length: int) -> bytes:
        return self.chunks.read(offset, length, client=False)

    def reads_zero(self, offset: int, length: int) -> bool:
        return self.chunks.all_zero(offset, length)

    def extents(self, offset: int, length: int) -> Extents:
        return self.chunks.extents(offset, length)

    def cache(self, offset: int, length: int) -> None:
        cs = self.chunks.chunk_size
        self.chunks.prefetch(offset // cs, (offset + length - 1) // cs)

    def close(self) -> None:
        self.chunks.close()
