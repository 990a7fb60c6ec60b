"""Verify: read every pack and manifest, check every chunk against its id, name what is hurt.

A damaged chunk or pack is traced to the points that reference it, so an operator knows which
recovery points are affected, not just that something is wrong. A pack whose index cannot be read
hides which chunks it held: the points name them, and each chunk no good pack holds is missing.
A pack whose header is damaged is not trusted, even where its chunks still check out: every
point that references one of its chunks is named.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lifeboat.archive.errors import CorruptChunk, FormatError
from lifeboat.archive.formats import PACK_MAGIC, PackEntry, parse_point
from lifeboat.archive.packs import PACK_PREFIX, read_pack_index
from lifeboat.archive.store import WORKERS, Archive, Progress


@dataclass
class VerifyReport:
    """What verify found."""

    packs: int = 0
    chunks: int = 0
    bytes_checked: int = 0
    points: int = 0
    bad_packs: dict[str, str] = field(default_factory=dict)
    bad_chunks: dict[str, str] = field(default_factory=dict)
    bad_points: dict[str, str] = field(default_factory=dict)
    affected: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing damaged or missing."""
        return not (self.bad_packs or self.bad_chunks or self.bad_points)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "ok": self.ok,
            "packs": self.packs,
            "chunks": self.chunks,
            "bytes_checked": self.bytes_checked,
            "points": self.points,
            "bad_packs": self.bad_packs,
            "bad_chunks": self.bad_chunks,
            "bad_points": self.bad_points,
            "affected_points": sorted({p for ps in self.affected.values() for p in ps}),
        }


def verify(arc: Archive, progress: Progress | None = None) -> VerifyReport:
    """Check every pack, chunk and manifest of the archive."""
    report = VerifyReport()
    backend = arc.backend
    good: set[bytes] = set()
    in_damaged: dict[bytes, str] = {}  # chunk id -> the pack with a damaged header that holds it
    with ThreadPoolExecutor(WORKERS) as pool:
        for key in sorted(backend.list(PACK_PREFIX)):
            report.packs += 1
            try:
                entries = read_pack_index(backend, key)
                data = backend.get(key)
            except (FormatError, KeyError) as err:
                report.bad_packs[key] = str(err)
                continue
            header_ok = data[: len(PACK_MAGIC)] == PACK_MAGIC
            if not header_ok:
                report.bad_packs[key] = f"pack {key}: bad magic"

            def check(e: PackEntry, data: bytes = data) -> tuple[PackEntry, str | None]:
                try:
                    arc.codec.decode(e.chunk_id, data[e.offset:e.offset + e.length], e.raw_length, full_check=True)
                except CorruptChunk as err:
                    return e, str(err)
                return e, None

            for entry, problem in pool.map(check, entries):
                report.chunks += 1
                report.bytes_checked += entry.length
                if problem:
                    report.bad_chunks[entry.chunk_id.hex()] = f"{problem} (in {key})"
                elif header_ok:
                    good.add(entry.chunk_id)
                else:  # its bytes check out, but a pack with a damaged header is not trusted
                    in_damaged[entry.chunk_id] = key
            if progress:
                progress(len(data))
    users: dict[bytes, list[str]] = defaultdict(list)
    for machine in arc.machines():
        for key in sorted(backend.list(f"points/{machine}/")):
            report.points += 1
            name = f"{machine}@{key.rsplit('/', 1)[1]}"
            try:
                _, table = parse_point(key, backend.get(key))
            except (FormatError, KeyError) as err:
                report.bad_points[name] = str(err)
                continue
            for cid in table.referenced():
                if cid not in good:
                    users[cid].append(name)
    for cid, names in users.items():
        h = cid.hex()
        report.affected[h] = sorted(names)
        if h not in report.bad_chunks:
            report.bad_chunks[h] = (f"chunk {h} is in pack {in_damaged[cid]}, whose header is damaged"
                                    if cid in in_damaged else f"chunk {h} is missing (its pack is damaged or gone)")
        for n in names:
            report.bad_points.setdefault(n, f"references bad or missing chunk {h}")
    return report
