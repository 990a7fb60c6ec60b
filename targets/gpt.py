"""A GPT disk image adapted to a larger disk, on the orchestrator's side (as ``grown_mbr`` in
``targets/pxeserve.py`` does for MBR): the recovery environment writes the image block for block,
then these pieces over it.

A GPT keeps a backup of its header and partition entries in the disk's last sectors; written onto a
larger disk, the image's backup sits in the middle and the space after it is outside every
partition. ``grown_gpt`` moves the backup entries and header to the disk's end, sets the last
usable sector, grows the partition that ends last when it reached the image's usable end (less
than 1 MiB short of it, keeping the same gap), recomputes both CRCs, zeroes the old backup header
and widens the protective MBR's partition to the disk.

``read_gpt`` and ``Gpt.partitions`` are the one GPT reader: the partition growth's plan
(``targets/pxegrow.py``) and instant mode's partition maps (``targets/pxeinstant.py``) use them.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

SECTOR = 512
SIGNATURE = b"EFI PART"
ALIGN_SECTORS = 2048  # 1 MiB
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b").bytes_le  # EFI system partition
LEGACY_BIOS_BOOTABLE = 1 << 2  # attribute bit: the partition a BIOS boot loader (gptmbr.bin) starts


def _with_crc(header: bytearray, size: int) -> bytes:
    """The header's first ``size`` bytes with their CRC32 at offset 16, padded to a sector."""
    struct.pack_into("<I", header, 16, 0)
    struct.pack_into("<I", header, 16, zlib.crc32(bytes(header[:size])))
    return bytes(header[:size]).ljust(SECTOR, b"\0")


@dataclass(frozen=True)
class GptPartition:
    """A used entry of a GPT: ``index`` in the entry array (Linux numbers it ``index + 1``), its
    first and last LBA (inclusive), type GUID (as stored) and attribute bits."""

    index: int
    first: int
    last: int
    type_guid: bytes
    attributes: int


@dataclass
class Gpt:
    """A valid GPT read from an image: its protective MBR, primary header (``size`` bytes of it
    count) and partition entries."""

    mbr: bytearray
    header: bytearray
    size: int
    entries: bytearray
    count: int
    entry_size: int

    def partitions(self) -> list[GptPartition]:
        """The used entries (a type GUID not all zeros), in entry order."""
        e, n = self.entries, self.entry_size
        found = []
        for i in range(self.count):
            type_guid = bytes(e[i * n : i * n + 16])
            if type_guid.strip(b"\0"):
                first, last, attributes = struct.unpack_from("<QQQ", e, i * n + 32)
                found.append(GptPartition(i, first, last, type_guid, attributes))
        return found

    def last_partition(self) -> tuple[int, int] | None:
        """(index, first LBA) of the partition that grows onto a larger disk: the one that ends
        last, when it reaches the usable end (less than 1 MiB short of it); else None."""
        last_usable = struct.unpack_from("<Q", self.header, 48)[0]
        used = self.partitions()
        if not used:
            return None
        last = max(used, key=lambda p: (p.last, p.index))
        if last.last <= last_usable - ALIGN_SECTORS:
            return None
        return last.index, last.first


def read_gpt(read: Callable[[int, int], bytes]) -> Gpt | None:
    """The image's GPT (``read(offset, length)`` reads the image), or None when it has no valid one
    (a protective MBR and a primary header whose CRCs match)."""
    mbr = bytearray(read(0, SECTOR))
    if mbr[510:512] != b"\x55\xaa" or mbr[446 + 4] != 0xEE:
        return None
    header = bytearray(read(SECTOR, SECTOR))
    size = struct.unpack_from("<I", header, 12)[0]
    if header[:8] != SIGNATURE or not 92 <= size <= SECTOR:
        return None
    check = bytearray(header[:size])
    struct.pack_into("<I", check, 16, 0)
    if zlib.crc32(bytes(check)) != struct.unpack_from("<I", header, 16)[0]:
        return None
    entries_lba = struct.unpack_from("<Q", header, 72)[0]
    count, entry_size = struct.unpack_from("<II", header, 80)
    entries = bytearray(read(entries_lba * SECTOR, count * entry_size))
    if zlib.crc32(bytes(entries)) != struct.unpack_from("<I", header, 88)[0]:
        return None
    return Gpt(mbr, header, size, entries, count, entry_size)


def grown_gpt(read: Callable[[int, int], bytes], image_bytes: int, disk_bytes: int) -> list[tuple[int, bytes]]:
    """(offset, bytes) pieces to write over an image of ``image_bytes`` (``read(offset, length)``
    reads it) once it is on a disk of ``disk_bytes``, the first sector last; none when the image
    has no valid GPT (``read_gpt``) or the disk is not larger."""
    gpt = read_gpt(read) if disk_bytes > image_bytes else None
    if gpt is None:
        return []
    mbr, header, size, entries = gpt.mbr, gpt.header, gpt.size, gpt.entries
    count, entry_size = gpt.count, gpt.entry_size
    old_backup, _first, last_usable = struct.unpack_from("<QQQ", header, 32)
    entries_lba = struct.unpack_from("<Q", header, 72)[0]

    disk_last = disk_bytes // SECTOR - 1
    entry_sectors = -(-count * entry_size // SECTOR)
    backup_entries_lba = disk_last - entry_sectors
    new_last_usable = backup_entries_lba - 1
    grows = gpt.last_partition()
    if grows is not None:
        last = grows[0]
        end = struct.unpack_from("<Q", entries, last * entry_size + 40)[0]
        struct.pack_into("<Q", entries, last * entry_size + 40, new_last_usable - (last_usable - end))
    struct.pack_into("<I", header, 88, zlib.crc32(bytes(entries)))
    struct.pack_into("<Q", header, 32, disk_last)  # the backup header's place
    struct.pack_into("<Q", header, 48, new_last_usable)
    primary = _with_crc(header, size)
    backup = bytearray(header)
    struct.pack_into("<QQ", backup, 24, disk_last, 1)  # its own place, the primary's
    struct.pack_into("<Q", backup, 72, backup_entries_lba)
    struct.pack_into("<I", mbr, 446 + 12, min(disk_bytes // SECTOR - 1, 0xFFFFFFFF))
    pieces = [
        (backup_entries_lba * SECTOR, bytes(entries)),
        (disk_last * SECTOR, _with_crc(backup, size)),
        (entries_lba * SECTOR, bytes(entries)),
        (SECTOR, primary),
        (0, bytes(mbr)),
    ]
    if old_backup * SECTOR < image_bytes:
        pieces.insert(0, (old_backup * SECTOR, bytes(SECTOR)))
    return pieces
