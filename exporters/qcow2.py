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
external data files, extended L2 entries, and an image marked corrupt.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
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
        l1_size = -(-guest_clusters // L2_ENTRIES)
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
                    table = l2_tables[g // L2_ENTRIES] = self._new_l2(g // L2_ENTRIES, guest_clusters)
                struct.pack_into(">Q", table, (g % L2_ENTRIES) * 8, ((base + j) * CLUSTER) | OFLAG_COPIED)

        l1 = bytearray(l1_size * 8)
        for idx in sorted(l2_tables):
            pwrite_all(fd, [bytes(l2_tables[idx])], next_host * CLUSTER)
            struct.pack_into(">Q", l1, idx * 8, (next_host * CLUSTER) | OFLAG_COPIED)
            next_host += 1
        l1_clusters = -(-len(l1) // CLUSTER)
        l1_offset = next_host * CLUSTER if l1_clusters else 0
        if l1:
            pwrite_all(fd, [bytes(l1)], l1_offset)
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
        full_block = b"\x00\x01" * REFS_PER_BLOCK
        for b in range(rb_count):
            struct.pack_into(">Q", table, b * 8, (rb_first + b) * CLUSTER)
            covered = min(REFS_PER_BLOCK, total - b * REFS_PER_BLOCK)
            block = full_block if covered == REFS_PER_BLOCK else b"\x00\x01" * covered + bytes(CLUSTER - 2 * covered)
            pwrite_all(fd, [block], (rb_first + b) * CLUSTER)
        pwrite_all(fd, [bytes(table)], rt_offset)

        header = HEADER_V3.pack(
            MAGIC, 3, 0, 0, CLUSTER_BITS, vsize, 0, l1_size, l1_offset, rt_offset, rt_clusters,
            0, 0, 0, 0, 0, REFCOUNT_ORDER, HEADER_LENGTH,
        )  # fmt: skip
        # compression_type 0 (zlib) + padding, then the header-extension end marker (type 0, length 0)
        pwrite_all(fd, [header, bytes(HEADER_LENGTH - len(header)), bytes(8)], 0)
        os.ftruncate(fd, total * CLUSTER)

    @staticmethod
    def _new_l2(index: int, guest_clusters: int) -> bytearray:
        """An L2 table whose entries inside the disk read as zero (v3 zero flag)."""
        inside = min(L2_ENTRIES, guest_clusters - index * L2_ENTRIES)
        return bytearray(struct.pack(">Q", OFLAG_ZERO) * inside + bytes(8 * (L2_ENTRIES - inside)))


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
        if size > (1 << 62):
            raise self.fail(f"field size {size} is too large")
        self.size = size
        needed_l1 = -(-size // (self.cluster_size * self.l2_entries))
        if l1_size < needed_l1:
            raise self.fail(f"field l1_size {l1_size} is too small for size {size} (needs {needed_l1})")
        if l1_size * 8 > MAX_L1_BYTES:
            raise self.fail(f"field l1_size {l1_size} exceeds qemu's limit of {MAX_L1_BYTES // 8} entries")
        if l1_offset % self.cluster_size or (needed_l1 and l1_offset == 0):
            raise self.fail(f"field l1_table_offset {l1_offset} is not cluster aligned")
        raw = self.pread(l1_offset, needed_l1 * 8, "L1 table (l1_table_offset, l1_size)") if needed_l1 else b""
        self.l1 = struct.unpack(f">{needed_l1}Q", raw)
        self.l2_cache = TableCache(self._load_l2)
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1

    def _load_l2(self, offset: int) -> tuple[int, ...]:
        raw = self.pread(offset, self.cluster_size, "L2 table")
        return struct.unpack(f">{self.l2_entries}Q", raw)

    def _entry(self, index: int) -> int:
        l1e = self.l1[index // self.l2_entries]
        l2_offset = l1e & OFFSET_MASK
        if not l2_offset:
            return 0
        if l2_offset % self.cluster_size:
            raise self.fail(f"L1 entry {index // self.l2_entries}: L2 table offset {l2_offset} is not cluster aligned")
        return self.l2_cache.get(l2_offset)[index % self.l2_entries]

    def _locate(self, index: int) -> int:
        e = self._entry(index)
        if e & OFLAG_COMPRESSED:
            return SPECIAL
        if e & OFLAG_ZERO:
            return ZERO
        host = e & OFFSET_MASK
        if not host:
            return ZERO
        if host % self.cluster_size:
            raise self.fail(f"L2 entry of guest cluster {index}: host offset {host} is not cluster aligned")
        return host

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
                out = zlib.decompressobj(-15).decompress(data, cs)
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
