"""qcow2 version 3: the exporter and the reader (import).

Why its own module: qcow2 is KVM/OpenStack's native format; the exporter streams a point into
one without an intermediate raw file, the reader lets ``lifeboat backup`` import one.

Layout written (qemu ``docs/interop/qcow2.txt``; all integers big-endian; cluster 64 KiB)::

    cluster 0            header (104 bytes + compression_type/padding = 112), then an all-zero
                         header-extension end marker
    clusters 1..D        data clusters, in (nearly) guest order: each worker thread reserves the
                         next host clusters for its unit and writes them itself; all-zero
                         clusters are not stored
    D+1..                one L2 table (8192 x u64) per 512 MiB of guest space holding data
    then                 the L1 table (ceil(size / 512 MiB) x u64, cluster aligned)
    then                 the refcount table and the refcount blocks (refcount_order 4: u16)

Every cluster of the file is used exactly once, so every refcount is 1 and the file has no
gaps; L1 and standard L2 entries carry the OFLAG_COPIED bit (1 << 63) that refcount 1 calls
for. Guest clusters that are zero inside an allocated L2 table get the v3 "reads as zero" flag
(bit 0) with no host offset; L2 tables with no data at all are left unallocated (L1 entry 0),
which reads as zeros since there is no backing file. The virtual size is the point's size
rounded up to 512 bytes; qemu's limit with 64 KiB clusters (an L1 table of at most 32 MiB) is
2 PiB.

The reader accepts versions 2 and 3, any cluster size from 512 B to 2 MiB, zero clusters,
deflate- and zstd-compressed clusters, and the dirty bit; it refuses backing files, encryption,
external data files, extended L2 entries, and an image marked corrupt. It reads what
``qemu-img`` reads, or refuses: on open it checks what qemu checks (header extensions within
cluster 0, the refcount, L1 and snapshot tables' offsets and sizes, the bitmaps extension), an
L2 entry is refused where qemu calls the image corrupt (the v3-only "reads as zeros" bit in a
version 2 image, an unaligned host offset even on a zero cluster), compressed clusters inflate
with qemu's 4 KiB window, and the virtual size is whole sectors, as qemu sees it.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import ClassVar

from lifeboat.archive.durable import pwrite_all
from lifeboat.exporters.base import (
    SECTOR,
    Exporter,
    MiB,
    PointSource,
    Progress,
    UnitPipeline,
    UnsupportedImage,
    nonzero_clusters,
    round_up,
)
from lifeboat.exporters.source import SPECIAL, ZERO, ImageSource, TableCache

MAGIC = b"QFI\xfb"
# magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
# l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
# snapshots_offset, incompatible, compatible, autoclear, refcount_order, header_length
HEADER_V3 = struct.Struct(">4sIQIIQIIQQIIQQQQII")
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
HEADER_LENGTH = 112  # 104 + compression_type (1) + padding (7)
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
REFCOUNT_ORDER = 4  # 16-bit refcounts
REFS_PER_BLOCK = CLUSTER * 8 // (1 << REFCOUNT_ORDER)
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55
MAX_L1_BYTES = 32 * MiB  # qemu's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * MiB  # qemu's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOTS_BYTES = 1024 * MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA = 1024
# l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec, vm_clock_nsec,
# vm_state_size, extra_data_size
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_CRYPTO = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441
BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, directory offset
AUTOCLEAR_BITMAPS = 1 << 0
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 64 * MiB

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4


class Qcow2Exporter(Exporter):
    """qcow2 v3, 64 KiB clusters, 16-bit refcounts, uncompressed data clusters."""

    format: ClassVar[str] = "qcow2"
    qemu_format: ClassVar[str] = "qcow2"
    max_size: ClassVar[int] = (MAX_L1_BYTES // 8) * L2_ENTRIES * CLUSTER  # 2 PiB
    description: ClassVar[str] = "qcow2 (64 KiB clusters)"

    def _write(self, reader: PointSource, fd: int, progress: Progress) -> None:
        vsize = self.virtual_size(reader.size)
        guest_clusters = -(-vsize // CLUSTER)
        unit = max(reader.chunk_size, 1 * MiB)
        per_unit = unit // CLUSTER
        l2_tables: dict[int, bytearray] = {}
        next_host = 1  # cluster 0 is the header

        lock = threading.Lock()

        def work(k: int, data: bytes) -> tuple[list[int], int]:
            """Find the unit's data clusters, reserve host clusters for them, write them."""
            nonlocal next_host
            clusters = nonzero_clusters(data, CLUSTER)
            if not clusters:
                return [], 0
            with lock:
                base = next_host
                next_host += len(clusters)
            pwrite_all(fd, [c for _, c in clusters], base * CLUSTER)
            return [k * per_unit + i for i, _ in clusters], base

        for _, (guest, base) in UnitPipeline(reader, unit, work, self.workers, progress):
            for j, g in enumerate(guest):
                table = l2_tables.get(g // L2_ENTRIES)
                if table is None:
                    table = l2_tables[g // L2_ENTRIES] = new_l2(g // L2_ENTRIES, guest_clusters)
                struct.pack_into(">Q", table, (g % L2_ENTRIES) * 8, ((base + j) * CLUSTER) | OFLAG_COPIED)

        header, tail, total = metadata(l2_tables, next_host, vsize)
        pwrite_all(fd, tail, next_host * CLUSTER)
        pwrite_all(fd, [header], 0)
        os.ftruncate(fd, total * CLUSTER)


def new_l2(index: int, guest_clusters: int) -> bytearray:
    """An L2 table whose entries inside the disk read as zero (v3 zero flag)."""
    inside = min(L2_ENTRIES, guest_clusters - index * L2_ENTRIES)
    return bytearray(struct.pack(">Q", OFLAG_ZERO) * inside + bytes(8 * (L2_ENTRIES - inside)))


def metadata(l2_tables: dict[int, bytearray], next_host: int, vsize: int) -> tuple[bytes, list[bytes], int]:
    """What follows the data clusters (host clusters ``1 .. next_host - 1``): the header cluster's
    bytes, the tail written from cluster ``next_host`` on (L2 tables, L1 table, refcount table and
    blocks, contiguous), and the file's length in clusters."""
    guest_clusters = -(-vsize // CLUSTER)
    l1_size = -(-guest_clusters // L2_ENTRIES)
    tail: list[bytes] = []
    l1 = bytearray(l1_size * 8)
    for idx in sorted(l2_tables):
        tail.append(bytes(l2_tables[idx]))
        struct.pack_into(">Q", l1, idx * 8, (next_host * CLUSTER) | OFLAG_COPIED)
        next_host += 1
    l1_clusters = -(-len(l1) // CLUSTER)
    l1_offset = next_host * CLUSTER if l1_clusters else 0
    if l1:
        tail.append(bytes(l1) + bytes(l1_clusters * CLUSTER - len(l1)))
    next_host += l1_clusters

    # Refcount table + blocks must also count themselves: find the fixed point.
    rt_clusters = rb_count = 0
    while True:
        total = next_host + rt_clusters + rb_count
        need_rb = -(-total // REFS_PER_BLOCK)
        need_rt = -(-need_rb * 8 // CLUSTER)
        if (need_rb, need_rt) == (rb_count, rt_clusters):
            break
        rb_count, rt_clusters = need_rb, need_rt
    rt_offset = next_host * CLUSTER
    rb_first = next_host + rt_clusters
    table = bytearray(rt_clusters * CLUSTER)
    blocks = []
    full_block = b"\x00\x01" * REFS_PER_BLOCK
    for b in range(rb_count):
        struct.pack_into(">Q", table, b * 8, (rb_first + b) * CLUSTER)
        covered = min(REFS_PER_BLOCK, total - b * REFS_PER_BLOCK)
        blocks.append(full_block if covered == REFS_PER_BLOCK else b"\x00\x01" * covered + bytes(CLUSTER - 2 * covered))
    tail += [bytes(table), *blocks]

    header = HEADER_V3.pack(
        MAGIC, 3, 0, 0, CLUSTER_BITS, vsize, 0, l1_size, l1_offset, rt_offset, rt_clusters,
        0, 0, 0, 0, 0, REFCOUNT_ORDER, HEADER_LENGTH,
    )  # fmt: skip
    # compression_type 0 (zlib) + padding, then the header-extension end marker (type 0, length 0)
    return header + bytes(HEADER_LENGTH - len(header)) + bytes(8), tail, total


def qcow2_stream(reader: PointSource, chunk: int = 4 * MiB) -> Iterator[bytes]:
    """The same qcow2 layout as ``Qcow2Exporter``, written strictly front to back (to an upload,
    with no file): the header first needs the number of data clusters, so the clusters stored are
    those of the point's non-zero extents (its chunk map, known without reading: a zero cluster
    inside a non-zero chunk is stored, where the exporter leaves it out)."""
    vsize = round_up(reader.size, SECTOR)
    guest_clusters = -(-vsize // CLUSTER)
    runs: list[tuple[int, int]] = []  # (first guest cluster, end), in order, merged
    for offset, length, is_zero in reader.extents():
        if is_zero or length == 0:
            continue
        first, end = offset // CLUSTER, -(-(offset + length) // CLUSTER)
        if runs and runs[-1][1] >= first:
            runs[-1] = (runs[-1][0], max(end, runs[-1][1]))
        else:
            runs.append((first, end))
    l2_tables: dict[int, bytearray] = {}
    host = 1
    for first, end in runs:
        for g in range(first, end):
            table = l2_tables.get(g // L2_ENTRIES)
            if table is None:
                table = l2_tables[g // L2_ENTRIES] = new_l2(g // L2_ENTRIES, guest_clusters)
            struct.pack_into(">Q", table, (g % L2_ENTRIES) * 8, (host * CLUSTER) | OFLAG_COPIED)
            host += 1
    header, tail, _ = metadata(l2_tables, host, vsize)
    yield header + bytes(CLUSTER - len(header))
    step = max(CLUSTER, chunk // CLUSTER * CLUSTER)
    for first, end in runs:
        for start in range(first * CLUSTER, end * CLUSTER, step):
            length = min(step, end * CLUSTER - start)
            data = reader.read(start, max(0, min(length, reader.size - start)))
            yield data + bytes(length - len(data))  # the last cluster, padded past the point's end
    yield from tail


class Qcow2Image(ImageSource):
    """A qcow2 image (v2 or v3) read as a backup source."""

    format: ClassVar[str] = "qcow2"

    def _parse(self) -> None:
        head = self.pread(0, min(self.file_size, 4096), "header")
        if len(head) < HEADER_V2.size or head[:4] != MAGIC:
            raise self.fail("bad magic or header shorter than 72 bytes")
        version = struct.unpack_from(">I", head, 4)[0]
        if version not in (2, 3):
            raise UnsupportedImage(f"qcow2 image {self.name}: field version is {version}; only 2 and 3 exist")
        if version == 3:
            if len(head) < HEADER_V3.size:
                raise self.fail("header shorter than the 104 bytes of version 3")
            f = HEADER_V3.unpack_from(head)
            incompat, header_length = f[13], f[17]
            if header_length < 104 or header_length % 8 or header_length > len(head):
                raise self.fail(f"field header_length {header_length} is invalid")
        else:
            f = HEADER_V2.unpack_from(head) + (0, 0, 0, 4, 72)
            incompat, header_length = 0, 72
        (_, _, backing_offset, _, cluster_bits, size, crypt, l1_size, l1_offset, *_rest) = f
        if backing_offset:
            raise UnsupportedImage(
                f"qcow2 image {self.name} has a backing file; flatten it first "
                "(qemu-img convert -O qcow2 IMAGE FLAT.qcow2)"
            )
        if crypt:
            raise UnsupportedImage(f"qcow2 image {self.name} is encrypted (crypt_method {crypt})")
        if incompat & INCOMPAT_CORRUPT:
            raise UnsupportedImage(f"qcow2 image {self.name} is marked corrupt; repair it with qemu-img check -r all")
        if incompat & INCOMPAT_DATA_FILE:
            raise UnsupportedImage(f"qcow2 image {self.name} keeps its data in an external data file")
        if incompat & INCOMPAT_EXTL2:
            raise UnsupportedImage(f"qcow2 image {self.name} uses extended L2 entries (subclusters)")
        unknown = incompat & ~(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION)
        if unknown:
            raise UnsupportedImage(f"qcow2 image {self.name}: unknown incompatible_features bits {unknown:#x}")
        self.version = version
        self.compression = 0
        if incompat & INCOMPAT_COMPRESSION:
            if header_length < 105:
                raise self.fail("compression-type feature set but header_length has no compression_type field")
            self.compression = head[104]
            if self.compression not in (0, 1):
                raise UnsupportedImage(f"qcow2 image {self.name}: compression_type {self.compression} is unknown")
        if not 9 <= cluster_bits <= 21:
            raise self.fail(f"field cluster_bits {cluster_bits} is outside 9..21")
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.l2_entries = self.cluster_size // 8
        rt_offset, rt_clusters, nb_snapshots, snapshots_offset, _, _, autoclear, refcount_order = f[9:17]
        if header_length > self.cluster_size:
            raise self.fail(f"field header_length {header_length} is larger than a cluster")
        if refcount_order > 6:
            raise self.fail(f"field refcount_order {refcount_order} is over 6")
        if not rt_clusters:
            raise self.fail("field refcount_table_clusters is 0: the image has no reference count table")
        self._check_table(rt_offset, rt_clusters * self.cluster_size, MAX_REFTABLE_BYTES, "refcount_table_offset")
        if nb_snapshots > MAX_SNAPSHOTS:
            raise self.fail(f"field nb_snapshots {nb_snapshots} is over qemu's limit of {MAX_SNAPSHOTS}")
        snapshots_bytes = nb_snapshots * SNAPSHOT_HEADER.size
        self._check_table(snapshots_offset, snapshots_bytes, MAX_SNAPSHOTS_BYTES, "snapshots_offset")
        self._check_extensions(header_length, autoclear)
        self._check_snapshots(snapshots_offset, nb_snapshots)
        if size > (1 << 62):
            raise self.fail(f"field size {size} is too large")
        self.size = size - size % SECTOR  # qemu sees whole sectors only
        needed_l1 = -(-size // (self.cluster_size * self.l2_entries))
        if l1_size < needed_l1:
            raise self.fail(f"field l1_size {l1_size} is too small for size {size} (needs {needed_l1})")
        if l1_size * 8 > MAX_L1_BYTES:
            raise self.fail(f"field l1_size {l1_size} exceeds qemu's limit of {MAX_L1_BYTES // 8} entries")
        self._check_table(l1_offset, l1_size * 8, MAX_L1_BYTES, "l1_table_offset")
        if needed_l1 and l1_offset == 0:
            raise self.fail("field l1_table_offset is 0: the L1 table would overlap the header")
        raw = self.pread(l1_offset, needed_l1 * 8, "L1 table (l1_table_offset, l1_size)") if needed_l1 else b""
        self.l1 = struct.unpack(f">{needed_l1}Q", raw)
        self.l2_cache = TableCache(self._load_l2)
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1

    def _check_table(self, offset: int, length: int, limit: int, field: str) -> None:
        """A metadata table (offset, byte length) checked as qemu checks it on open."""
        if length > limit:
            raise self.fail(f"the table at {field} {offset} holds {length} bytes, over qemu's limit of {limit}")
        if offset % self.cluster_size or offset + length >= 2**63:
            raise self.fail(f"field {field} {offset} is not cluster aligned or out of range")

    def _check_extensions(self, start: int, autoclear: int) -> None:
        """Walk the header extensions (between the header and the end of cluster 0) as qemu
        does on open: a length past the end, or a bitmaps extension qemu refuses, is damage."""
        end = self.cluster_size
        head = os.pread(self.fd, end, 0).ljust(end, b"\0")  # qemu reads past the end as zeros
        offset = start
        while offset < end:
            if end - offset < 8:
                raise self.fail(f"header extension at {offset} is cut off by the end of cluster 0")
            magic, length = struct.unpack_from(">II", head, offset)
            offset += 8
            if length > end - offset:
                raise self.fail(f"header extension {magic:#x} at {offset - 8}: length {length} runs past cluster 0")
            if magic == 0:
                return
            if magic == EXT_BACKING_FORMAT and length >= 16:
                raise self.fail(f"backing format header extension: length {length} is too large")
            if magic == EXT_CRYPTO:
                raise self.fail("crypto header extension in an image that is not LUKS-encrypted")
            if magic == EXT_DATA_FILE:
                raise UnsupportedImage(f"qcow2 image {self.name} names an external data file")
            if magic == EXT_BITMAPS:
                self._check_bitmaps_ext(head[offset : offset + length], autoclear)
            offset += (length + 7) & ~7

    def _check_bitmaps_ext(self, ext: bytes, autoclear: int) -> None:
        """The persistent-bitmaps header extension, checked as qemu checks it (the bitmaps
        themselves are not read: they do not change what the disk holds)."""
        if len(ext) != BITMAPS_EXT.size:
            raise self.fail(f"bitmaps header extension: length {len(ext)} is not {BITMAPS_EXT.size}")
        if not autoclear & AUTOCLEAR_BITMAPS:
            return  # qemu ignores it: the bitmaps are stale
        count, reserved, dir_size, dir_offset = BITMAPS_EXT.unpack(ext)
        if reserved:
            raise self.fail("bitmaps header extension: reserved field is not zero")
        if not 0 < count <= MAX_BITMAPS:
            raise self.fail(f"bitmaps header extension: {count} bitmaps")
        if dir_size > MAX_BITMAP_DIRECTORY or dir_offset % self.cluster_size or dir_offset + dir_size >= 2**63:
            raise self.fail(f"bitmaps header extension: directory at {dir_offset} (+{dir_size} bytes) is invalid")

    def _check_snapshots(self, offset: int, count: int) -> None:
        """The internal snapshot table, parsed as far as qemu parses it on open (the snapshots
        themselves are not read: lifeboat imports the active disk)."""
        start = offset
        for i in range(count):
            raw = os.pread(self.fd, SNAPSHOT_HEADER.size, offset)
            sn = SNAPSHOT_HEADER.unpack(raw.ljust(SNAPSHOT_HEADER.size, b"\0"))
            l1_offset, l1_size, id_size, name_size, extra_size = sn[0], sn[1], sn[2], sn[3], sn[8]
            if extra_size > MAX_SNAPSHOT_EXTRA:
                raise self.fail(f"snapshot {i}: extra data size {extra_size} is over {MAX_SNAPSHOT_EXTRA}")
            offset += SNAPSHOT_HEADER.size + extra_size + id_size + name_size
            offset = (offset + 7) & ~7
            if offset - start > MAX_SNAPSHOTS_BYTES:
                raise self.fail(f"snapshot {i}: the snapshot table is too large")
            if l1_size * 8 > MAX_L1_BYTES or l1_offset % self.cluster_size:
                raise self.fail(f"snapshot {i}: its L1 table (offset {l1_offset}, {l1_size} entries) is invalid")

    def _load_l2(self, offset: int) -> tuple[int, ...]:
        raw = self.pread(offset, self.cluster_size, "L2 table")
        return struct.unpack(f">{self.l2_entries}Q", raw)

    def _l2_table(self, l1_index: int) -> tuple[int, ...] | None:
        """The L2 table of L1 entry ``l1_index``, or None where it is unallocated."""
        l2_offset = self.l1[l1_index] & OFFSET_MASK
        if not l2_offset:
            return None
        if l2_offset % self.cluster_size:
            raise self.fail(f"L1 entry {l1_index}: L2 table offset {l2_offset} is not cluster aligned")
        return self.l2_cache.get(l2_offset)

    def _entry(self, index: int) -> int:
        table = self._l2_table(index // self.l2_entries)
        return 0 if table is None else table[index % self.l2_entries]

    def _classify(self, index: int, e: int) -> int:
        """What L2 entry ``e`` of guest cluster ``index`` means, as qemu reads it: ``SPECIAL``
        (compressed), ``ZERO``, or the host offset; refused where qemu calls the image corrupt."""
        if e & OFLAG_COMPRESSED:
            return SPECIAL
        host = e & OFFSET_MASK
        if e & OFLAG_ZERO and self.version < 3:
            raise self.fail(f"L2 entry of guest cluster {index} has the 'reads as zeros' bit, which version 2 lacks")
        if host % self.cluster_size:
            raise self.fail(f"L2 entry of guest cluster {index}: host offset {host} is not cluster aligned")
        if e & OFLAG_ZERO or not host:
            return ZERO
        return host

    def _locate(self, index: int) -> int:
        return self._classify(index, self._entry(index))

    def _data_clusters(self) -> Iterator[int]:
        clusters = -(-self.size // self.cluster_size)
        seen: set[int] = set()  # L2 tables: one L1 entry each, so the walk is bounded by the file
        for i in range(len(self.l1)):
            table = self._l2_table(i)
            if table is None:
                continue
            l2_offset = self.l1[i] & OFFSET_MASK
            if l2_offset in seen:
                raise self.fail(f"L1 entry {i}: the L2 table at {l2_offset} is already used by another L1 entry")
            seen.add(l2_offset)
            base = i * self.l2_entries
            for j, e in enumerate(table[: clusters - base]):
                if e and self._classify(base + j, e) != ZERO:
                    yield base + j

    def _special(self, index: int) -> bytes:
        e = self._entry(index)
        host = e & self.coffset_mask
        sectors = ((e >> self.csize_shift) & self.csize_mask) + 1
        length = sectors * SECTOR - (host % SECTOR)
        length = min(length, max(0, self.file_size - host))
        data = self.pread(host, length, f"compressed cluster {index}")
        cs = self.cluster_size
        try:
            if self.compression == 0:
                out = zlib.decompressobj(-12).decompress(data, cs)  # qemu's window, 4 KiB
            else:
                import io

                import zstandard

                with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as stream:
                    out = stream.read(cs)
        except (zlib.error, Exception) as e:
            raise self.fail(f"compressed cluster {index} at offset {host} does not decompress ({e})") from None
        if len(out) != cs:
            raise self.fail(f"compressed cluster {index} at offset {host} holds {len(out)} bytes, not {cs}")
        return out


__all__ = ["Qcow2Image", "Qcow2Exporter", "round_up"]
