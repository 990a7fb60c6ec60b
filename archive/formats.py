"""Magic numbers and byte layouts of every archive object, encoded and parsed in one place.

``archive/FORMAT.md`` is the prose version of this module; keep the two in step.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from archive.errors import FormatError

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


def encode_point(header: dict[str, Any], chunk_ids: list[bytes]) -> bytes:
    """A point manifest: magic, JSON header, one id per chunk, SHA-256 of all before it."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = POINT_HEADER.pack(POINT_MAGIC, len(head)) + head + b"".join(chunk_ids)
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
    if not isinstance(header, dict):
        raise FormatError(f"point {name}: header is not an object")
    return header, end


def parse_point(name: str, data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """Header and chunk ids of a whole manifest, checked against its digest."""
    if len(data) < POINT_HEADER.size + 32 or hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise FormatError(f"point {name}: checksum mismatch (damaged manifest)")
    header, start = parse_point_header(name, data)
    ids_bytes = data[start:-32]
    if len(ids_bytes) % ID_LEN:
        raise FormatError(f"point {name}: chunk table has a partial entry")
    ids = [ids_bytes[i:i + ID_LEN] for i in range(0, len(ids_bytes), ID_LEN)]
    expected = -(-int(header.get("size", -1)) // int(header.get("chunk_size", 1)))
    if len(ids) != expected:
        raise FormatError(f"point {name}: {len(ids)} chunk ids for a size needing {expected}")
    return header, ids
