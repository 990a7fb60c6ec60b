"""Demand-first hydration: copy a volume into a local disk while serving it, then serve the disk.

``--hydrate-to PATH`` makes recovery independent of the archive: a background thread copies the
point chunk by chunk into PATH (a new sparse file, or a block device), while blocks that clients
read or write are copied first, on demand, and the background copy pauses while they are. Writes
land in PATH. When every chunk is there, PATH is the point plus the writes and the archive is no
longer read.

Progress is kept in ``PATH.hydrate`` so hydration resumes after a restart. Format, version 1
(little-endian)::

    offset 0   header, 4096 bytes: magic "LBHYD001" | u32 version=1 | u32 header size=4096
               | u32 chunk size | u32 flags=0 | u64 virtual size | u64 bitmap offset=4096
               | u64 bitmap length | u32 JSON length | JSON identity {"archive", "machine",
               "point", "size", "target"} ... zero padding ... | u32 CRC-32 of bytes 0..4091
    4096       bitmap: bit i (LSB first) set = chunk i of PATH is final (copied from the point,
               or written by a client after it was copied). All bits set = hydration complete.

Write order: the state file is created (temporary name, fsync, rename) before PATH; a chunk's
bit is set only after its bytes are written to PATH, and bits reach the state file only after
PATH is fdatasynced (every second in the background, and on every FLUSH/FUA, so flushed client
writes are never overwritten by a later re-copy of their chunk).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from lifeboat.archive.durable import create_durably, fsync_dir, pwrite_all
from lifeboat.archive.errors import FormatError, StorageError
from lifeboat.archive.formats import slot_length
from lifeboat.nbdserver.overlay import clip, merge
from lifeboat.nbdserver.storage import (
    PAGE,
    Bitmap,
    ceil_div,
    data_runs,
    lock_file,
    punch_hole,
    round_up,
    write_zeros,
)
from lifeboat.nbdserver.volume import ZERO_FLAGS, Extents, Volume, VolumeError
from lifeboat.plumbing import nbd as P
from lifeboat.plumbing.errors import UsageError

MAGIC = b"LBHYD001"
VERSION = 1
HEADER_SIZE = 4096
HEADER = struct.Struct("<8sIIIIQQQI")
STATE_SUFFIX = ".hydrate"
PERSIST_EVERY = 1.0  # seconds between progress checkpoints
ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)


def state_path(target: str | os.PathLike[str]) -> Path:
    """Where the progress bitmap of a hydration target lives."""
    return Path(f"{os.fspath(target)}{STATE_SUFFIX}")


def hydration_progress(target: str | os.PathLike[str]) -> tuple[int, int]:
    """(chunks copied, chunks in all) from the state file of a hydration to ``target``;
    (0, 1) while it does not exist or cannot be read. Other processes (the runbook engine)
    watch a running ``lifeboat serve --hydrate-to`` through this."""
    path = state_path(target)
    try:
        with open(path, "rb") as f:
            chunk, size, bm_off, bm_len, _ = _parse_header(path, f.read(HEADER_SIZE))
            total = ceil_div(size, max(chunk, 1))
            f.seek(bm_off)
            bits = f.read(min(bm_len, ceil_div(total, 8)))
    except (OSError, FormatError):
        return 0, 1
    done = sum(bin(b).count("1") for b in bits)
    return min(done, total), max(total, 1)


def _encode_header(chunk: int, size: int, identity: dict[str, Any]) -> tuple[bytes, int]:
    bm_len = round_up(ceil_div(ceil_div(size, chunk), 8), PAGE)
    ident = json.dumps(identity, sort_keys=True).encode()
    head = HEADER.pack(MAGIC, VERSION, HEADER_SIZE, chunk, 0, size, HEADER_SIZE, bm_len, len(ident))
    if len(head) + len(ident) > HEADER_SIZE - 4:
        raise UsageError("hydration target path is too long")
    body = (head + ident).ljust(HEADER_SIZE - 4, b"\0")
    return body + struct.pack("<I", zlib.crc32(body)), bm_len


def _parse_header(path: Path, raw: bytes) -> tuple[int, int, int, int, dict[str, Any]]:
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise FormatError(f"hydration state {path}: not a lifeboat hydration state (bad magic)")
    if zlib.crc32(raw[: HEADER_SIZE - 4]) != struct.unpack_from("<I", raw, HEADER_SIZE - 4)[0]:
        raise FormatError(f"hydration state {path}: header checksum mismatch")
    _, version, hsize, chunk, _flags, size, bm_off, bm_len, jlen = HEADER.unpack_from(raw)
    if version != VERSION or hsize != HEADER_SIZE or bm_len * 8 < -(-size // max(chunk, 1)):
        raise FormatError(f"hydration state {path}: unsupported or inconsistent header")
    try:
        identity = json.loads(raw[HEADER.size : HEADER.size + jlen])
    except ValueError as e:
        raise FormatError(f"hydration state {path}: identity is not JSON ({e})") from None
    return chunk, size, bm_off, bm_len, identity


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class HydrateVolume(Volume):
    """Serves ``base`` through a local copy at ``target`` that a background thread completes.

    Lifecycle: construct (opens or creates target and state, validates identity), ``start()``
    the background copy, serve, ``close()`` (stops the copy, persists progress).
    """

    def __init__(self, base: Volume, target: str | os.PathLike[str], identity: dict[str, Any], *,
                 chunk_size: int, writable: bool, progress: ProgressCallback | None = None,
                 log: Callable[[str], None] = _log) -> None:
        self.base = base
        self.size = base.size
        self.target = Path(target)
        self.state = state_path(target)
        self.chunk = chunk_size
        self.writable = writable
        self.progress = progress
        self.log = log
        self.nchunks = -(-self.size // chunk_size)
        identity = dict(identity, target=str(self.target.resolve()))
        self._open(identity)
        self.description = f"{base.description} (hydrating to {self.target})".strip()
        self._lock = threading.Lock()
        self._claims: dict[int, Future[bool]] = {}
        self._flush_lock = threading.Lock()
        self._cond = threading.Condition()
        self._demand = 0
        self._hint = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.error: BaseException | None = None
        self.finished = threading.Event()
        if self.bitmap.full:
            self.finished.set()

    # -- opening -----------------------------------------------------------------------------
    def _open(self, identity: dict[str, Any]) -> None:
        target, state = self.target, self.state
        if not state.exists():
            if target.exists() and not stat.S_ISBLK(target.stat().st_mode) and target.stat().st_size > 0:
                raise UsageError(
                    f"--hydrate-to {target}: the file exists and has no {state.name} beside it; "
                    "lifeboat only writes files it created (remove it or choose another path)"
                )
            if not target.parent.is_dir():
                raise UsageError(f"--hydrate-to {target}: folder {target.parent} does not exist")
            header, bm_len = _encode_header(self.chunk, self.size, identity)
            tmp = state.with_name(f".{state.name}.new-{secrets.token_hex(4)}")
            try:
                create_durably(state, tmp, header + bytes(bm_len))
            except OSError as e:
                raise StorageError(f"--hydrate-to {target}: cannot create {state}: {e.strerror}") from None
        try:
            self.state_fd = os.open(state, os.O_RDWR)
        except OSError as e:
            raise StorageError(f"hydration state {state}: {e.strerror}") from None
        try:
            lock_file(self.state_fd, f"hydration target {target}")
            raw = os.pread(self.state_fd, HEADER_SIZE, 0)
            chunk, size, self.bitmap_offset, bm_len, ident = _parse_header(state, raw)
            mine = {k: ident.get(k) for k in identity if k != "target"}
            wanted = {k: v for k, v in identity.items() if k != "target"}
            if chunk != self.chunk or size != self.size or mine != wanted:
                raise UsageError(
                    f"--hydrate-to {target}: {state.name} belongs to {ident.get('machine')}@{ident.get('point')}, "
                    f"not to {identity.get('machine')}@{identity.get('point')} (remove both files to start over)"
                )
            self.bitmap = Bitmap(self.nchunks, os.pread(self.state_fd, bm_len, self.bitmap_offset))
            if not target.exists():
                if self.bitmap.count:
                    raise UsageError(f"--hydrate-to {target}: the target is gone but {state.name} records progress "
                                     "(remove it to start over)")
                fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                os.ftruncate(fd, self.size)
                os.fsync(fd)
                fsync_dir(target.parent)
            else:
                fd = os.open(target, os.O_RDWR)
            self.fd = fd
            st = os.fstat(fd)
            self.regular = stat.S_ISREG(st.st_mode)
            if self.regular and st.st_size < self.size:
                os.ftruncate(fd, self.size)
            elif not self.regular and os.lseek(fd, 0, os.SEEK_END) < self.size:
                raise UsageError(f"--hydrate-to {target}: the device is smaller than the point ({self.size} bytes)")
        except BaseException:
            os.close(self.state_fd)
            raise

    # -- background copy ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the background copy (a no-op when already complete)."""
        done = self.bitmap.count * self.chunk
        if self.finished.is_set():
            self.log(f"hydration of {self.target} is complete: serving it")
            return
        if done:
            self.log(f"hydration of {self.target}: resuming at {min(done, self.size)} of {self.size} bytes")
        self._thread = threading.Thread(target=self._run, name="hydrate", daemon=True)
        self._thread.start()

    def _report(self) -> None:
        if self.progress:
            self.progress(min(self.bitmap.count * self.chunk, self.size), self.size)

    def _run(self) -> None:
        last_persist = time.monotonic()
        failures = 0
        self._report()
        while not self._stop.is_set():
            with self._cond:
                while self._demand and not self._stop.is_set():
                    self._cond.wait(0.05)
            if self._stop.is_set():
                break
            i = self.bitmap.first_clear(self._hint)
            if i is None:
                i = self.bitmap.first_clear(0)
            if i is None:
                break
            try:
                self._ensure(i, background=True)
                failures = 0
            except Exception as e:  # noqa: BLE001 - logged; retried, then given up on
                failures += 1
                self.log(f"hydration of {self.target}: chunk {i} failed ({e}); retrying")
                if failures >= 5:
                    self.error = e
                    self.log(f"hydration of {self.target} stopped: {e} (the export stays up, reading the archive)")
                    return
                self._stop.wait(min(2.0**failures * 0.1, 5))
                continue
            self._hint = i + 1
            now = time.monotonic()
            if now - last_persist >= PERSIST_EVERY:
                last_persist = now
                self._checkpoint()
        if self.bitmap.full and not self._stop.is_set():
            self._checkpoint()
            self.finished.set()
            self.log(f"hydration of {self.target} complete: serving it, the archive is no longer read")

    def _checkpoint(self) -> None:
        try:
            self.flush()
        except OSError as e:
            self.log(f"hydration of {self.target}: cannot save progress ({e.strerror})")
        self._report()

    # -- per-chunk claims --------------------------------------------------------------------
    def _claim(self, i: int) -> Future[bool] | None:
        """None when chunk ``i`` is final; else a claim the caller fills and ``_release``s."""
        while True:
            with self._lock:
                if self.bitmap[i]:
                    return None
                fut = self._claims.get(i)
                if fut is None:
                    fut = self._claims[i] = Future()
                    return fut
            fut.exception()  # another thread holds the claim: wait, then look again

    def _release(self, i: int, fut: Future[bool], ok: bool) -> None:
        with self._lock:
            if ok:
                with self.bitmap.lock:
                    self.bitmap.set(i)
            del self._claims[i]
        fut.set_result(ok)

    def _range(self, i: int) -> tuple[int, int]:
        return i * self.chunk, slot_length(self.size, self.chunk, i)

    def _zero_target(self, offset: int, length: int, keep_allocated: bool = False) -> None:
        if self.regular:
            punch_hole(self.fd, offset, length, keep_allocated=keep_allocated)
        else:
            write_zeros(self.fd, offset, length)

    def _ensure(self, i: int, background: bool = False) -> None:
        """Copy chunk ``i`` from the base unless it is already final."""
        claim = self._claim(i)
        if claim is None:
            return
        ok = False
        try:
            start, n = self._range(i)
            if self.base.reads_zero(start, n):
                self._zero_target(start, n)
            else:
                data = self.base.read_background(start, n) if background else self.base.read(start, n)
                pwrite_all(self.fd, [data], start)
            ok = True
        finally:
            self._release(i, claim, ok)

    def _demand_chunks(self, first: int, last: int) -> None:
        """Copy chunks now, ahead of the background stream, which waits meanwhile."""
        with self._cond:
            self._demand += 1
        try:
            if last > first:
                self.base.cache(first * self.chunk, (last - first + 1) * self.chunk)
            for i in range(first, last + 1):
                self._ensure(i)
        finally:
            with self._cond:
                self._demand -= 1
                self._cond.notify_all()
        self._hint = last + 1

    # -- reads -------------------------------------------------------------------------------
    def _span(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.chunk, (offset + length - 1) // self.chunk

    def read_fast(self, offset: int, length: int) -> bytes | None:
        if length == 0:
            return b""
        c0, c1 = self._span(offset, length)
        if self.bitmap.all_in(c0, c1):
            return os.pread(self.fd, length, offset)
        return None

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        c0, c1 = self._span(offset, length)
        if not self.bitmap.all_in(c0, c1):
            self._demand_chunks(c0, c1)
        return os.pread(self.fd, length, offset)

    def reads_zero(self, offset: int, length: int) -> bool:
        c0, c1 = self._span(offset, length)
        return not self.bitmap.any_in(c0, c1) and self.base.reads_zero(offset, length)

    def extents(self, offset: int, length: int) -> Extents:
        c0, c1 = self._span(offset, length)
        out: Extents = []
        end = offset + length
        pos = offset
        i = c0
        while i <= c1:
            done = self.bitmap[i]
            j = i
            while j + 1 <= c1 and self.bitmap[j + 1] == done:
                j += 1
            stop = min(end, (j + 1) * self.chunk)
            n = stop - pos
            if done:
                out.extend((ln, ZERO_FLAGS if hole else 0) for _, ln, hole in data_runs(self.fd, pos, n))
            else:
                out.extend(clip(self.base.extents(pos, n), n))
            pos, i = stop, j + 1
        return merge(out)

    def cache(self, offset: int, length: int) -> None:
        c0, _ = self._span(offset, length)
        if not self.bitmap[c0]:
            self._hint = c0
        self.base.cache(offset, length)

    # -- writes ------------------------------------------------------------------------------
    def can_write(self) -> bool:
        return self.writable

    def can_fast_zero(self) -> bool:
        return self.writable and self.regular

    def _check_writable(self) -> None:
        if not self.writable:
            raise VolumeError(P.EPERM, "the export is read-only")

    def _each_chunk(self, offset: int, length: int,
                    apply: Callable[[int, int], None], *, whole_only: bool = False) -> None:
        """Run ``apply(offset, length)`` per chunk piece: a chunk covered whole is claimed (no
        copy needed), one covered in part is copied first."""
        end = offset + length
        c0, c1 = self._span(offset, length)
        for i in range(c0, c1 + 1):
            start, n = self._range(i)
            lo, hi = max(offset, start), min(end, start + n)
            whole = lo == start and hi == start + n
            if whole:
                claim = self._claim(i)
                if claim is not None:
                    ok = False
                    try:
                        apply(lo, hi - lo)
                        ok = True
                    finally:
                        self._release(i, claim, ok)
                    continue
            elif whole_only:
                continue
            else:
                self._demand_chunks(i, i)
            apply(lo, hi - lo)

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self._check_writable()
        view = memoryview(data)

        def put(off: int, n: int) -> None:
            pwrite_all(self.fd, [view[off - offset : off - offset + n]], off)

        self._each_chunk(offset, len(data), put)
        if fua:
            self.flush()

    def zero(self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool) -> None:
        self._check_writable()
        if fast:
            c0, c1 = self._span(offset, length)
            partial = [c for c in {c0, c1} if not self.bitmap[c]
                       and (offset > c * self.chunk or offset + length < min((c + 1) * self.chunk, self.size))]
            if not self.regular or partial:
                raise VolumeError(P.ENOTSUP, "zeroing here is not faster than writing")
        self._each_chunk(offset, length, lambda off, n: self._zero_target(off, n, keep_allocated=not may_trim))
        if fua:
            self.flush()

    def trim(self, offset: int, length: int, *, fua: bool) -> None:
        self._check_writable()
        self._each_chunk(offset, length, lambda off, n: self._zero_target(off, n), whole_only=True)
        if fua:
            self.flush()

    def flush(self) -> None:
        """fdatasync PATH, then write the changed bitmap pages to the state file and sync it."""
        with self._flush_lock:
            self.bitmap.persist(self.fd, self.state_fd, self.bitmap_offset)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        try:
            self.flush()
        finally:
            os.close(self.fd)
            os.close(self.state_fd)
            self.base.close()


