"""VMDK hosted sparse extents: the monolithicSparse exporter, the shared header and descriptor,
and the reader for every VMDK lifeboat imports.

Why: VMware Workstation/Fusion and ESXi (through ``vmkfstools -i``) take monolithicSparse;
streamOptimized (``exporters.vmdk_stream``) shares this module's header and descriptor code.

Layout written (VMware "Virtual Disk Format 1.1", section "Hosted Sparse Extent"; integers
little-endian; sector = 512 bytes; grain = 128 sectors = 64 KiB; 512 entries per grain table,
so one grain table (GT, 2 KiB) maps 32 MiB)::

    sector 0          SparseExtentHeader: "KDMV", version 1, flags = newline test (bit 0) |
                      redundant grain directory (bit 1), capacity, grainSize 128,
                      descriptorOffset 1, descriptorSize 20, numGTEsPerGT 512, rgdOffset,
                      gdOffset, overHead, newline check chars "\\n", " ", "\\r", "\\n"
    sectors 1-20      the embedded text descriptor (createType "monolithicSparse")
    rgdOffset         redundant grain directory (u32 sector of each redundant GT)
                      then the redundant GTs, 4 sectors each, one per 32 MiB of capacity
    gdOffset          grain directory, then the GTs (same shape)
    overHead          (rounded up to a grain) first data grain; grains follow in (nearly) guest
                      order: each worker thread reserves the next sectors for its unit and
                      writes its grains itself

All GTs are pre-allocated as the format asks (both directories point at every table); tables of
grains that hold no data stay holes in the file. A GT entry is the grain's sector, 0 for a
grain that is all zeros. Grain sectors are 32-bit, so the file, and therefore the capacity,
is limited to 2 TiB. The virtual size is the point's size rounded up to 512 bytes.

The reader handles monolithicSparse, streamOptimized (compressed grains with markers, grain
directory in the footer), zeroed-grain entries, and descriptor files whose extents are FLAT /
VMFS (raw files), SPARSE (hosted sparse files) or ZERO, such as monolithicFlat, ESXi's
``disk.vmdk`` + ``disk-flat.vmdk``, and the twoGbMaxExtent variants. Extent files must lie in
the descriptor's directory. Snapshots (a parent CID / parentFileNameHint) are refused.
"""

from __future__ import annotations

import os
import re
import secrets
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lifeboat.archive.durable import pwrite_all
from lifeboat.exporters.base import (
    SECTOR,
    Exporter,
    ImageError,
    ImageTooLarge,
    MiB,
    PointSource,
    Progress,
    TiB,
    UnitPipeline,
    UnsupportedImage,
    nonzero_clusters,
    read_exact,
    round_up,
)
from lifeboat.exporters.source import SPECIAL, ZERO, ImageSource, TableCache

MAGIC = b"KDMV"
# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize, numGTEsPerGT,
# rgdOffset, gdOffset, overHead, uncleanShutdown, singleEndLineChar, nonEndLineChar,
# doubleEndLineChar1, doubleEndLineChar2, compressAlgorithm, pad[433]
HEADER = struct.Struct("<4sIIQQQQIQQQBccccH433x")
assert HEADER.size == SECTOR

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESS_DEFLATE = 1
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
GTE_ZEROED = 1

GRAIN_SECTORS = 128
GRAIN = GRAIN_SECTORS * SECTOR
GTES_PER_GT = 512
GT_SECTORS = GTES_PER_GT * 4 // SECTOR
GT_SPAN = GRAIN * GTES_PER_GT  # 32 MiB of guest data per grain table
DESCRIPTOR_OFFSET = 1
DESCRIPTOR_SECTORS = 20
MAX_SECTOR = 2**32  # grain-table entries are u32 sector numbers
MAX_SIZE = 2 * TiB

# stream-optimized markers: {u64 value; u32 size; u32 type} + padding to a sector
MARKER = struct.Struct("<QII")
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
GRAIN_MARKER = struct.Struct("<QI")  # lba, compressed size; the deflate data follows

ADAPTERS = ("ide", "buslogic", "lsilogic", "legacyESX")


def new_cid() -> str:
    """A random content id (8 hex digits) that is not the 'no parent' value."""
    while True:
        cid = secrets.token_hex(4)
        if cid != "ffffffff":
            return cid


def geometry(sectors: int, adapter: str) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) as VMware computes them for the adapter."""
    heads = 16 if adapter == "ide" else 255
    spt = 63
    cylinders = min(sectors // (heads * spt), 16383 if adapter == "ide" else 65535)
    return max(cylinders, 1), heads, spt


@dataclass(frozen=True)
class DescriptorFields:
    """The descriptor fields that hypervisors and cloud importers look at."""

    adapter_type: str = "ide"
    virtual_hw_version: str = "4"
    tools_version: str = "2147483647"  # "managed by the guest" (open-vm-tools)


def descriptor(create_type: str, sectors: int, extent_name: str, fields: DescriptorFields) -> bytes:
    """The text descriptor of a single-extent sparse disk."""
    cyl, heads, spt = geometry(sectors, fields.adapter_type)
    text = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={new_cid()}\n"
        "parentCID=ffffffff\n"
        f'createType="{create_type}"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} SPARSE "{extent_name}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.adapterType = "{fields.adapter_type}"\n'
        f'ddb.geometry.cylinders = "{cyl}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{spt}"\n'
        f'ddb.longContentID = "{secrets.token_hex(16)}"\n'
        f'ddb.toolsInstallType = "4"\n'
        f'ddb.toolsVersion = "{fields.tools_version}"\n'
        f'ddb.virtualHWVersion = "{fields.virtual_hw_version}"\n'
    )
    data = text.encode()
    assert len(data) <= DESCRIPTOR_SECTORS * SECTOR
    return data + bytes(DESCRIPTOR_SECTORS * SECTOR - len(data))


def pack_header(
    *, version: int, flags: int, capacity: int, rgd: int, gd: int, overhead: int, compress: int = 0
) -> bytes:
    """A SparseExtentHeader sector."""
    return HEADER.pack(
        MAGIC, version, flags, capacity, GRAIN_SECTORS, DESCRIPTOR_OFFSET, DESCRIPTOR_SECTORS, GTES_PER_GT,
        rgd, gd, overhead, 0, b"\n", b" ", b"\r", b"\n", compress,
    )  # fmt: skip


class VmdkSparseExporter(Exporter):
    """VMDK monolithicSparse with a redundant grain directory."""

    format: ClassVar[str] = "vmdk"
    qemu_format: ClassVar[str] = "vmdk"
    max_size: ClassVar[int] = MAX_SIZE
    min_size: ClassVar[int] = 1  # qemu and VMware refuse a disk of 0 sectors
    description: ClassVar[str] = "VMDK monolithicSparse"

    def __init__(self, workers: int | None = None, fields: DescriptorFields | None = None) -> None:
        super().__init__(workers)
        self.fields = fields or DescriptorFields()
        if self.fields.adapter_type not in ADAPTERS:
            raise ValueError(f"adapter type {self.fields.adapter_type!r} is not one of {ADAPTERS}")

    def _write(self, reader: PointSource, fd: int, progress: Progress) -> None:
        vsize = self.virtual_size(reader.size)
        capacity = vsize // SECTOR
        num_gts = -(-vsize // GT_SPAN)
        gd_sectors = -(-num_gts * 4 // SECTOR)
        rgd = DESCRIPTOR_OFFSET + DESCRIPTOR_SECTORS
        rgt_first = rgd + gd_sectors
        gd = rgt_first + num_gts * GT_SECTORS
        gt_first = gd + gd_sectors
        overhead = round_up(gt_first + num_gts * GT_SECTORS, GRAIN_SECTORS)
        unit = max(reader.chunk_size, 1 * MiB)
        per_unit = unit // GRAIN
        tables: dict[int, bytearray] = {}
        next_sector = overhead

        lock = threading.Lock()

        def work(k: int, data: bytes) -> tuple[list[int], int]:
            """Find the unit's data grains, reserve file sectors for them, write them."""
            nonlocal next_sector
            grains = nonzero_clusters(data, GRAIN)
            if not grains:
                return [], 0
            with lock:
                base = next_sector
                if base + len(grains) * GRAIN_SECTORS > MAX_SECTOR:
                    raise ImageTooLarge(
                        f"the VMDK file would pass {MAX_SECTOR * SECTOR} bytes, which its grain tables cannot address"
                    )
                next_sector += len(grains) * GRAIN_SECTORS
            pwrite_all(fd, [g for _, g in grains], base * SECTOR)
            return [k * per_unit + i for i, _ in grains], base

        for _, (guest, base) in UnitPipeline(reader, unit, work, self.workers, progress):
            for j, g in enumerate(guest):
                t = tables.get(g // GTES_PER_GT)
                if t is None:
                    t = tables[g // GTES_PER_GT] = bytearray(GTES_PER_GT * 4)
                struct.pack_into("<I", t, (g % GTES_PER_GT) * 4, base + j * GRAIN_SECTORS)

        for idx, t in tables.items():
            pwrite_all(fd, [bytes(t)], (gt_first + idx * GT_SECTORS) * SECTOR)
            pwrite_all(fd, [bytes(t)], (rgt_first + idx * GT_SECTORS) * SECTOR)
        gd_bytes = struct.pack(f"<{num_gts}I", *(gt_first + i * GT_SECTORS for i in range(num_gts)))
        rgd_bytes = struct.pack(f"<{num_gts}I", *(rgt_first + i * GT_SECTORS for i in range(num_gts)))
        pwrite_all(fd, [gd_bytes], gd * SECTOR)
        pwrite_all(fd, [rgd_bytes], rgd * SECTOR)
        header = pack_header(
            version=1, flags=FLAG_NL_DETECT | FLAG_RGD, capacity=capacity, rgd=rgd, gd=gd, overhead=overhead
        )
        desc = descriptor("monolithicSparse", capacity, self.out_name, self.fields)
        pwrite_all(fd, [header, desc], 0)
        os.ftruncate(fd, next_sector * SECTOR)


# --------------------------------------------------------------------------------- reader


class VmdkSparseImage(ImageSource):
    """One hosted sparse extent (monolithicSparse or streamOptimized) read as a source."""

    format: ClassVar[str] = "vmdk"

    def _parse(self) -> None:
        head = self.pread(0, SECTOR, "sparse extent header")
        h = HEADER.unpack(head)
        magic, version, flags, capacity, grain, d_off, d_size, gtes, _rgd, gd, _overhead = h[:11]
        compress = h[16]
        if magic != MAGIC:
            raise self.fail("bad magic (not a hosted sparse extent)")
        if version not in (1, 2, 3):
            raise UnsupportedImage(f"vmdk image {self.name}: field version is {version}; lifeboat reads 1 to 3")
        if grain < 8 or grain > 2048 or grain & (grain - 1):
            raise self.fail(f"field grainSize {grain} is not a power of two from 8 to 2048 sectors")
        if gtes != GTES_PER_GT:
            raise self.fail(f"field numGTEsPerGT is {gtes}; the format fixes it at {GTES_PER_GT}")
        if capacity > (1 << 40):
            raise self.fail(f"field capacity {capacity} sectors is too large")
        # qemu (and VMware) tell compressed grains by compressAlgorithm, not by flag bit 16
        if compress not in (0, COMPRESS_DEFLATE):
            raise UnsupportedImage(f"vmdk image {self.name}: field compressAlgorithm {compress} is unknown")
        self.compressed = compress == COMPRESS_DEFLATE
        self.markers = bool(flags & FLAG_MARKERS)
        self.zero_grain = bool(flags & FLAG_ZERO_GRAIN)
        if self.compressed != bool(flags & FLAG_COMPRESSED) or (self.compressed and not self.markers):
            raise UnsupportedImage(
                f"vmdk image {self.name}: flags {flags:#x} and compressAlgorithm {compress} disagree "
                "(compressed grains need the compressed and markers flags)"
            )
        if d_size:
            if d_size > 2048:
                raise self.fail(f"field descriptorSize {d_size} sectors is larger than 1 MiB")
            text = self.pread(d_off * SECTOR, d_size * SECTOR, "embedded descriptor").split(b"\0", 1)[0]
            check_descriptor(self.name, parse_descriptor(self.name, text))
        if gd == GD_AT_END:
            if self.file_size < 3 * SECTOR:
                raise self.fail("grain directory is at the end, but the file has no footer")
            tail = self.pread(self.file_size - 3 * SECTOR, 3 * SECTOR, "footer")
            _, m_size, m_type = MARKER.unpack_from(tail)
            if (m_size, m_type) != (0, MARKER_FOOTER):
                raise self.fail("grain directory is at the end, but no footer marker precedes the footer")
            if tail[2 * SECTOR :] != bytes(SECTOR):
                raise self.fail("the end-of-stream marker (the last sector) is not all zeros")
            foot = HEADER.unpack_from(tail, SECTOR)
            if foot[:9] != h[:9] or foot[10:] != h[10:]:
                raise self.fail("footer does not match the header (fields other than gdOffset differ)")
            gd = foot[9]
            if gd == GD_AT_END:
                raise self.fail("footer field gdOffset is still 'at end'")
        self.size = capacity * SECTOR
        self.cluster_size = grain * SECTOR
        self.grain_sectors = grain
        num_gts = -(-capacity // (grain * gtes))
        if num_gts * 4 > self.file_size:
            raise self.fail(f"grain directory of {num_gts} entries is larger than the file")
        raw = self.pread(gd * SECTOR, num_gts * 4, "grain directory (gdOffset)") if num_gts else b""
        self.gd = struct.unpack(f"<{num_gts}I", raw)
        self.gt_cache = TableCache(self._load_gt)

    def _load_gt(self, sector: int) -> tuple[int, ...]:
        return struct.unpack(f"<{GTES_PER_GT}I", self.pread(sector * SECTOR, GTES_PER_GT * 4, "grain table"))

    def _gte(self, index: int) -> int:
        gt_sector = self.gd[index // GTES_PER_GT]
        if not gt_sector:
            return 0
        return self.gt_cache.get(gt_sector)[index % GTES_PER_GT]

    def _classify(self, gte: int) -> int:
        if gte == 0 or (gte == GTE_ZEROED and self.zero_grain):
            return ZERO
        return SPECIAL if self.compressed else gte * SECTOR

    def _locate(self, index: int) -> int:
        return self._classify(self._gte(index))

    def _data_clusters(self) -> Iterator[int]:
        grains = -(-self.size // self.cluster_size)
        for i, gt_sector in enumerate(self.gd):
            if not gt_sector:
                continue
            base = i * GTES_PER_GT
            for j, gte in enumerate(self.gt_cache.get(gt_sector)[: grains - base]):
                if gte and self._classify(gte) != ZERO:
                    yield base + j

    def _special(self, index: int) -> bytes:
        host = self._gte(index) * SECTOR
        lba, size = GRAIN_MARKER.unpack(self.pread(host, GRAIN_MARKER.size, f"grain marker of grain {index}"))
        cs = self.cluster_size
        if lba != index * self.grain_sectors:
            expected = index * self.grain_sectors
            raise self.fail(f"grain marker at offset {host} says LBA {lba}, the grain table says {expected}")
        if size == 0 or size > 2 * cs - GRAIN_MARKER.size:
            raise self.fail(f"grain marker at offset {host}: compressed size {size} is implausible")
        data = self.pread(host + GRAIN_MARKER.size, size, f"compressed grain {index}")
        inflate = zlib.decompressobj()
        try:
            out = inflate.decompress(data, cs + 1)
        except zlib.error as e:
            raise self.fail(f"compressed grain {index} at offset {host} does not inflate ({e})") from None
        if len(out) > cs:
            raise self.fail(f"compressed grain {index} at offset {host} inflates to more than a grain")
        if not inflate.eof:  # the zlib stream's end, and its adler32, were not reached: damaged
            raise self.fail(f"compressed grain {index} at offset {host} is truncated (its zlib stream does not end)")
        need = min(cs, self.size - index * cs)
        if len(out) < need:
            raise self.fail(f"compressed grain {index} at offset {host} holds {len(out)} bytes, not {need}")
        return out.ljust(cs, b"\0")  # a last, partial grain


_EXTENT = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(FLAT|SPARSE|ZERO|VMFS|VMFSSPARSE|VMFSRDM|VMFSRAW)'
    r'(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$'
)


@dataclass(frozen=True)
class Extent:
    """One extent line of a descriptor."""

    sectors: int
    kind: str
    file: str
    offset: int


def parse_descriptor(name: str, text: bytes) -> tuple[dict[str, str], list[Extent]]:
    """The ``key=value`` fields and the extents of a text descriptor."""
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ImageError(f"vmdk image {name}: descriptor is not UTF-8 text") from None
    fields: dict[str, str] = {}
    extents: list[Extent] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT.match(line)
        if m:
            extents.append(Extent(int(m[2]), m[3], m[4] or "", int(m[5] or 0)))
        elif "=" in line:
            k, v = line.split("=", 1)
            fields[k.strip()] = v.strip().strip('"')
    return fields, extents


def check_descriptor(name: str, parsed: tuple[dict[str, str], list[Extent]]) -> None:
    """Refuse descriptors of snapshots (delta disks that need their parent)."""
    fields, _ = parsed
    parent = fields.get("parentCID", "ffffffff").lower()
    if parent != "ffffffff" or "parentFileNameHint" in fields:
        raise UnsupportedImage(
            f"vmdk image {name} is a snapshot (delta) of another disk; consolidate it or export the full disk"
        )


class VmdkDescriptorImage:
    """A text descriptor with one or more extents (flat, sparse or zero), read as one disk."""

    format: ClassVar[str] = "vmdk"
    MAX_EXTENTS = 4096

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        try:
            with open(self.path, "rb") as f:
                text = f.read(64 * 1024 + 1)
        except OSError as e:
            raise ImageError(f"image {self.path}: cannot open ({e.strerror})") from None
        if len(text) > 64 * 1024:
            raise ImageError(f"vmdk image {self.name}: descriptor file is larger than 64 KiB")
        parsed = parse_descriptor(self.name, text)
        check_descriptor(self.name, parsed)
        fields, extents = parsed
        if not extents:
            raise ImageError(f"vmdk image {self.name}: descriptor lists no extents")
        if len(extents) > self.MAX_EXTENTS:
            raise ImageError(f"vmdk image {self.name}: descriptor lists more than {self.MAX_EXTENTS} extents")
        base = self.path.resolve().parent
        self.parts: list[tuple[int, int, Extent, int | VmdkSparseImage | None]] = []
        pos = 0
        try:
            for i, ext in enumerate(extents):
                what = f"extent {i + 1} ({ext.kind} {ext.file!r})"
                handle: int | VmdkSparseImage | None = None
                if ext.kind in ("VMFSSPARSE", "VMFSRDM", "VMFSRAW"):
                    raise UnsupportedImage(f"vmdk image {self.name}: {what}: extent type {ext.kind} is not supported")
                if ext.kind != "ZERO":
                    if not ext.file or any(ord(ch) < 32 for ch in ext.file):
                        raise ImageError(f"vmdk image {self.name}: {what}: file name empty or with control characters")
                    target = (base / ext.file).resolve()
                    if not target.is_relative_to(base):
                        raise ImageError(f"vmdk image {self.name}: {what}: file must lie in {base}")
                    if ext.kind == "SPARSE":
                        handle = VmdkSparseImage(target)
                        if handle.size < ext.sectors * SECTOR:
                            raise ImageError(f"vmdk image {self.name}: {what}: sparse extent is smaller than declared")
                    else:
                        try:
                            handle = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
                        except OSError as e:
                            raise ImageError(f"vmdk image {self.name}: {what}: cannot open ({e.strerror})") from None
                        end = os.lseek(handle, 0, os.SEEK_END)
                        self.parts.append((pos, ext.sectors * SECTOR, ext, handle))
                        if end < (ext.offset + ext.sectors) * SECTOR:
                            raise ImageError(f"vmdk image {self.name}: {what}: flat file is shorter than declared")
                        pos += ext.sectors * SECTOR
                        continue
                self.parts.append((pos, ext.sectors * SECTOR, ext, handle))
                pos += ext.sectors * SECTOR
        except BaseException:
            self.close()
            raise
        self.size = pos
        self.fields = fields

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the virtual disk at ``offset``."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(f"vmdk image {self.name}: read of {length} bytes at {offset} is outside the disk")
        out: list[bytes] = []
        end = offset + length
        for start, size, ext, handle in self.parts:
            lo, hi = max(offset, start), min(end, start + size)
            if lo >= hi:
                continue
            if handle is None:
                out.append(bytes(hi - lo))
            elif isinstance(handle, VmdkSparseImage):
                out.append(handle.read(lo - start, hi - lo))
            else:
                out.append(read_exact(handle, ext.file, ext.offset * SECTOR + lo - start, hi - lo, "flat extent data"))
        return b"".join(out)

    def data_extents(self) -> list[tuple[int, int]]:
        """The ranges that may hold data: flat extents whole, sparse ones as their grain tables
        say, ZERO extents not at all (see ``ImageSource.data_extents``)."""
        runs: list[tuple[int, int]] = []
        for start, size, _, handle in self.parts:
            if isinstance(handle, VmdkSparseImage):
                runs += [(start + off, min(length, size - off)) for off, length in handle.data_extents() if off < size]
            elif handle is not None:
                runs.append((start, size))
        return runs

    def close(self) -> None:
        """Close every extent."""
        for _, _, _, handle in getattr(self, "parts", []):
            if isinstance(handle, VmdkSparseImage):
                handle.close()
            elif isinstance(handle, int):
                os.close(handle)
        self.parts = []

    def __enter__(self) -> VmdkDescriptorImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
