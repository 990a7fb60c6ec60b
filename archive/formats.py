"""Magic numbers and byte layouts of every archive object, encoded and parsed in one place.

``archive/FORMAT.md`` is the prose version of this module; keep the two in step.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from lifeboat.archive.errors import FormatError

FORMAT_VERSION = 1
ID_LEN = 32
ZERO_ID = bytes(ID_LEN)  # a chunk that is all zeros: stored as nothing

PACK_MAGIC = b"LBPACK01"
PACK_END_MAGIC = b"LBPKEND1"
# index entry: chunk id, offset of the blob in the pack, blob length, plaintext length
PACK_ENTRY = struct.Struct("<32sQII")
# trailer: index offset, entry count, CRC-32 of the index bytes, end magic
PACK_TRAILER = struct.Struct("<QII8s")

POINT_MAGIC = b"LBPOINT1"
POINT_HEADER = struct.Struct("<8sI")  # magic, length of the JSON header that follows
# patch: slot, offset in the slot, length, offset in the patch chunk, patch chunk id, its length
PATCH_ENTRY = struct.Struct("<QIII32sI")


@dataclass(frozen=True)
class PackEntry:
    """Where one chunk's blob lies inside a pack."""

    chunk_id: bytes
    offset: int
    length: int
    raw_length: int


def encode_pack_index(entries: list[PackEntry], index_offset: int) -> bytes:
    """The index and trailer appended after a pack's blobs."""
    body = b"".join(PACK_ENTRY.pack(e.chunk_id, e.offset, e.length, e.raw_length) for e in entries)
    return body + PACK_TRAILER.pack(index_offset, len(entries), zlib.crc32(body), PACK_END_MAGIC)


def parse_pack_trailer(name: str, trailer: bytes) -> tuple[int, int, int]:
    """(index offset, entry count, crc) from a pack's last ``PACK_TRAILER.size`` bytes."""
    if len(trailer) != PACK_TRAILER.size:
        raise FormatError(f"pack {name}: too short to hold a trailer")
    offset, count, crc, magic = PACK_TRAILER.unpack(trailer)
    if magic != PACK_END_MAGIC:
        raise FormatError(f"pack {name}: bad end magic (truncated or not a pack)")
    return offset, count, crc


def parse_pack_index(name: str, body: bytes, count: int, crc: int, index_offset: int) -> list[PackEntry]:
    """The entries of a pack index, checked against its CRC and bounds."""
    if len(body) != count * PACK_ENTRY.size or zlib.crc32(body) != crc:
        raise FormatError(f"pack {name}: index checksum mismatch")
    entries = []
    for i in range(count):
        cid, off, length, raw = PACK_ENTRY.unpack_from(body, i * PACK_ENTRY.size)
        if off < len(PACK_MAGIC) or off + length > index_offset:
            raise FormatError(f"pack {name}: index entry {i} points outside the blob area")
        entries.append(PackEntry(cid, off, length, raw))
    return entries


def slot_length(size: int, cs: int, slot: int) -> int:
    """Length of slot ``slot`` of a disk of ``size`` bytes cut into ``cs``-byte slots: the last one
    may be short. Every reader and writer of slots asks here, so none gets the tail wrong."""
    return min(cs, size - slot * cs)


@dataclass(frozen=True)
class Patch:
    """Bytes ``offset .. offset+length`` of slot ``slot`` are bytes ``chunk_offset ..`` of another
    chunk (``ZERO_ID``: zeros). Incrementals from change tracking store only the changed blocks
    of a slot this way instead of the whole slot (FORMAT.md, "Patches")."""

    slot: int
    offset: int
    length: int
    chunk_id: bytes
    chunk_offset: int
    chunk_length: int


@dataclass
class ChunkTable:
    """A point's content: one chunk id a slot, and the patches laid over some slots (sorted,
    not overlapping)."""

    ids: list[bytes]
    patches: dict[int, list[Patch]] = field(default_factory=dict)

    def referenced(self) -> set[bytes]:
        """Every stored chunk the point needs (ZERO_ID left out)."""
        found = set(self.ids)
        for ps in self.patches.values():
            found.update(p.chunk_id for p in ps)
        found.discard(ZERO_ID)
        return found

    def slot_refs(self, slot: int) -> set[bytes]:
        """The stored chunks that slot ``slot`` is read from."""
        found = {self.ids[slot]} | {p.chunk_id for p in self.patches.get(slot, ())}
        found.discard(ZERO_ID)
        return found

    def is_zero(self, slot: int) -> bool:
        """Whether slot ``slot`` is all zeros without reading anything."""
        return self.ids[slot] == ZERO_ID and all(p.chunk_id == ZERO_ID for p in self.patches.get(slot, ()))


def encode_point(header: dict[str, Any], table: ChunkTable) -> bytes:
    """A point manifest: magic, JSON header, one id per slot, the patches, SHA-256 of all before it."""
    patches = [p for slot in sorted(table.patches) for p in table.patches[slot]]
    head = json.dumps(header | {"patches": len(patches)}, sort_keys=True, separators=(",", ":")).encode()
    body = b"".join([
        POINT_HEADER.pack(POINT_MAGIC, len(head)), head, *table.ids,
        *(PATCH_ENTRY.pack(p.slot, p.offset, p.length, p.chunk_offset, p.chunk_id, p.chunk_length)
          for p in patches),
    ])
    return body + hashlib.sha256(body).digest()


def parse_point_header(name: str, data: bytes) -> tuple[dict[str, Any], int]:
    """The JSON header of a manifest and the offset where chunk ids start."""
    if len(data) < POINT_HEADER.size:
        raise FormatError(f"point {name}: too short")
    magic, hlen = POINT_HEADER.unpack_from(data)
    if magic != POINT_MAGIC:
        raise FormatError(f"point {name}: bad magic")
    end = POINT_HEADER.size + hlen
    if len(data) < end:
        raise FormatError(f"point {name}: header truncated")
    try:
        header = json.loads(data[POINT_HEADER.size:end])
    except ValueError as e:
        raise FormatError(f"point {name}: header is not JSON ({e})") from e
    except RecursionError:  # nesting deeper than the interpreter's stack
        raise FormatError(f"point {name}: header is nested too deeply") from None
    if not isinstance(header, dict):
        raise FormatError(f"point {name}: header is not an object")
    return header, end


def parse_point(name: str, data: bytes) -> tuple[dict[str, Any], ChunkTable]:
    """Header and chunk table of a whole manifest, checked against its digest and bounds."""
    if len(data) < POINT_HEADER.size + 32 or hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise FormatError(f"point {name}: checksum mismatch (damaged manifest)")
    header, start = parse_point_header(name, data)
    try:
        size, cs, npatches = int(header["size"]), int(header["chunk_size"]), int(header.get("patches", 0))
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: Infinity
        raise FormatError(f"point {name}: header lacks size, chunk_size or patches") from None
    if size < 0 or cs <= 0 or npatches < 0:
        raise FormatError(f"point {name}: bad size, chunk size or patch count in the header")
    count = -(-size // cs)
    body = data[start:-32]
    if len(body) != count * ID_LEN + npatches * PATCH_ENTRY.size:
        raise FormatError(f"point {name}: table of {len(body)} bytes does not hold {count} ids and {npatches} patches")
    table = ChunkTable([body[i:i + ID_LEN] for i in range(0, count * ID_LEN, ID_LEN)])
    for at in range(count * ID_LEN, len(body), PATCH_ENTRY.size):
        slot, off, length, coff, cid, clen = PATCH_ENTRY.unpack_from(body, at)
        slot_len = slot_length(size, cs, slot) if slot < count else 0
        prev = table.patches.get(slot)
        source_ok = (coff, clen) == (0, 0) if cid == ZERO_ID else coff + length <= clen
        in_order = not prev or prev[-1].offset + prev[-1].length <= off
        if length == 0 or off + length > slot_len or not source_ok or not in_order:
            raise FormatError(f"point {name}: patch of slot {slot} at {off} is out of bounds or out of order")
        table.patches.setdefault(slot, []).append(Patch(slot, off, length, cid, coff, clen))
    return header, table
