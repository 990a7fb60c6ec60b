"""The file index: each point's file lists, stored in the archive, for ``lifeboat files find``.

A point's index lists every file system found on its disk and, for each, every file (path, type,
size, mtime, mode, owner). It is written by ``lifeboat protect`` after each point (in the
background), ``lifeboat files index`` and ``backup --index``; read by ``files find``, and by
``files ls`` and the web pane's browser (``filerestore.indexed``: a directory's listing without
booting an appliance), without touching the disk image; removed by prune with its point. Layout
and encoding: ``archive/FORMAT.md``, "The file index".

Lists are cut into pieces at content-defined boundaries (after a path whose CRC-32 has its low
7 bits zero, so about 128 records a piece), and a piece is stored once under its id: the pieces
of unchanged directories are the same bytes from one point to the next, so a new point stores
only the pieces around what changed. Pieces and manifests go through the archive's codec
(zstd, and AES-256-GCM in an encrypted archive, ids keyed as chunk ids are).
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lifeboat.archive.errors import FormatError
from lifeboat.archive.points import PointInfo, check_machine
from lifeboat.archive.store import Archive
from lifeboat.plumbing.errors import LifeboatError

INDEX_PREFIX = "index/"
PIECE_PREFIX = "indexpieces/"
MANIFEST_MAGIC = b"LBFIDX01"
PIECE_MAGIC = b"LBFPIE01"
# manifest object: magic, id of the plaintext (32), plaintext length; then the codec blob
MANIFEST_HEAD = struct.Struct("<8s32sI")
PIECE_HEAD = struct.Struct("<8sI")  # magic, plaintext length; the id is the key's name
CUT_MASK = 0x7F  # a piece ends after a path with crc32(path) & CUT_MASK == 0
MAX_PIECE = 4096  # records: a piece never grows beyond this
TYPES = frozenset("fdlcbps?")  # file, directory, symlink, char/block device, fifo, socket, unknown
_json_string = json.encoder.encode_basestring  # the C encoder where built


@dataclass(frozen=True)
class FileRecord:
    """One file of a file system: its absolute path within it, type (one of ``TYPES``), size, mtime,
    and its permission bits, uid and gid (None in an index written before they were recorded)."""

    path: str
    type: str
    size: int
    mtime: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None

    def entry(self, name: str) -> dict[str, Any]:
        """The record as ``files ls`` shows an entry (the appliance's ``ls`` gives the same keys)."""
        return {"name": name, "type": self.type, "size": self.size, "mode": self.mode, "mtime": self.mtime,
                "uid": self.uid, "gid": self.gid}


@dataclass
class FsIndex:
    """The file list of one file system of a point."""

    device: str
    fstype: str
    label: str = ""
    uuid: str = ""
    mountpoint: str = ""
    records: list[FileRecord] = field(default_factory=list)
    root: FileRecord | None = None  # the file system's top folder itself (path "/"): None in older indexes


@dataclass(frozen=True)
class Match:
    """A file that ``find`` found in one point."""

    point: PointInfo
    device: str
    mountpoint: str
    record: FileRecord

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` row."""
        r = self.record
        return {"machine": self.point.machine, "point": self.point.point, "time": self.point.time,
                "device": self.device, "mountpoint": self.mountpoint, "path": r.path, "type": r.type,
                "size": r.size, "mtime": r.mtime}


def manifest_key(machine: str, point: str) -> str:
    """``index/<machine>/<point>``."""
    return f"{INDEX_PREFIX}{check_machine(machine)}/{point}"


def piece_key(piece_id: bytes) -> str:
    """``indexpieces/XX/<64 hex>``."""
    h = piece_id.hex()
    return f"{PIECE_PREFIX}{h[:2]}/{h}"


def split_pieces(records: Iterable[FileRecord]) -> Iterator[bytes]:
    """The plaintext pieces of a file list sorted by path: JSON lines ``[path, type, size, mtime,
    mode, uid, gid]``, cut after content-defined boundaries so that equal runs of files give equal
    pieces."""
    lines: list[bytes] = []
    for r in records:
        if r.type not in TYPES:
            raise ValueError(f"{r.path}: file type {r.type!r} is not one of {''.join(sorted(TYPES))}")
        line = _record_line(r)
        lines.append(line.encode("utf-8", "surrogateescape"))
        if zlib.crc32(r.path.encode("utf-8", "surrogateescape")) & CUT_MASK == 0 or len(lines) >= MAX_PIECE:
            yield b"".join(lines)
            lines = []
    if lines:
        yield b"".join(lines)


def _record_line(r: FileRecord) -> str:
    """What ``json.dumps([path, type, size, mtime, mode, uid, gid], ensure_ascii=False)`` writes, 3x
    faster (the last three left out when unknown)."""
    owner = "" if r.mode is None else f", {int(r.mode)}, {_json_int(r.uid)}, {_json_int(r.gid)}"
    return f'[{_json_string(r.path)}, "{r.type}", {int(r.size)}, {int(r.mtime)}{owner}]\n'


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(int(value))


def parse_piece(data: bytes) -> list[FileRecord]:
    """The records of a piece's plaintext (4 fields in an index written before modes were
    recorded: mode, uid and gid are then None)."""
    return [FileRecord(*json.loads(line.decode("utf-8", "surrogateescape"))) for line in data.splitlines()]


class PointGone(LifeboatError):
    """The point was pruned while its files were being listed: no index is stored for it."""


def write_index(arc: Archive, info: PointInfo, filesystems: list[FsIndex],
                disk: dict[str, Any] | None = None) -> dict[str, int]:
    """Store the index of ``info``'s point (replacing any earlier one): pieces the archive lacks,
    then the manifest (with ``disk``, what ``files fs`` says of the point's disk, when given: the
    listing from the index then chooses its view as the appliance does, and the web pane's browser
    shows the disk without booting one). Returns counts: files, pieces, pieces_new, bytes_new.
    Refused with
    ``PointGone`` when the point no longer exists (checked under the shared lock, which prune's
    exclusive one waits for: an index is never left behind by a prune that raced it)."""
    stats = {"files": 0, "pieces": 0, "pieces_new": 0, "bytes_new": 0}
    fs_docs = []
    with arc.backend.lock(exclusive=False):
        if not arc.backend.exists(info.key):
            raise PointGone(f"{info.machine}@{info.point} was pruned before its index was stored")
        for fs in filesystems:
            pieces: list[str] = []
            lengths: list[int] = []
            firsts: list[str] = []
            records = sorted(fs.records, key=lambda r: r.path)
            for data in split_pieces(records):
                pid = arc.codec.chunk_id(data)
                key = piece_key(pid)
                if not arc.backend.exists(key):
                    blob = PIECE_HEAD.pack(PIECE_MAGIC, len(data)) + arc.codec.encode(pid, data)
                    arc.backend.put(key, blob)
                    stats["pieces_new"] += 1
                    stats["bytes_new"] += len(blob)
                pieces.append(pid.hex())
                lengths.append(len(data))
                firsts.append(parse_piece(data.split(b"\n", 1)[0])[0].path)
            stats["files"] += len(records)
            stats["pieces"] += len(pieces)
            fs_doc = {"device": fs.device, "fstype": fs.fstype, "label": fs.label, "uuid": fs.uuid,
                      "mountpoint": fs.mountpoint, "files": len(records), "pieces": pieces, "lengths": lengths,
                      "firsts": firsts}
            if fs.root is not None:
                fs_doc["root"] = json.loads(_record_line(fs.root))[1:]
            fs_docs.append(fs_doc)
        doc: dict[str, Any] = {"machine": info.machine, "point": info.point, "time": info.time,
                               "filesystems": fs_docs}
        if disk is not None:
            doc["disk"] = disk
        _put_manifest(arc, doc)
    return stats


def _put_manifest(arc: Archive, doc: dict[str, Any]) -> None:
    plain = json.dumps(doc, separators=(",", ":")).encode()
    mid = arc.codec.chunk_id(plain)
    arc.backend.put(manifest_key(doc["machine"], doc["point"]),
                    MANIFEST_HEAD.pack(MANIFEST_MAGIC, mid, len(plain)) + arc.codec.encode(mid, plain))


def reuse_index(arc: Archive, info: PointInfo, same: PointInfo) -> dict[str, int] | None:
    """Give ``info`` a copy of the index of ``same``, a point with the very same disk content (the
    caller compared their chunk tables): no appliance, no piece written. None when ``same`` has no
    index; ``PointGone`` when ``info`` was pruned. Returns counts as ``write_index`` does."""
    doc = read_manifest(arc, same.machine, same.point)
    if doc is None:
        return None
    with arc.backend.lock(exclusive=False):
        if not arc.backend.exists(info.key):
            raise PointGone(f"{info.machine}@{info.point} was pruned before its index was stored")
        _put_manifest(arc, doc | {"machine": info.machine, "point": info.point, "time": info.time})
    return {"files": sum(fs["files"] for fs in doc["filesystems"]),
            "pieces": sum(len(fs["pieces"]) for fs in doc["filesystems"]), "pieces_new": 0, "bytes_new": 0}


def read_manifest(arc: Archive, machine: str, point: str) -> dict[str, Any] | None:
    """The index manifest of a point, or None when it has none."""
    key = manifest_key(machine, point)
    try:
        raw = arc.backend.get(key)
    except KeyError:
        return None
    if len(raw) < MANIFEST_HEAD.size:
        raise FormatError(f"{key}: too short for a file index manifest")
    magic, mid, length = MANIFEST_HEAD.unpack_from(raw)
    if magic != MANIFEST_MAGIC:
        raise FormatError(f"{key}: not a file index manifest")
    doc: dict[str, Any] = json.loads(arc.codec.decode(mid, raw[MANIFEST_HEAD.size:], length))
    return doc


def read_piece_bytes(arc: Archive, piece_id: bytes, length: int) -> bytes:
    """The plaintext of one stored piece."""
    key = piece_key(piece_id)
    raw = arc.backend.get(key)
    magic, raw_length = PIECE_HEAD.unpack_from(raw)
    if magic != PIECE_MAGIC or raw_length != length:
        raise FormatError(f"{key}: not the file index piece its manifest names")
    return arc.codec.decode(piece_id, raw[PIECE_HEAD.size:], length)


def read_piece(arc: Archive, piece_id: bytes, length: int) -> list[FileRecord]:
    """The records of one stored piece."""
    return parse_piece(read_piece_bytes(arc, piece_id, length))


def read_index(arc: Archive, info: PointInfo) -> list[FsIndex] | None:
    """A point's whole index (every record), or None when it has none."""
    doc = read_manifest(arc, info.machine, info.point)
    if doc is None:
        return None
    return [load_fs(arc, fs) for fs in doc["filesystems"]]


def load_fs(arc: Archive, doc: dict[str, Any]) -> FsIndex:
    """One file system of a manifest (an item of its ``filesystems``), with every record."""
    root = FileRecord("/", *doc["root"]) if "root" in doc else None
    return FsIndex(doc["device"], doc["fstype"], doc["label"], doc["uuid"], doc["mountpoint"],
                   load_records(arc, doc), root)


def load_records(arc: Archive, doc: dict[str, Any], low: str = "", high: str | None = None) -> list[FileRecord]:
    """The records of one file system of a manifest (an item of its ``filesystems``) read from only
    the pieces that can hold a path in ``[low, high)`` (``high`` None: no upper bound), so that a
    directory's listing reads the pieces around it, not the whole list: pieces are in path order and
    the manifest's ``firsts`` (each piece's first path) is binary-searched. A manifest written
    before ``firsts`` was recorded gives every piece. Records outside the range may come along."""
    pieces = list(zip(doc["pieces"], doc["lengths"], strict=True))
    firsts = doc.get("firsts")
    if firsts is not None:
        start = max(bisect_right(firsts, low) - 1, 0)  # the last piece starting at or before low
        end = len(firsts) if high is None else bisect_left(firsts, high)  # pieces starting below high
        pieces = pieces[start:end]
    return [r for pid, n in pieces for r in read_piece(arc, bytes.fromhex(pid), n)]


def pattern_matcher(pattern: str) -> re.Pattern[str]:
    """Shell-style ``pattern``: with a ``/`` it matches whole paths (``/etc/*.conf``, ``*/log/*``),
    without one it matches the file's name (``*.conf``, ``passwd``)."""
    if "/" in pattern:
        return re.compile(fnmatch.translate(pattern))
    return re.compile(r"(?s:.*/)?" + fnmatch.translate(pattern))


def literal_of(pattern: str) -> bytes:
    """The longest run of plain characters in ``pattern``: a path that matches contains it, and so
    does the piece holding that path (b"" when no run is safe to look for in JSON text)."""
    runs = re.split(r"[*?\[\]]", re.sub(r"\[[^\]]*\]", "*", pattern))  # a [class] is no literal
    best = max(runs, key=len)
    if any(c in best for c in '"\\') or any(ord(c) < 0x20 for c in best):
        return b""
    return best.encode()


def find(arc: Archive, machine: str, pattern: str) -> tuple[list[Match], list[PointInfo]]:
    """Every file matching ``pattern`` in every indexed point of ``machine`` (oldest point first),
    and the points that have no index. Each distinct piece is read and matched once (and parsed
    only when it holds the pattern's longest literal run); a point's pieces are then looked up
    with set operations, so 1,000 points of 500 pieces cost little more than their manifests."""
    rx = pattern_matcher(pattern)
    needle = literal_of(pattern)
    indexed: list[tuple[PointInfo, dict[str, Any]]] = []
    unindexed: list[PointInfo] = []
    lengths: dict[str, int] = {}
    for info in arc.points(machine):
        doc = read_manifest(arc, machine, info.point)
        if doc is None:
            unindexed.append(info)
            continue
        indexed.append((info, doc))
        for fs in doc["filesystems"]:
            lengths.update(zip(fs["pieces"], fs["lengths"], strict=True))
    hits: dict[str, list[FileRecord]] = {}
    for pid, n in lengths.items():
        data = read_piece_bytes(arc, bytes.fromhex(pid), n)
        if needle in data:
            found = [r for r in parse_piece(data) if rx.fullmatch(r.path)]
            if found:
                hits[pid] = found
    matches: list[Match] = []
    for info, doc in indexed:
        for fs in doc["filesystems"]:
            if hits.keys().isdisjoint(fs["pieces"]):
                continue
            for pid in fs["pieces"]:
                for r in hits.get(pid, ()):
                    matches.append(Match(info, fs["device"], fs["mountpoint"], r))
    return matches, unindexed


def prune_index(arc: Archive, kept: Iterable[PointInfo], dry_run: bool = False) -> tuple[int, int]:
    """Delete the index manifests of points not in ``kept``, then pieces no manifest names
    (the caller holds the exclusive lock). Returns (manifests, pieces) deleted."""
    live = {manifest_key(p.machine, p.point) for p in kept}
    manifests = list(arc.backend.list(INDEX_PREFIX))
    dead = [k for k in manifests if k not in live]
    referenced: set[str] = set()
    for key in manifests:
        if key in live:
            _, machine, point = key.split("/")
            doc = read_manifest(arc, machine, point)
            if doc is not None:
                referenced.update(piece_key(bytes.fromhex(pid)) for fs in doc["filesystems"] for pid in fs["pieces"])
    pieces = [k for k in arc.backend.list(PIECE_PREFIX) if k not in referenced]
    if not dry_run:
        for key in dead + pieces:
            arc.backend.delete(key)
    return len(dead), len(pieces)
