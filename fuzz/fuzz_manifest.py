"""Fuzz the archive's manifest and pack-index parsers (``lifeboat.archive.formats``).

Why: a point manifest or a pack comes from storage that may be damaged, or from a remote archive
server that may be hostile; ``parse_point`` and friends must turn any bytes into a point or a
``FormatError``, never another exception, a hang or an allocation sized by a field.

An input is read four ways:
- as a whole manifest, as stored (the digest check comes first);
- as a manifest body whose SHA-256 the target appends, so that mutations reach the header and
  table checks behind the digest, and a parsed point must survive ``encode_point`` and parse again
  to the same table;
- its header alone, as ``points`` reads it without the digest;
- as a pack: its trailer, and the index before it with its CRC-32 made to match.
"""

from __future__ import annotations

import hashlib
import zlib

from lifeboat.archive.formats import (
    PACK_ENTRY,
    PACK_TRAILER,
    encode_point,
    parse_pack_index,
    parse_pack_trailer,
    parse_point,
    parse_point_header,
)
from lifeboat.plumbing.errors import LifeboatError

MAX_ENTRIES = 4096  # a pack index longer than the input cannot parse; no need to build it


def _stored(data: bytes) -> None:
    parse_point("fuzz", data)


def _behind_digest(data: bytes) -> None:
    header, table = parse_point("fuzz", data + hashlib.sha256(data).digest())
    assert len(table.ids) == -(-int(header["size"]) // int(header["chunk_size"]))
    for slot in range(min(len(table.ids), 64)):
        table.slot_refs(slot)
        table.is_zero(slot)
    again = encode_point({k: v for k, v in header.items() if k != "patches"}, table)
    assert parse_point("fuzz", again)[1] == table, "a parsed point does not encode to itself"


def _header(data: bytes) -> None:
    parse_point_header("fuzz", data)


def _pack(data: bytes) -> None:
    offset, count, _ = parse_pack_trailer("fuzz", data[-PACK_TRAILER.size:])
    body = data[:-PACK_TRAILER.size][-count * PACK_ENTRY.size:] if 0 < count <= MAX_ENTRIES else b""
    entries = parse_pack_index("fuzz", body, count, zlib.crc32(body), offset)
    assert all(e.offset + e.length <= offset for e in entries)


def test_one_input(data: bytes) -> None:
    """Every parser over ``data``: a result or a ``LifeboatError``, nothing else."""
    for parse in (_stored, _behind_digest, _header, _pack):
        try:
            parse(data)
        except LifeboatError:
            pass
