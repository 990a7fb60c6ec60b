"""The Archive: opening and initialising an archive, its catalog, backups and point readers.

Write order of a backup (FORMAT.md, "Write order"): new chunks go into packs, each pack is
stored durably (``Backend.put``), and only then is the point manifest stored. A crash before
the manifest leaves unreferenced packs that ``prune`` collects; the point is not there.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from lifeboat.archive.backend import Backend, open_backend
from lifeboat.archive.chunks import Codec, Keys
from lifeboat.archive.deltas import Job, job_reads, lay_patches, plan_jobs
from lifeboat.archive.errors import (
    ArchiveExists,
    ArchiveNotFound,
    FormatError,
    MissingChunk,
    SourceError,
    WrongKey,
)
from lifeboat.archive.formats import (
    FORMAT_VERSION,
    ZERO_ID,
    ChunkTable,
    Patch,
    encode_point,
    parse_point,
    parse_point_header,
    slot_length,
)
from lifeboat.archive.packcache import PackCache
from lifeboat.archive.packs import ChunkIndex, PackWriter
from lifeboat.archive.points import (
    POINT_PREFIX,
    PointInfo,
    check_machine,
    new_point_id,
    now_utc,
    parse_selector,
    select,
)
from lifeboat.plumbing.errors import UsageError

CONFIG_KEY = "config"
DEFAULT_LOCATION = "./lifeboat-archive"
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
WORKERS = max(2, os.cpu_count() or 2)
# Backup and restore threads also wait on O_DIRECT reads and writes (no read-ahead, no write-back): two more than the
# cores keep both busy (2-core full backup: 4.5 s with 4 threads, 5.4 s with 2; bench/README.md)
IO_THREADS = WORKERS + 2
AHEAD = 32  # chunks in flight in the backup and restore pipelines (bounds memory)

Progress = Callable[[int], None]
T = TypeVar("T")


class BlockSource(Protocol):
    """What a backup reads from: a fixed-size run of bytes with random access."""

    name: str
    size: int

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Exactly ``length`` bytes at ``offset`` (raise on a short read)."""
        ...


def resolve_location(location: str | None) -> str:
    """``--archive``, else ``LIFEBOAT_ARCHIVE``, else ``./lifeboat-archive``."""
    return location or os.environ.get("LIFEBOAT_ARCHIVE") or DEFAULT_LOCATION


def read_key_file(key_file: str | None) -> bytes | None:
    """The secret in ``key_file`` (or ``LIFEBOAT_KEY_FILE``), or None when neither is given."""
    path = key_file or os.environ.get("LIFEBOAT_KEY_FILE")
    if not path:
        return None
    try:
        secret = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"key file {path}: {e.strerror}") from None
    if len(secret) < 16:
        raise UsageError(f"key file {path}: holds {len(secret)} bytes, at least 16 are needed")
    return secret


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[T], Any], items: Iterable[T], ahead: int) -> Iterator[Any]:
    """``pool.map`` that keeps at most ``ahead`` tasks in flight, so memory stays bounded."""
    pending: deque[Future[Any]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _chunks_with_data(extents: Iterable[tuple[int, int]], cs: int, count: int) -> set[int]:
    """Indexes of the chunks that an allocated extent of the source touches."""
    found: set[int] = set()
    for off, length in extents:
        if length > 0:
            found.update(range(off // cs, min(count, -(-(off + length) // cs))))
    return found


class ChunkCache:
    """A thread-safe LRU of decoded chunks, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        """A cached chunk, marked as recently used."""
        with self._lock:
            v = self._data.get(key)
            if v is not None:
                self._data.move_to_end(key)
            return v

    def put(self, key: bytes, value: bytes) -> None:
        """Cache a chunk, evicting the least recently used."""
        with self._lock:
            if key in self._data or len(value) > self.max_bytes:
                return
            self._data[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self._bytes -= len(old)


class Archive:
    """An open archive: config, codec, chunk index and catalog over one backend."""

    def __init__(self, backend: Backend, config: dict[str, Any], keys: Keys | None) -> None:
        self.backend = backend
        self.config = config
        self.chunk_size: int = config["chunk_size"]
        self.codec = Codec(level=config["compression"]["level"], keys=keys)
        self._index: ChunkIndex | None = None
        self._index_lock = threading.Lock()
        self._table: tuple[str, ChunkTable] | None = None
        self.cache = ChunkCache(DEFAULT_CACHE_BYTES)
        self.pack_cache: PackCache | None = None  # pack blocks on local disk (serving a remote archive)

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        location: str | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        encrypt: bool = False,
        key_file: str | None = None,
        level: int = 3,
    ) -> Archive:
        """Create an archive; with ``encrypt`` a missing key file is created with a random key."""
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
            raise UsageError(
                f"--chunk-size {chunk_size}: must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
            )
        if encrypt and not key_file:
            raise UsageError("--encrypt needs --key-file FILE")
        if key_file and not encrypt:
            raise UsageError("--key-file is only used with --encrypt")
        loc = resolve_location(location)
        backend = open_backend(loc)
        if backend.exists(CONFIG_KEY):
            raise ArchiveExists(f"{loc} already holds a lifeboat archive")
        keys = None
        config: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "chunk_size": chunk_size,
            "compression": {"codec": "zstd", "level": level},
            "encryption": None,
            "retention": {},
            "created": now_utc().isoformat(),
            "id": secrets.token_hex(16),
        }
        if encrypt:
            assert key_file is not None
            kf = Path(key_file)
            if not kf.exists():
                fd = os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(32))
            secret = read_key_file(key_file)
            assert secret is not None
            salt = secrets.token_bytes(16)
            keys = Keys(secret, salt)
            config["encryption"] = {
                "cipher": "aes-256-gcm",
                "kdf": "hkdf-sha256",
                "salt": salt.hex(),
                "key_check": keys.check_value(),
            }
        backend.put(CONFIG_KEY, json.dumps(config, indent=2).encode())
        return cls(backend, config, keys)

    @classmethod
    def open(cls, location: str | None = None, key_file: str | None = None) -> Archive:
        """Open an existing archive; ``ArchiveNotFound`` or ``WrongKey`` with a clear message."""
        loc = resolve_location(location)
        backend = open_backend(loc)
        try:
            raw = backend.get(CONFIG_KEY)
        except KeyError:
            raise ArchiveNotFound(
                f"no lifeboat archive at {loc} (create one with 'lifeboat archive init')"
            ) from None
        try:
            config = json.loads(raw)
            if config["format"] != FORMAT_VERSION:
                raise FormatError(f"archive {loc}: format {config['format']} is not supported")
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"archive {loc}: config is damaged ({e})") from None
        keys = None
        enc = config.get("encryption")
        if enc:
            secret = read_key_file(key_file)
            if secret is None:
                raise WrongKey(f"archive {loc} is encrypted: give --key-file FILE or LIFEBOAT_KEY_FILE")
            keys = Keys(secret, bytes.fromhex(enc["salt"]))
            if keys.check_value() != enc["key_check"]:
                raise WrongKey(f"archive {loc}: the key file does not open this archive")
        return cls(backend, config, keys)

    def save_config(self) -> None:
        """Store the (changed) config atomically."""
        self.backend.put(CONFIG_KEY, json.dumps(self.config, indent=2).encode())

    @property
    def index(self) -> ChunkIndex:
        """The chunk index, loaded on first use."""
        with self._index_lock:
            if self._index is None:
                self._index = ChunkIndex.load(self.backend)
            return self._index

    def refresh_index(self) -> ChunkIndex:
        """The chunk index brought up to date with packs other processes stored since it was
        loaded (cheap); a full reload when any pack it knew was deleted by prune."""
        with self._index_lock:
            if self._index is not None and self._index.refresh(self.backend):
                return self._index
        return self.reload_index()

    def reload_index(self) -> ChunkIndex:
        """Forget and re-read the chunk index (after another process changed the packs)."""
        with self._index_lock:
            self._index = None
        return self.index

    # -- catalog -------------------------------------------------------------------------
    def machines(self) -> list[str]:
        """Every machine with at least one point."""
        return sorted({k.split("/")[1] for k in self.backend.list(POINT_PREFIX) if k.count("/") == 2})

    def points(self, machine: str) -> list[PointInfo]:
        """The points of a machine, oldest first; unreadable manifests are left out."""
        check_machine(machine)
        found = []
        for key in self.backend.list(f"{POINT_PREFIX}{machine}/"):
            try:
                head = self.backend.get_range(key, 0, 64 * 1024)
                header, _ = parse_point_header(key, head)
                found.append(PointInfo.from_header(header))
            except (FormatError, KeyError, TypeError):
                continue
        return sorted(found, key=lambda p: (p.when, p.point))

    def resolve(self, selector: str) -> PointInfo:
        """The point named by ``MACHINE[@WHEN]``."""
        machine, when = parse_selector(selector)
        return select(selector, machine, when, self.points(machine))

    def chunk_table(self, info: PointInfo) -> ChunkTable:
        """The chunk table of a point (ZERO_ID for all-zero slots); the last one read is kept,
        as a capture plans its reads and then stores from the same base. Do not modify it."""
        if self._table is not None and self._table[0] == info.key:
            return self._table[1]
        try:
            data = self.backend.get(info.key)
        except KeyError:
            raise MissingChunk(f"point {info.machine}@{info.point} was removed") from None
        _, table = parse_point(info.key, data)
        self._table = (info.key, table)
        return table

    def write_point(self, info: PointInfo, table: ChunkTable) -> None:
        """Store a manifest atomically (new point, or a rollup rewriting its parent)."""
        header = info.to_json() | {"format": FORMAT_VERSION}
        self.backend.put(info.key, encode_point(header, table))

    def reader(self, info: PointInfo) -> PointReader:
        """Random access to a point's bytes."""
        return PointReader(self, info, self.chunk_table(info))

    # -- chunks --------------------------------------------------------------------------
    def read_chunk(self, chunk_id: bytes, raw_length: int) -> bytes:
        """A chunk's plaintext (zeros for ZERO_ID), through the cache."""
        if chunk_id == ZERO_ID:
            return bytes(raw_length)
        data = self.cache.get(chunk_id)
        if data is not None:
            return data
        loc = self.index.get(chunk_id)
        if loc is None:
            loc = self.refresh_index().get(chunk_id)
            if loc is None:
                raise MissingChunk(f"chunk {chunk_id.hex()} is in no pack of the archive")
        try:
            blob = self._blob(loc.pack, loc.entry.offset, loc.entry.length)
        except KeyError:
            loc = self.reload_index().get(chunk_id)
            if loc is None:
                raise MissingChunk(f"chunk {chunk_id.hex()} is in no pack of the archive") from None
            blob = self._blob(loc.pack, loc.entry.offset, loc.entry.length)
        data = self.codec.decode(chunk_id, blob, loc.entry.raw_length)
        self.cache.put(chunk_id, data)
        return data

    def _blob(self, pack: str, offset: int, length: int) -> bytes:
        """A stored blob, through the pack cache when there is one."""
        if self.pack_cache is not None:
            return self.pack_cache.read(self.backend, pack, offset, length)
        return self.backend.get_range(pack, offset, length)

    # -- backup --------------------------------------------------------------------------
    def _plan(self, size: int, changed: Iterable[tuple[int, int]] | None, base: PointInfo | None) -> list[Job]:
        if changed is None:
            return plan_jobs(size, self.chunk_size, None, None)
        if base is None or base.size != size or base.chunk_size != self.chunk_size:
            raise UsageError("an incremental from changed extents needs a base point of the same size")
        return plan_jobs(size, self.chunk_size, changed, self.chunk_table(base))

    def backup_reads(self, size: int, changed: Iterable[tuple[int, int]] | None,
                     base: PointInfo | None) -> list[tuple[int, int]]:
        """The (offset, length) reads ``backup`` will make with these arguments, in its order
        (a change-tracking source reads them ahead)."""
        return job_reads(self._plan(size, changed, base), size, self.chunk_size)

    def backup(
        self,
        machine: str,
        source: BlockSource,
        progress: Progress | None = None,
        *,
        changed: Iterable[tuple[int, int]] | None = None,
        base: PointInfo | None = None,
        started: datetime | None = None,
    ) -> PointInfo:
        """Store a new point of ``machine`` read from ``source``; chunks already stored are not.

        Without ``changed`` every byte is read and hashed. With ``changed`` (byte extents, from
        change tracking) only those bytes are read, stored as patches over ``base`` (see
        ``archive/deltas.py``), which must be the point the tracking started from and have the
        same size. ``started`` is the moment the source's content was frozen (default: now).
        """
        check_machine(machine)
        started = started or now_utc()
        cs = self.chunk_size
        size = source.size
        count = -(-size // cs)
        zero = bytes(cs)
        codec = self.codec
        with self.backend.lock(exclusive=False):
            index = self.refresh_index()
            history = self.points(machine)
            parent = history[-1].point if history else None
            jobs = self._plan(size, changed, base)
            table = ChunkTable([ZERO_ID] * count)
            if changed is not None and base is not None:
                old = self.chunk_table(base)
                table = ChunkTable(list(old.ids), {slot: list(ps) for slot, ps in old.patches.items()})
                parent = base.point
            writer = PackWriter(self.backend, index)
            data_extents = getattr(source, "data_extents", None)
            has_data = _chunks_with_data(data_extents(), cs, count) if data_extents and changed is None else None
            read_view = getattr(source, "read_view", None)

            def read(offset: int, length: int) -> bytes | bytearray | memoryview:
                data = read_view(offset, length) if read_view is not None else source.read(offset, length)
                if len(data) != length:
                    raise SourceError(f"source {source.name}: short read at offset {offset}")
                return data

            def store(data: bytes | bytearray | memoryview) -> tuple[bytes, bytes | None]:
                cid = codec.chunk_id(data)
                return cid, None if cid in index else codec.encode(cid, data)

            def whole(slot: int) -> tuple[bytes, bytes | None, int, int, list[Patch]]:
                length = slot_length(size, cs, slot)
                if has_data is not None and slot not in has_data:
                    return ZERO_ID, None, length, 0, []  # a hole of the source: nothing to read
                data = read(slot * cs, length)
                if zero.startswith(data):  # memcmp; ``==`` on a memoryview compares byte by byte
                    return ZERO_ID, None, length, length, []
                return *store(data), length, length, []

            def patch(runs: tuple[tuple[int, int, int], ...]) -> tuple[bytes, bytes | None, int, int, list[Patch]]:
                packed = bytearray()
                placed: list[tuple[int, int, int, int]] = []  # slot, offset, length, offset in chunk (-1: zeros)
                for slot, inner, n in runs:
                    data = read(slot * cs + inner, n)
                    if zero.startswith(data):
                        placed.append((slot, inner, n, -1))
                    else:
                        placed.append((slot, inner, n, len(packed)))
                        packed += data
                cid, blob = store(packed) if packed else (ZERO_ID, None)
                patches = [Patch(slot, inner, n, *((ZERO_ID, 0, 0) if at < 0 else (cid, at, len(packed))))
                           for slot, inner, n, at in placed]
                return cid, blob, len(packed), sum(n for _, _, n in runs), patches

            def work(job: Job) -> tuple[bytes, bytes | None, int, int, list[Patch]]:
                return patch(job.runs) if job.runs else whole(job.slot)

            bytes_new = bytes_read = 0
            try:
                # O_DIRECT reads wait on the device: more threads than cores. Other sources (NBD,
                # read ahead by the agent) need the GIL to receive: extra threads only slow them.
                with ThreadPoolExecutor(IO_THREADS if read_view is not None else WORKERS) as pool:
                    for job, (cid, blob, length, nread, patches) in zip(
                            jobs, ordered_map(pool, work, jobs, ahead=AHEAD), strict=True):
                        if job.runs:
                            lay_patches(table, patches)
                        else:
                            table.ids[job.slot] = cid
                            table.patches.pop(job.slot, None)
                        bytes_read += nread
                        if blob is not None and writer.add(cid, blob, length):
                            bytes_new += length
                        if progress:
                            progress(nread if job.runs else length)
                writer.finish()
            finally:
                writer.close()
            info = PointInfo(
                machine=machine,
                point=new_point_id(),
                time=started.isoformat(),
                parent=parent,
                size=size,
                chunk_size=cs,
                bytes_read=bytes_read,
                bytes_new=bytes_new,
                bytes_stored=writer.bytes_written,
                source=source.name,
            )
            self.write_point(info, table)
        return info


class PointReader:
    """Reads any byte range of one point: O(1) slot lookup, decoded chunks cached."""

    def __init__(self, archive: Archive, info: PointInfo, table: ChunkTable) -> None:
        self.archive = archive
        self.info = info
        self.table = table
        self.ids = table.ids
        self.count = len(table.ids)
        self.size = info.size
        self.chunk_size = info.chunk_size
        self._key = f"{info.machine}@{info.point}/".encode()

    def chunk_length(self, i: int) -> int:
        """Length of slot ``i`` (the last one may be short)."""
        return slot_length(self.size, self.chunk_size, i)

    def is_zero(self, i: int) -> bool:
        """Whether slot ``i`` is all zeros (stored as nothing)."""
        return self.ids[i] == ZERO_ID and (i not in self.table.patches or self.table.is_zero(i))

    def cache_key(self, i: int) -> bytes:
        """The key slot ``i``'s bytes are cached under: its chunk id, or for a patched slot a key
        of this point's own."""
        return self._key + i.to_bytes(8, "little") if i in self.table.patches else self.ids[i]

    def chunk(self, i: int) -> bytes:
        """The plaintext of slot ``i``: its chunk, with any patches laid over it."""
        length = self.chunk_length(i)
        patches = self.table.patches.get(i)
        if not patches:
            return self.archive.read_chunk(self.ids[i], length)
        cache = self.archive.cache
        key = self.cache_key(i)
        data = cache.get(key)
        if data is not None:
            return data
        out = bytearray(self.archive.read_chunk(self.ids[i], length))
        for p in patches:
            if p.chunk_id == ZERO_ID:
                out[p.offset:p.offset + p.length] = bytes(p.length)
            else:
                src = self.archive.read_chunk(p.chunk_id, p.chunk_length)
                out[p.offset:p.offset + p.length] = memoryview(src)[p.chunk_offset:p.chunk_offset + p.length]
        data = bytes(out)
        cache.put(key, data)
        return data

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; ranges past the end are an error."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"read of {length} bytes at {offset} is outside the point's {self.size} bytes")
        cs = self.chunk_size
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            i, inner = divmod(pos, cs)
            take = min(cs - inner, end - pos)
            if self.is_zero(i):
                parts.append(bytes(take))
            else:
                data = self.chunk(i)
                parts.append(data if inner == 0 and take == len(data) else data[inner:inner + take])
            pos += take
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def extents(self) -> Iterator[tuple[int, int, bool]]:
        """Runs of ``(offset, length, is_zero)`` covering the whole point, adjacent runs merged."""
        cs = self.chunk_size
        start, zero = 0, None
        for i in range(self.count):
            z = self.is_zero(i)
            if zero is None:
                zero = z
            elif z != zero:
                yield start, i * cs - start, zero
                start, zero = i * cs, z
        if zero is not None:
            yield start, self.size - start, zero
