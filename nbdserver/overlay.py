"""Copy-on-write overlay: a writable export over a read-only volume, in one sparse local file.

Kept next to a local archive as ``<archive>/overlays/<machine>-<point>.cow`` (``--overlay PATH``
elsewhere); the archive itself is never written. The file survives server restarts: a machine
booted from an export keeps its writes until the overlay is deleted.

File format, version 1 (all integers little-endian)::

    offset 0      header, 4096 bytes:
                    magic "LBCOW001" | u32 version=1 | u32 header size=4096 | u32 cluster size
                    | u32 flags=0 | u64 virtual size | u64 bitmap offset | u64 bitmap length
                    | u64 data offset | u32 JSON length | JSON identity {"archive", "machine",
                    "point", "size"} ... zero padding ... | u32 CRC-32 of bytes 0..4091 at 4092
    4096          bitmap: bit c (byte c // 8, bit c % 8, LSB first) set = cluster c lives in the
                  overlay; its length is rounded up to 4096
    data offset   (a multiple of 1 MiB) the virtual disk, byte for byte: cluster c at
                  data offset + c * cluster size. Only clusters in the bitmap are meaningful;
                  a hole inside one reads as zeros (that is how TRIM/WRITE_ZEROES are stored).

Write order (what makes a crash safe): the header and empty bitmap are written to a temporary
file that is fsynced and renamed into place, so an overlay exists whole or not at all. Data is
written to a cluster before its bit is set in memory; a flush (NBD FLUSH, FUA, shutdown)
fdatasyncs the data, then writes the changed bitmap pages, then fdatasyncs again. Bits are
only ever set, so a torn bitmap page can only lose bits whose data was not flushed, which NBD
allows. A partial write to a cluster not yet in the overlay copies the rest of the cluster
from below first (read-modify-write, under the volume's write lock).
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

from lifeboat.archive.durable import create_durably, pwrite_all
from lifeboat.archive.errors import FormatError, StorageError
from lifeboat.nbdserver.storage import PAGE, Bitmap, ceil_div, data_runs, lock_file, punch_hole, round_up
from lifeboat.nbdserver.volume import ZERO_FLAGS, Extents, Volume, VolumeError
from lifeboat.plumbing import nbd as P
from lifeboat.plumbing.errors import UsageError

MAGIC = b"LBCOW001"
VERSION = 1
HEADER_SIZE = 4096
HEADER = struct.Struct("<8sIIIIQQQQI")
DEFAULT_CLUSTER = 64 * 1024
DATA_ALIGN = 1024 * 1024
MAX_EXTENT_SCAN = 1 << 30  # BLOCK_STATUS looks at most this far per request (clients ask again)


def encode_header(cluster: int, size: int, identity: dict[str, Any]) -> tuple[bytes, int, int, int]:
    """Header bytes and the (bitmap offset, bitmap length, data offset) they describe."""
    bitmap_len = round_up(ceil_div(ceil_div(size, cluster), 8), PAGE)
    data_off = round_up(HEADER_SIZE + bitmap_len, DATA_ALIGN)
    ident = json.dumps(identity, sort_keys=True).encode()
    head = HEADER.pack(MAGIC, VERSION, HEADER_SIZE, cluster, 0, size, HEADER_SIZE, bitmap_len, data_off, len(ident))
    if len(head) + len(ident) > HEADER_SIZE - 4:
        raise UsageError("overlay identity is too long")
    body = (head + ident).ljust(HEADER_SIZE - 4, b"\0")
    return body + struct.pack("<I", zlib.crc32(body)), HEADER_SIZE, bitmap_len, data_off


def parse_header(path: Path, raw: bytes) -> tuple[int, int, int, int, int, dict[str, Any]]:
    """(cluster, size, bitmap offset, bitmap length, data offset, identity) of an overlay."""
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise FormatError(f"overlay {path}: not a lifeboat overlay (bad magic)")
    if zlib.crc32(raw[: HEADER_SIZE - 4]) != struct.unpack_from("<I", raw, HEADER_SIZE - 4)[0]:
        raise FormatError(f"overlay {path}: header checksum mismatch")
    _, version, hsize, cluster, _flags, size, bm_off, bm_len, data_off, jlen = HEADER.unpack_from(raw)
    if version != VERSION or hsize != HEADER_SIZE:
        raise FormatError(f"overlay {path}: version {version} is not supported")
    if cluster < 512 or cluster & (cluster - 1) or bm_len * 8 < -(-size // cluster) or data_off < bm_off + bm_len:
        raise FormatError(f"overlay {path}: inconsistent header")
    try:
        identity = json.loads(raw[HEADER.size : HEADER.size + jlen])
    except ValueError as e:
        raise FormatError(f"overlay {path}: identity is not JSON ({e})") from None
    return cluster, size, bm_off, bm_len, data_off, identity


def create_overlay(path: Path, size: int, identity: dict[str, Any], cluster: int = DEFAULT_CLUSTER) -> None:
    """Create an empty overlay atomically (temporary file, fsync, rename)."""
    header, bm_off, bm_len, data_off = encode_header(cluster, size, identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    create_durably(path, path.with_name(f".{path.name}.new-{secrets.token_hex(4)}"), header, data_off + size)


class CowVolume(Volume):
    """Writes go to the overlay file; reads come from it where written, from ``base`` elsewhere."""

    def __init__(self, base: Volume, path: str | os.PathLike[str], identity: dict[str, Any], *,
                 cluster: int = DEFAULT_CLUSTER) -> None:
        self.base = base
        self.path = Path(path)
        self.size = base.size
        try:
            if not self.path.exists():
                create_overlay(self.path, base.size, identity, cluster)
            self.fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise StorageError(f"overlay {self.path}: {e.strerror}") from None
        try:
            lock_file(self.fd, f"overlay {self.path}")
            raw = os.pread(self.fd, HEADER_SIZE, 0)
            self.cluster, size, self.bitmap_offset, bm_len, self.data_offset, ident = parse_header(self.path, raw)
            if size != base.size or {k: ident.get(k) for k in identity} != identity:
                raise UsageError(
                    f"overlay {self.path} belongs to {ident.get('machine')}@{ident.get('point')} "
                    f"({ident.get('size')} bytes), not to {identity.get('machine')}@{identity.get('point')}: "
                    "remove it or choose another --overlay"
                )
            nclusters = -(-size // self.cluster)
            self.bitmap = Bitmap(nclusters, os.pread(self.fd, bm_len, self.bitmap_offset))
        except BaseException:
            os.close(self.fd)
            raise
        self.preferred_block = self.cluster
        self.description = f"{base.description} (writable; overlay {self.path})".strip()
        self._wlock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._closed = False

    # -- capabilities ------------------------------------------------------------------------
    def can_write(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return True

    # -- reads -------------------------------------------------------------------------------
    def _span(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.cluster, (offset + length - 1) // self.cluster

    def _pread(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, self.data_offset + offset)

    def read_fast(self, offset: int, length: int) -> bytes | None:
        if length == 0:
            return b""
        c0, c1 = self._span(offset, length)
        bm = self.bitmap
        if not bm.any_in(c0, c1):
            return self.base.read_fast(offset, length)
        if bm.all_in(c0, c1):
            return self._pread(offset, length)
        return self._mixed(offset, length, fast=True)

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        c0, c1 = self._span(offset, length)
        bm = self.bitmap
        if not bm.any_in(c0, c1):
            return self.base.read(offset, length)
        if bm.all_in(c0, c1):
            return self._pread(offset, length)
        return self._mixed(offset, length, fast=False) or b""

    def read_background(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        c0, c1 = self._span(offset, length)
        if not self.bitmap.any_in(c0, c1):
            return self.base.read_background(offset, length)
        return b"".join(self._pread(off, n) if mine else self.base.read_background(off, n)
                        for off, n, mine in self._runs(offset, length))

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, in_overlay)`` runs covering the range."""
        cl = self.cluster
        end = offset + length
        c0, c1 = self._span(offset, length)
        bm = self.bitmap
        runs: list[tuple[int, int, bool]] = []
        start, state = offset, bm[c0]
        for c in range(c0 + 1, c1 + 1):
            s = bm[c]
            if s != state:
                runs.append((start, c * cl - start, state))
                start, state = c * cl, s
        runs.append((start, end - start, state))
        return runs

    def _mixed(self, offset: int, length: int, fast: bool) -> bytes | None:
        parts = []
        for off, n, mine in self._runs(offset, length):
            if mine:
                parts.append(self._pread(off, n))
            else:
                data = self.base.read_fast(off, n) if fast else self.base.read(off, n)
                if data is None:
                    return None
                parts.append(data)
        return b"".join(parts)

    def reads_zero(self, offset: int, length: int) -> bool:
        c0, c1 = self._span(offset, length)
        return not self.bitmap.any_in(c0, c1) and self.base.reads_zero(offset, length)

    def extents(self, offset: int, length: int) -> Extents:
        length = min(length, MAX_EXTENT_SCAN)
        if self.bitmap.count == 0:
            return self.base.extents(offset, length)
        out: Extents = []
        for off, n, mine in self._runs(offset, length):
            if mine:
                runs = [(ln, ZERO_FLAGS if hole else 0) for _, ln, hole in
                        data_runs(self.fd, self.data_offset + off, n)]
            else:
                runs = clip(self.base.extents(off, n), n)
            out.extend(runs)
        return merge(out)

    def cache(self, offset: int, length: int) -> None:
        self.base.cache(offset, length)

    # -- writes ------------------------------------------------------------------------------
    def _cluster_range(self, c: int) -> tuple[int, int]:
        start = c * self.cluster
        return start, min(self.cluster, self.size - start)

    def _partials(self, offset: int, length: int) -> list[int]:
        """Clusters the range covers only in part and that are not in the overlay yet."""
        end = offset + length
        c0, c1 = self._span(offset, length)
        out = []
        for c in {c0, c1}:
            start, n = self._cluster_range(c)
            if (offset > start or end < start + n) and not self.bitmap[c]:
                out.append(c)
        return sorted(out)

    def _fill_partials(self, partials: list[int], below: dict[int, bytes]) -> None:
        """Copy clusters up from below (caller holds the write lock)."""
        for c in partials:
            if self.bitmap[c]:
                continue  # another write copied it while we fetched
            start, _ = self._cluster_range(c)
            pwrite_all(self.fd, [below[c]], self.data_offset + start)

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        length = len(data)
        if length == 0:
            return
        partials = self._partials(offset, length)
        below = {c: self.base.read(*self._cluster_range(c)) for c in partials}
        c0, c1 = self._span(offset, length)
        with self._wlock:
            self._fill_partials(partials, below)
            pwrite_all(self.fd, [data], self.data_offset + offset)
            self.bitmap.set_range(c0, c1)
        if fua:
            self.flush()

    def zero(self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool) -> None:
        if length == 0:
            return
        partials = self._partials(offset, length)
        if fast and any(self.base.read_fast(*self._cluster_range(c)) is None for c in partials):
            raise VolumeError(P.ENOTSUP, "zeroing part of a cluster needs a slow copy-up")
        below = {c: self.base.read(*self._cluster_range(c)) for c in partials}
        c0, c1 = self._span(offset, length)
        with self._wlock:
            self._fill_partials(partials, below)
            punch_hole(self.fd, self.data_offset + offset, length, keep_allocated=not may_trim)
            self.bitmap.set_range(c0, c1)
        if fua:
            self.flush()

    def trim(self, offset: int, length: int, *, fua: bool) -> None:
        cl = self.cluster
        first = -(-offset // cl)
        end = offset + length
        last = (end // cl if end < self.size else -(-end // cl)) - 1
        if last < first:
            return  # no whole cluster: TRIM is only a hint
        start = first * cl
        stop = min((last + 1) * cl, self.size)
        with self._wlock:
            punch_hole(self.fd, self.data_offset + start, stop - start)
            self.bitmap.set_range(first, last)
        if fua:
            self.flush()

    def flush(self) -> None:
        """fdatasync the data, then persist the changed bitmap pages, then fdatasync again."""
        with self._flush_lock:
            self.bitmap.persist(self.fd, self.fd, self.bitmap_offset)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            os.close(self.fd)
            self.base.close()


def clip(extents: Extents, length: int) -> Extents:
    """Extents cut to cover at most ``length`` bytes."""
    out: Extents = []
    left = length
    for n, flags in extents:
        if left <= 0:
            break
        out.append((min(n, left), flags))
        left -= n
    return out


def merge(extents: Extents) -> Extents:
    """Adjacent extents with the same flags joined."""
    out: Extents = []
    for n, flags in extents:
        if n <= 0:
            continue
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        else:
            out.append((n, flags))
    return out
