"""Pack files: many chunk blobs in one object, with an index at the end (see FORMAT.md).

The in-memory ``ChunkIndex`` maps a chunk id to its pack and place; it is rebuilt on open from
the packs' own indexes, so a pack is self-describing and no separate index can drift from it.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from lifeboat.archive.backend import Backend
from lifeboat.archive.errors import FormatError
from lifeboat.archive.formats import (
    PACK_ENTRY,
    PACK_MAGIC,
    PACK_TRAILER,
    PackEntry,
    encode_pack_index,
    parse_pack_index,
    parse_pack_trailer,
)

PACK_PREFIX = "packs/"
DEFAULT_PACK_TARGET = 32 * 1024 * 1024
INDEX_THREADS = 16  # pack indexes read at once when the chunk index is loaded


def new_pack_key() -> str:
    """A fresh random pack name, fanned out over 256 folders."""
    name = secrets.token_hex(16)
    return f"{PACK_PREFIX}{name[:2]}/{name}"


@dataclass(frozen=True)
class Location:
    """Where a chunk is stored."""

    pack: str
    entry: PackEntry


def read_pack_index(backend: Backend, key: str) -> list[PackEntry]:
    """The entries of one pack, from its trailer and index; ``FormatError`` if damaged."""
    size = backend.size(key)
    if size < len(PACK_MAGIC) + PACK_TRAILER.size:
        raise FormatError(f"pack {key}: too short ({size} bytes)")
    offset, count, crc = parse_pack_trailer(key, backend.get_range(key, size - PACK_TRAILER.size, PACK_TRAILER.size))
    if offset + count * PACK_ENTRY.size + PACK_TRAILER.size != size:
        raise FormatError(f"pack {key}: index does not fit the file size")
    body = backend.get_range(key, offset, count * PACK_ENTRY.size)
    return parse_pack_index(key, body, count, crc, offset)


def parse_pack(key: str, data: bytes) -> list[PackEntry]:
    """The entries of a whole pack held in memory, checked as ``read_pack_index`` checks a stored
    one, and its magic too: what a pack's own checksums say about bytes about to be sent."""
    if len(data) < len(PACK_MAGIC) + PACK_TRAILER.size or not data.startswith(PACK_MAGIC):
        raise FormatError(f"pack {key}: bad magic or too short ({len(data)} bytes)")
    offset, count, crc = parse_pack_trailer(key, data[-PACK_TRAILER.size:])
    if offset + count * PACK_ENTRY.size + PACK_TRAILER.size != len(data):
        raise FormatError(f"pack {key}: index does not fit the file size")
    return parse_pack_index(key, data[offset:offset + count * PACK_ENTRY.size], count, crc, offset)


class ChunkIndex:
    """Chunk id -> location, for every readable pack of the archive."""

    def __init__(self) -> None:
        self._map: dict[bytes, Location] = {}
        self.bad_packs: dict[str, str] = {}
        self.packs: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, backend: Backend) -> ChunkIndex:
        """Read every pack's index; damaged packs are recorded in ``bad_packs``, not fatal."""
        index = cls()
        index.refresh(backend)
        return index

    def refresh(self, backend: Backend) -> bool:
        """Read the indexes of packs stored since the last load; False (nothing changed) when a
        known pack is gone — prune ran — and the caller must load a new index instead."""
        listed = set(backend.list(PACK_PREFIX))
        if not self.packs <= listed:
            return False
        def read(key: str) -> list[PackEntry] | str:
            try:
                return read_pack_index(backend, key)
            except (FormatError, KeyError) as e:
                return str(e)

        new = sorted(listed - self.packs - set(self.bad_packs))
        # two round trips per pack: many in flight, else opening a remote archive waits on each
        with ThreadPoolExecutor(min(INDEX_THREADS, max(1, len(new)))) as pool:
            for key, entries in zip(new, pool.map(read, new), strict=True):
                if isinstance(entries, str):
                    self.bad_packs[key] = entries
                else:
                    self.add(key, entries)
        return True

    def add(self, pack: str, entries: list[PackEntry]) -> None:
        """Record the entries of a pack that is now durable."""
        with self._lock:
            self.packs.add(pack)
            for e in entries:
                self._map.setdefault(e.chunk_id, Location(pack, e))

    def get(self, chunk_id: bytes) -> Location | None:
        """The location of a chunk, or None."""
        return self._map.get(chunk_id)

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self._map

    def __len__(self) -> int:
        return len(self._map)


class PackWriter:
    """Collects new blobs and stores them as packs of about ``target`` bytes.

    Packs are stored by one background thread (``Backend.put`` includes fsync), at most
    ``in_flight`` at a time, so hashing and compression never wait for the disk. ``finish``
    returns once every pack is durable and in the index; only then may a manifest refer to them.
    """

    def __init__(self, backend: Backend, index: ChunkIndex, target: int = DEFAULT_PACK_TARGET,
                 in_flight: int = 2) -> None:
        self.backend = backend
        self.index = index
        self.target = target
        self.in_flight = in_flight
        self._parts: list[bytes] = [PACK_MAGIC]
        self._entries: list[PackEntry] = []
        self._pending: set[bytes] = set()
        self._pos = len(PACK_MAGIC)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pack-writer")
        self._stores: deque[Future[None]] = deque()
        self.bytes_written = 0

    def has(self, chunk_id: bytes) -> bool:
        """Whether the chunk is stored already or queued by this writer."""
        return chunk_id in self._pending or chunk_id in self.index

    def add(self, chunk_id: bytes, blob: bytes, raw_length: int) -> bool:
        """Queue a blob; False (and nothing queued) when the chunk exists already."""
        if self.has(chunk_id):
            return False
        self._entries.append(PackEntry(chunk_id, self._pos, len(blob), raw_length))
        self._parts.append(blob)
        self._pending.add(chunk_id)
        self._pos += len(blob)
        if self._pos >= self.target:
            self.flush()
        return True

    def _store(self, key: str, parts: list[bytes], entries: list[PackEntry]) -> None:
        self.backend.put_parts(key, parts)
        self.index.add(key, entries)

    def flush(self) -> None:
        """Seal the queued blobs into a pack and hand it to the background writer."""
        if not self._entries:
            return
        while len(self._stores) >= self.in_flight:
            self._stores.popleft().result()
        self._parts.append(encode_pack_index(self._entries, self._pos))
        self.bytes_written += sum(len(p) for p in self._parts)
        self._stores.append(self._pool.submit(self._store, new_pack_key(), self._parts, self._entries))
        self._parts, self._entries, self._pos = [PACK_MAGIC], [], len(PACK_MAGIC)

    def finish(self) -> None:
        """Store what is queued and wait until every pack is durable; re-raises a failed store."""
        try:
            self.flush()
            while self._stores:
                self._stores.popleft().result()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the background writer (waiting for any store in progress)."""
        self._pool.shutdown(wait=True)
