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
VMFS (raw files) or SPARSE (hosted sparse files), such as monolithicFlat, ESXi's
``disk.vmdk`` + ``disk-flat.vmdk``, and the twoGbMaxExtent variants. Extent files must lie in
the descriptor's directory. Snapshots (a parent CID / parentFileNameHint) are refused.

It reads what ``qemu-img`` reads, or refuses: a descriptor file is parsed as qemu parses it (a
C string; createType one of qemu's; extent lines as its ``sscanf`` takes them), and extents qemu
would skip (RDONLY, NOACCESS, ZERO) are refused rather than read differently. A compressed
grain must be one complete zlib stream (its adler32 checked) of at most one grain; a stream's
footer must match its header and be followed by the end-of-stream marker.
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

    def __init__(self, path: str | os.PathLike[str], *, top_level: bool = True) -> None:
        self.top_level = top_level  # False: an extent of a descriptor file, whose CIDs count instead
        super().__init__(path)

    def _parse(self) -> None:
        head = self.pread(0, SECTOR, "sparse extent header")
        h = HEADER.unpack(head)
        magic, version, flags, capacity, grain, _, _, gtes, _rgd, gd, _overhead = h[:11]
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
        if capacity == 0:
            raise UnsupportedImage(f"vmdk image {self.name}: field capacity is 0 (an ESXi descriptor in a sparse file)")
        if self.top_level:  # qemu reads the embedded descriptor at sector 1, whatever descriptorOffset says
            check_cids(self.name, os.pread(self.fd, DESC_SIZE, SECTOR))
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
        seen: set[int] = set()  # grain tables: one directory entry each, so the walk is bounded by the file
        for i, gt_sector in enumerate(self.gd):
            if not gt_sector:
                continue
            if gt_sector in seen:
                raise self.fail(f"grain directory entry {i}: the grain table at sector {gt_sector} is already used")
            seen.add(gt_sector)
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


_WS = " \t\n\v\f\r"
_INT = re.compile(r"[+-]?\d+")
_HEX = re.compile(rb"[ \t\n\v\f\r]*([+-]?(?:0[xX](?=[0-9a-fA-F]))?[0-9a-fA-F]+)")  # sscanf's %x
DESC_SIZE = 20 * SECTOR  # what qemu reads of a descriptor to find its CIDs
# createType values qemu opens from a separate descriptor file (vmdk_open_desc_file)
DESCRIPTOR_FILE_TYPES = (
    "monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
)  # fmt: skip


def scan_extent(text: str, pos: int) -> list[str | int]:
    """What qemu's ``sscanf(p, "%10s %ld %10s \"%511[^\n\r\"]\" %ld")`` takes from ``text`` at
    ``pos``: the values it matched, in order (their count is sscanf's return value)."""
    out: list[str | int] = []
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in _WS:
            i += 1
        return i

    def word(i: int) -> tuple[str, int]:
        i = start = skip(i)
        while i < n and i - start < 10 and text[i] not in _WS:
            i += 1
        return text[start:i], i

    def number(i: int) -> tuple[int | None, int]:
        m = _INT.match(text, skip(i))
        return (int(m[0]), m.end()) if m else (None, i)

    access, pos = word(pos)
    if not access:
        return out
    out.append(access)
    sectors, pos = number(pos)
    if sectors is None:
        return out
    out.append(sectors)
    kind, pos = word(pos)
    if not kind:
        return out
    out.append(kind)
    pos = skip(pos)
    if text[pos : pos + 1] != '"':
        return out
    start = pos = pos + 1
    while pos < n and pos - start < 511 and text[pos] not in '\n\r"':
        pos += 1
    if pos == start or text[pos : pos + 1] != '"':
        if pos > start:
            out.append(text[start:pos])
        return out
    out.append(text[start:pos])
    offset, _ = number(pos + 1)
    if offset is not None:
        out.append(offset)
    return out


def descriptor_file_extents(name: str, text: str) -> list[Extent]:
    """The extents of a separate descriptor file, read line by line as qemu reads them
    (``vmdk_parse_extents``); lines qemu would skip although they name an extent (other access
    than RW, ZERO and other types qemu does not open) are refused, since skipping them would
    shift every later extent."""
    extents: list[Extent] = []
    pos = 0
    for line in text.split("\n"):
        found = scan_extent(text, pos)
        pos += len(line) + 1
        if len(found) < 4 or found[0] != "RW":
            if _EXTENT.match(line.strip()):
                raise UnsupportedImage(f"vmdk image {name}: extent {line.strip()!r} is not a read-write extent")
            continue
        sectors, kind, file = int(found[1]), str(found[2]), str(found[3])
        offset = int(found[4]) if len(found) == 5 else 0
        if kind == "FLAT":
            if len(found) != 5 or offset < 0:
                raise ImageError(f"vmdk image {name}: invalid extent line {line.strip()!r} (FLAT needs an offset)")
        elif len(found) != 4:
            raise ImageError(f"vmdk image {name}: invalid extent line {line.strip()!r} (only FLAT takes an offset)")
        if sectors <= 0:
            continue
        if kind not in ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"):
            raise UnsupportedImage(f"vmdk image {name}: extent {line.strip()!r}: type {kind} is not supported")
        extents.append(Extent(sectors, kind, file, offset))
    return extents


def descriptor_create_type(text: str) -> str | None:
    """createType as qemu finds it (``vmdk_parse_description``): the first "createType", two
    characters skipped, up to the next double quote; None where that fails."""
    at = text.find("createType")
    if at < 0:
        return None
    start = at + len("createType") + 2
    end = text.find('"', start)
    if start >= len(text) or end < 0 or end - start >= 128:
        return None
    return text[start:end]


def descriptor_cid(desc: bytes, field: str) -> int | None:
    """The number qemu's ``vmdk_read_cid`` takes: hex, after the first ``field`` and one more
    character (the "="), in the descriptor read as a C string; None where it finds none."""
    text = desc.split(b"\0", 1)[0]
    at = text.find(field.encode())
    if at < 0:
        return None
    m = _HEX.match(text, at + len(field) + 1)
    return int(m[1], 16) & 0xFFFF_FFFF if m else None


def check_cids(name: str, desc: bytes) -> None:
    """Refuse a descriptor without the CID and parentCID that qemu needs, and snapshots (delta
    disks that need their parent)."""
    cid, parent = descriptor_cid(desc, "CID"), descriptor_cid(desc, "parentCID")
    if cid is None or parent is None:
        raise ImageError(f"vmdk image {name}: descriptor lacks a hexadecimal CID or parentCID")
    if parent != 0xFFFF_FFFF or b"parentFileNameHint" in desc.split(b"\0", 1)[0]:
        raise UnsupportedImage(
            f"vmdk image {name} is a snapshot (delta) of another disk; consolidate it or export the full disk"
        )


class VmdkDescriptorImage:
    """A text descriptor with one or more extents (flat or sparse), read as one disk."""

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
        text = text.split(b"\0", 1)[0]  # qemu reads the descriptor as a C string
        check_cids(self.name, text[: DESC_SIZE - 1])
        try:
            desc = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ImageError(f"vmdk image {self.name}: descriptor is not UTF-8 text") from None
        create_type = descriptor_create_type(desc)
        if create_type is None:
            raise ImageError(f"vmdk image {self.name}: descriptor has no createType=\"...\" field")
        if create_type not in DESCRIPTOR_FILE_TYPES:
            raise UnsupportedImage(f"vmdk image {self.name}: descriptor createType {create_type!r} is not supported")
        extents = descriptor_file_extents(self.name, desc)
        if not extents:
            raise ImageError(f"vmdk image {self.name}: descriptor lists no extents")
        if len(extents) > self.MAX_EXTENTS:
            raise ImageError(f"vmdk image {self.name}: descriptor lists more than {self.MAX_EXTENTS} extents")
        base = self.path.resolve().parent
        self.parts: list[tuple[int, int, Extent, int | VmdkSparseImage]] = []
        pos = 0
        try:
            for i, ext in enumerate(extents):
                what = f"extent {i + 1} ({ext.kind} {ext.file!r})"
                if ext.kind in ("VMFSSPARSE", "SESPARSE"):
                    raise UnsupportedImage(f"vmdk image {self.name}: {what}: extent type {ext.kind} is not supported")
                if any(ord(ch) < 32 for ch in ext.file):
                    raise ImageError(f"vmdk image {self.name}: {what}: file name with control characters")
                target = (base / ext.file).resolve()
                if not target.is_relative_to(base):
                    raise ImageError(f"vmdk image {self.name}: {what}: file must lie in {base}")
                handle: int | VmdkSparseImage
                if ext.kind == "SPARSE":
                    handle = VmdkSparseImage(target, top_level=False)
                    self.parts.append((pos, ext.sectors * SECTOR, ext, handle))
                    if handle.size < ext.sectors * SECTOR:
                        raise ImageError(f"vmdk image {self.name}: {what}: sparse extent is smaller than declared")
                else:  # FLAT and VMFS: raw bytes from ext.offset on
                    try:
                        handle = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
                    except OSError as e:
                        raise ImageError(f"vmdk image {self.name}: {what}: cannot open ({e.strerror})") from None
                    self.parts.append((pos, ext.sectors * SECTOR, ext, handle))
                    if os.lseek(handle, 0, os.SEEK_END) < (ext.offset + ext.sectors) * SECTOR:
                        raise ImageError(f"vmdk image {self.name}: {what}: flat file is shorter than declared")
                pos += ext.sectors * SECTOR
        except BaseException:
            self.close()
            raise
        self.size = pos

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
            if isinstance(handle, VmdkSparseImage):
                out.append(handle.read(lo - start, hi - lo))
            else:
                out.append(read_exact(handle, ext.file, ext.offset * SECTOR + lo - start, hi - lo, "flat extent data"))
        return b"".join(out)

    def data_extents(self) -> list[tuple[int, int]]:
        """The ranges that may hold data: flat extents whole, sparse ones as their grain tables
        say (see ``ImageSource.data_extents``)."""
        runs: list[tuple[int, int]] = []
        for start, size, _, handle in self.parts:
            if isinstance(handle, VmdkSparseImage):
                runs += [(start + off, min(length, size - off)) for off, length in handle.data_extents() if off < size]
            else:
                runs.append((start, size))
        return runs

    def close(self) -> None:
        """Close every extent."""
        for _, _, _, handle in getattr(self, "parts", []):
            if isinstance(handle, VmdkSparseImage):
                handle.close()
            else:
                os.close(handle)
        self.parts = []

    def __enter__(self) -> VmdkDescriptorImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
