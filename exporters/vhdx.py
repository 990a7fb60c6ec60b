"""VHDX (dynamic): the exporter and the reader.

Why: Hyper-V and Azure Stack HCI take VHDX; Windows mounts it natively, which also makes it a
convenient single-file-recovery format.

Layout written ([MS-VHDX] v1.0; integers little-endian; GUIDs in Microsoft's mixed-endian
byte order; every structure 1 MiB aligned)::

    0        file type identifier: "vhdxfile" + creator (UTF-16LE, 512 bytes)
    64 KiB   header 1, 4 KiB: "head", CRC-32C (of the 4 KiB with the field zeroed),
             SequenceNumber, FileWriteGuid, DataWriteGuid, LogGuid = 0 (the log is empty),
             LogVersion 0, Version 1, LogLength 1 MiB, LogOffset 1 MiB
    128 KiB  header 2: the same with SequenceNumber + 1 (the current one)
    192 KiB  region table 1, 64 KiB: "regi", CRC-32C, 2 entries (BAT, metadata; both required)
    256 KiB  region table 2: identical
    1 MiB    the log: 1 MiB of zeros (empty: LogGuid is 0, nothing to replay)
    2 MiB    metadata region, 1 MiB: table ("metadata", 5 entries) then the items at 64 KiB:
             File Parameters (BlockSize, LeaveBlockAllocated 0, HasParent 0), Virtual Disk Size,
             Virtual Disk ID, Logical Sector Size 512, Physical Sector Size 4096
    3 MiB    BAT: one u64 per payload block, a sector-bitmap entry after every chunk-ratio
             (2^23 * 512 / BlockSize) payload entries; state in bits 0-2, FileOffsetMB in 20-63
    then     payload blocks (BlockSize, a multiple of 1 MiB, so each is 1 MiB aligned), in guest
             order, only for blocks that hold data; zero runs inside a block stay file holes

A block with data is PAYLOAD_BLOCK_FULLY_PRESENT (6); an all-zero block is PAYLOAD_BLOCK_ZERO (2)
with offset 0 — not NOT_PRESENT, whose content the spec leaves undefined for dynamic disks;
sector-bitmap entries are SB_BLOCK_NOT_PRESENT (0) with offset 0. Block size follows qemu's
defaults (8 MiB up to 1 GiB, 16 MiB up to 100 GiB, 32 MiB up to 32 TiB, else 64 MiB). The
virtual size is the point's size rounded up to 512 bytes, at most 64 TiB.

The reader accepts dynamic and fixed VHDX with 512 or 4096-byte logical sectors and refuses
differencing disks and files whose log still holds entries to replay. It reads what
``qemu-img`` reads, or refuses: the current header is the valid one (signature, CRC-32C,
Version 1) with the higher SequenceNumber (two valid headers with the same number must be
identical); region table 1 must be valid (qemu reads no other); the header section, the log,
the regions and every present payload block may not overlap, and every present block must lie
inside the file; all five required metadata items must be there, each once.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

from lifeboat.archive.durable import pwrite_all
from lifeboat.exporters.base import (
    SECTOR,
    Exporter,
    GiB,
    KiB,
    MiB,
    PointSource,
    Progress,
    TiB,
    UnitPipeline,
    UnsupportedImage,
    data_units,
    nonzero_runs,
    round_up,
)
from lifeboat.exporters.source import ZERO, ImageSource

FILE_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
HEADER1, HEADER2 = 64 * KiB, 128 * KiB
REGION1, REGION2 = 192 * KiB, 256 * KiB
HEADER_SIZE = 4 * KiB
REGION_SIZE = 64 * KiB
LOG_OFFSET, LOG_LENGTH = 1 * MiB, 1 * MiB
METADATA_OFFSET, METADATA_LENGTH = 2 * MiB, 1 * MiB
BAT_OFFSET = 3 * MiB
MAX_SIZE = 64 * TiB
LOGICAL_SECTOR = 512
PHYSICAL_SECTOR = 4096

# signature, checksum, sequence, file write guid, data write guid, log guid, log version,
# version, log length, log offset
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
REGION_HEADER = struct.Struct("<4sIII")
REGION_ENTRY = struct.Struct("<16sQII")
META_HEADER = struct.Struct("<8sHH20x")
META_ENTRY = struct.Struct("<16sIII4x")


def guid(text: str) -> bytes:
    """A GUID in the on-disk (mixed-endian) byte order."""
    return uuid.UUID(text).bytes_le


BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
META_IS_VIRTUAL_DISK = 1 << 1
META_IS_REQUIRED = 1 << 2
KNOWN_ITEMS = {FILE_PARAMETERS, VIRTUAL_DISK_SIZE, VIRTUAL_DISK_ID, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE}

PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_ZERO, PAYLOAD_UNMAPPED = 0, 1, 2, 3
PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT = 6, 7
HOLE_GRANULARITY = 64 * KiB


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


# The CRC register after n zero bytes is a linear map of the register before them (zlib's
# crc32_combine idea): powers of two of the one-zero-byte map, so zero runs cost O(log n).
_ZERO_POWERS = [[_CRC32C[(1 << i) & 0xFF] ^ ((1 << i) >> 8) for i in range(32)]]
for _ in range(40):
    _ZERO_POWERS.append([_gf2_times(_ZERO_POWERS[-1], col) for col in _ZERO_POWERS[-1]])


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as VHDX checksums its headers, region tables and log entries.

    Pure Python, so the (usually all-zero) tail of a structure is skipped algebraically."""
    body = data.rstrip(b"\0")
    crc = 0xFFFFFFFF
    t = _CRC32C
    for b in body:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    zeros, k = len(data) - len(body), 0
    while zeros:
        if zeros & 1:
            crc = _gf2_times(_ZERO_POWERS[k], crc)
        zeros >>= 1
        k += 1
    return crc ^ 0xFFFFFFFF


def with_checksum(block: bytes) -> bytes:
    """``block`` with its CRC-32C stored at byte 4 (computed with that field zero)."""
    b = bytearray(block)
    b[4:8] = bytes(4)
    struct.pack_into("<I", b, 4, crc32c(bytes(b)))
    return bytes(b)


def checksum_ok(block: bytes) -> bool:
    """Whether a header or region table's stored CRC-32C matches its content."""
    stored = struct.unpack_from("<I", block, 4)[0]
    return crc32c(block[:4] + bytes(4) + block[8:]) == stored


def default_block_size(size: int) -> int:
    """qemu's default payload block size for a disk of ``size`` bytes."""
    if size > 32 * TiB:
        return 64 * MiB
    if size > 100 * GiB:
        return 32 * MiB
    if size > 1 * GiB:
        return 16 * MiB
    return 8 * MiB


def chunk_ratio(block_size: int, logical_sector: int) -> int:
    """Payload blocks per sector-bitmap block."""
    return (1 << 23) * logical_sector // block_size


def bat_entries(size: int, block_size: int, logical_sector: int) -> int:
    """BAT entries of a dynamic or fixed VHDX (payload entries + interleaved bitmap entries)."""
    blocks = -(-size // block_size)
    return blocks + (blocks - 1) // chunk_ratio(block_size, logical_sector) if blocks else 0


class VhdxExporter(Exporter):
    """VHDX dynamic, 512-byte logical sectors, empty log."""

    format: ClassVar[str] = "vhdx"
    qemu_format: ClassVar[str] = "vhdx"
    max_size: ClassVar[int] = MAX_SIZE
    min_size: ClassVar[int] = 1  # Hyper-V makes no empty disks; qemu cannot open one with a 1 MiB BAT
    description: ClassVar[str] = "VHDX"

    def __init__(self, workers: int | None = None, block_size: int | None = None) -> None:
        super().__init__(workers)
        if block_size is not None and (block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1)):
            raise ValueError(f"VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB")
        self.block_size = block_size

    def _write(self, reader: PointSource, fd: int, progress: Progress) -> None:
        vsize = self.virtual_size(reader.size)
        bs = self.block_size or default_block_size(vsize)
        ratio = chunk_ratio(bs, LOGICAL_SECTOR)
        blocks = -(-vsize // bs)
        n_entries = bat_entries(vsize, bs, LOGICAL_SECTOR)
        bat_length = max(MiB, round_up(n_entries * 8, MiB))
        next_free = BAT_OFFSET + bat_length
        unit = min(max(reader.chunk_size, 1 * MiB), bs)
        # Every data unit holds a non-zero chunk, so the blocks to allocate are known up front:
        # place them in guest order, then let the workers write straight to their offsets.
        placed: dict[int, int] = {}  # payload block -> file offset
        for k in data_units(reader, unit):
            block = k * unit // bs
            if block not in placed:
                placed[block] = next_free
                next_free += bs

        def work(k: int, data: bytes) -> int:
            block, inner = divmod(k * unit, bs)
            mv = memoryview(data)
            for start, end in nonzero_runs(data, HOLE_GRANULARITY):
                pwrite_all(fd, [mv[start:end]], placed[block] + inner + start)
            return len(data)

        for _ in UnitPipeline(reader, unit, work, self.workers, progress):
            pass

        bat = bytearray(n_entries * 8)
        for b in range(blocks):
            entry = b + b // ratio
            off = placed.get(b)
            value = (off | PAYLOAD_FULLY_PRESENT) if off is not None else PAYLOAD_ZERO
            struct.pack_into("<Q", bat, entry * 8, value)
        pwrite_all(fd, [bytes(bat)], BAT_OFFSET)
        pwrite_all(fd, [self._metadata(vsize, bs)], METADATA_OFFSET)
        region = bytearray(REGION_SIZE)
        REGION_HEADER.pack_into(region, 0, REGION_SIGNATURE, 0, 2, 0)
        REGION_ENTRY.pack_into(region, 16, BAT_GUID, BAT_OFFSET, bat_length, 1)
        REGION_ENTRY.pack_into(region, 16 + REGION_ENTRY.size, METADATA_GUID, METADATA_OFFSET, METADATA_LENGTH, 1)
        region_bytes = with_checksum(bytes(region))
        ident = FILE_SIGNATURE + "lifeboat".encode("utf-16-le")
        file_guid, data_guid = uuid.uuid4().bytes_le, uuid.uuid4().bytes_le
        headers = []
        for seq in (1, 2):
            h = HEADER.pack(HEADER_SIGNATURE, 0, seq, file_guid, data_guid, bytes(16), 0, 1, LOG_LENGTH, LOG_OFFSET)
            headers.append(with_checksum(h + bytes(HEADER_SIZE - len(h))))
        pwrite_all(fd, [ident], 0)
        pwrite_all(fd, [headers[0]], HEADER1)
        pwrite_all(fd, [headers[1]], HEADER2)
        pwrite_all(fd, [region_bytes], REGION1)
        pwrite_all(fd, [region_bytes], REGION2)
        os.ftruncate(fd, next_free)

    @staticmethod
    def _metadata(vsize: int, block_size: int) -> bytes:
        items = [
            (FILE_PARAMETERS, struct.pack("<II", block_size, 0), META_IS_REQUIRED),
            (VIRTUAL_DISK_SIZE, struct.pack("<Q", vsize), META_IS_VIRTUAL_DISK | META_IS_REQUIRED),
            (VIRTUAL_DISK_ID, uuid.uuid4().bytes_le, META_IS_VIRTUAL_DISK | META_IS_REQUIRED),
            (LOGICAL_SECTOR_SIZE, struct.pack("<I", LOGICAL_SECTOR), META_IS_VIRTUAL_DISK | META_IS_REQUIRED),
            (PHYSICAL_SECTOR_SIZE, struct.pack("<I", PHYSICAL_SECTOR), META_IS_VIRTUAL_DISK | META_IS_REQUIRED),
        ]
        region = bytearray(64 * KiB + 4 * KiB)
        META_HEADER.pack_into(region, 0, METADATA_SIGNATURE, 0, len(items))
        at = 64 * KiB
        for i, (item, value, flags) in enumerate(items):
            META_ENTRY.pack_into(region, 32 + i * META_ENTRY.size, item, at, len(value), flags)
            region[at : at + len(value)] = value
            at += len(value)
        return bytes(region)


class VhdxImage(ImageSource):
    """A dynamic or fixed VHDX read as a backup source."""

    format: ClassVar[str] = "vhdx"

    def _parse(self) -> None:
        if self.pread(0, 8, "file type identifier") != FILE_SIGNATURE:
            raise self.fail("bad file type identifier (not 'vhdxfile')")
        _, _, _, _, _, log_guid, log_version, _, log_length, log_offset = self._current_header()
        if log_version != 0:
            raise self.fail(f"header field LogVersion is {log_version}, not 0")
        if log_guid != bytes(16):
            raise UnsupportedImage(
                f"vhdx image {self.name}: header field LogGuid is set: the log holds entries to replay "
                "(open it once in Hyper-V, or run qemu-img check -r all on it)"
            )
        # Structures may not overlap (qemu refuses such a file): the header section, the log,
        # every region, and every payload block are checked against these.
        self.regions: list[tuple[int, int, str]] = [(0, MiB, "the header section"), (log_offset, log_length, "the log")]
        r = self.pread(REGION1, REGION_SIZE, "region table 1")
        if r[:4] != REGION_SIGNATURE or not checksum_ok(r):
            raise self.fail("region table 1 (at 192 KiB) has a bad signature or CRC-32C checksum")
        _, _, count, _ = REGION_HEADER.unpack_from(r)
        if count > 2047:
            raise self.fail(f"region table field EntryCount {count} exceeds 2047")
        found: dict[bytes, tuple[int, int]] = {}
        for i in range(count):
            g, off, length, req = REGION_ENTRY.unpack_from(r, 16 + i * REGION_ENTRY.size)
            if g not in (BAT_GUID, METADATA_GUID) and req & 1:
                raise UnsupportedImage(f"vhdx image {self.name}: unknown required region {uuid.UUID(bytes_le=g)}")
            if off % MiB or off < MiB or length % MiB:
                raise self.fail(f"region {i}: FileOffset {off} or Length {length} is not 1 MiB aligned")
            if g in found:
                raise self.fail(f"region table lists region {uuid.UUID(bytes_le=g)} twice")
            self._claim(off, length, f"region {i}")
            if g in (BAT_GUID, METADATA_GUID):
                found[g] = (off, length)
        if BAT_GUID not in found or METADATA_GUID not in found:
            raise self.fail("region table lacks the BAT or the metadata region")
        self._read_metadata(*found[METADATA_GUID])
        bat_off, bat_len = found[BAT_GUID]
        self.ratio = chunk_ratio(self.cluster_size, self.logical_sector)
        n = bat_entries(self.size, self.cluster_size, self.logical_sector)
        if n * 8 > bat_len:
            raise self.fail(f"BAT region of {bat_len} bytes is smaller than the {n} entries the disk size needs")
        if n * 8 > self.file_size:
            raise self.fail(f"BAT of {n} entries is larger than the file")
        raw = self.pread(bat_off, n * 8, "BAT") if n else b""
        self.bat = struct.unpack(f"<{n}Q", raw)
        for b in range(-(-self.size // self.cluster_size)):  # as qemu does on open: every block
            entry = self.bat[b + b // self.ratio]
            if entry & 7 in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
                off = (entry >> 20) * MiB
                if off + self.cluster_size > self.file_size:
                    raise self.fail(f"BAT entry of block {b}: its payload at {off} runs past the end of the file")
                self._claim(off, self.cluster_size, f"payload block {b}", register=False)

    def _current_header(self) -> tuple[Any, ...]:
        """The fields of the current header, chosen as [MS-VHDX] and qemu choose it: of the
        headers with a valid signature, CRC-32C and version 1, the higher SequenceNumber."""
        valid: list[tuple[bytes, tuple[Any, ...]]] = []
        for where in (HEADER1, HEADER2):
            h = self.pread(where, HEADER_SIZE, f"header at {where}")
            fields = HEADER.unpack_from(h)
            if h[:4] == HEADER_SIGNATURE and checksum_ok(h) and fields[7] == 1:
                valid.append((h, fields))
        if not valid:
            raise self.fail("neither header (64 KiB, 128 KiB) has a valid signature, CRC-32C checksum and Version 1")
        if len(valid) == 2 and valid[0][1][2] == valid[1][1][2] and valid[0][0] != valid[1][0]:
            raise self.fail("both headers are valid, with the same SequenceNumber, but they differ")
        return max(valid, key=lambda v: v[1][2])[1]

    def _claim(self, offset: int, length: int, what: str, register: bool = True) -> None:
        """Refuse a structure that overlaps one already placed; remember it if ``register``."""
        for start, size, other in self.regions:
            if offset < start + size and start < offset + length:
                raise self.fail(f"{what} ({offset}, {length} bytes) overlaps {other}")
        if register:
            self.regions.append((offset, length, what))

    def _read_metadata(self, offset: int, length: int) -> None:
        table = self.pread(offset, 64 * KiB, "metadata table")
        sig, _, count = META_HEADER.unpack_from(table)
        if sig != METADATA_SIGNATURE:
            raise self.fail("metadata table signature is not 'metadata'")
        if count > 2047:
            raise self.fail(f"metadata table field EntryCount {count} exceeds 2047")
        values: dict[bytes, bytes] = {}
        for i in range(count):
            item, off, ln, flags = META_ENTRY.unpack_from(table, 32 + i * META_ENTRY.size)
            if item == PARENT_LOCATOR:
                raise UnsupportedImage(f"vhdx image {self.name} is a differencing disk (it has a parent locator)")
            if item not in KNOWN_ITEMS:
                if flags & META_IS_REQUIRED:
                    raise UnsupportedImage(
                        f"vhdx image {self.name}: unknown required metadata item {uuid.UUID(bytes_le=item)}"
                    )
                continue
            if item in values:
                raise self.fail(f"metadata table lists item {uuid.UUID(bytes_le=item)} twice")
            if ln > MiB or off + ln > length or (ln and off < 64 * KiB):
                raise self.fail(f"metadata item {uuid.UUID(bytes_le=item)}: Offset {off} / Length {ln} out of bounds")
            values[item] = self.pread(offset + off, ln, f"metadata item {uuid.UUID(bytes_le=item)}")

        def need(item: bytes, fmt: str, label: str) -> int:
            v = values.get(item)
            if v is None or len(v) < struct.calcsize(fmt):
                raise self.fail(f"metadata item {label} is missing or too short")
            return int(struct.unpack_from(fmt, v)[0])

        block_size = need(FILE_PARAMETERS, "<I", "File Parameters")
        fp_flags = struct.unpack_from("<I", values[FILE_PARAMETERS], 4)[0] if len(values[FILE_PARAMETERS]) >= 8 else 0
        if fp_flags & 2:
            raise UnsupportedImage(f"vhdx image {self.name} is a differencing disk (File Parameters HasParent)")
        if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
            raise self.fail(f"File Parameters BlockSize {block_size} is not a power of two from 1 MiB to 256 MiB")
        size = need(VIRTUAL_DISK_SIZE, "<Q", "Virtual Disk Size")
        logical = need(LOGICAL_SECTOR_SIZE, "<I", "Logical Sector Size")
        if logical not in (512, 4096):
            raise self.fail(f"Logical Sector Size {logical} is neither 512 nor 4096")
        physical = need(PHYSICAL_SECTOR_SIZE, "<I", "Physical Sector Size")
        if physical not in (512, 4096):
            raise self.fail(f"Physical Sector Size {physical} is neither 512 nor 4096")
        need(VIRTUAL_DISK_ID, "<QQ", "Virtual Disk ID")
        if not 0 < size <= MAX_SIZE or size % logical:
            raise self.fail(f"Virtual Disk Size {size} is 0, over 64 TiB or not a multiple of the sector size")
        self.size = size
        self.cluster_size = block_size
        self.logical_sector = logical

    def _classify(self, index: int, entry: int) -> int:
        state = entry & 7
        if state == PAYLOAD_FULLY_PRESENT:
            return (entry >> 20) * MiB  # checked against the file and the regions on open
        if state in (PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_ZERO, PAYLOAD_UNMAPPED):
            return ZERO
        if state == PAYLOAD_PARTIALLY_PRESENT:
            raise UnsupportedImage(f"vhdx image {self.name}: block {index} is partially present (differencing disk)")
        raise self.fail(f"BAT entry of block {index} has the reserved state {state}")

    def _locate(self, index: int) -> int:
        return self._classify(index, self.bat[index + index // self.ratio])

    def _data_clusters(self) -> Iterator[int]:
        for b in range(-(-self.size // self.cluster_size)):
            entry = self.bat[b + b // self.ratio]
            if entry and self._classify(b, entry) != ZERO:
                yield b


__all__ = ["SECTOR", "VhdxImage", "VhdxExporter", "crc32c"]
