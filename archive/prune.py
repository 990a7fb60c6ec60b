"""Prune: apply the retention policy, roll up incrementals, and collect unreferenced chunks.

Every point manifest holds the full chunk table of its disk, so removing a point never makes
another unrestorable: "rollup" re-links a kept point's ``parent`` to its nearest kept ancestor.

Crash safety (FORMAT.md, "Prune"): (1) manifests of kept points are re-linked (atomic
replace), (2) manifests of removed points are deleted, (3) packs are collected: a pack with no
live chunk is deleted; a pack that is mostly dead has its live blobs copied, as they are, into
a new pack that is stored durably *before* the old one is deleted. A ``kill -9`` at any moment
leaves every kept point restorable; leftovers are collected by the next prune. Before a point's
manifest is deleted, an empty tombstone ``pruned/<machine>/<point>`` is stored: replication
removes a point from a replica only on that evidence, never because its manifest went missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lifeboat.archive.errors import FormatError
from lifeboat.archive.fileindex import prune_index
from lifeboat.archive.packs import PACK_PREFIX, PackWriter, read_pack_index
from lifeboat.archive.points import PRUNED_PREFIX, PointInfo
from lifeboat.archive.retention import check_policy, keep
from lifeboat.archive.store import Archive, ChunkIndex

REPACK_DEAD_FRACTION = 0.25


@dataclass
class PruneReport:
    """What prune removed (or would remove, with ``dry_run``)."""

    dry_run: bool
    removed: list[PointInfo] = field(default_factory=list)
    kept: list[PointInfo] = field(default_factory=list)
    relinked: dict[str, str | None] = field(default_factory=dict)
    packs_deleted: int = 0
    packs_rewritten: int = 0
    bytes_freed: int = 0
    incomplete_removed: int = 0
    index_manifests_deleted: int = 0
    index_pieces_deleted: int = 0

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "dry_run": self.dry_run,
            "removed": [f"{p.machine}@{p.point}" for p in self.removed],
            "kept": [f"{p.machine}@{p.point}" for p in self.kept],
            "relinked": self.relinked,
            "packs_deleted": self.packs_deleted,
            "packs_rewritten": self.packs_rewritten,
            "bytes_freed": self.bytes_freed,
            "incomplete_removed": self.incomplete_removed,
            "index_manifests_deleted": self.index_manifests_deleted,
            "index_pieces_deleted": self.index_pieces_deleted,
        }


def prune(arc: Archive, dry_run: bool = False) -> PruneReport:
    """Apply ``arc.config['retention']`` to every machine, then collect garbage."""
    policy = check_policy(dict(arc.config.get("retention") or {}))
    report = PruneReport(dry_run=dry_run)
    backend = arc.backend
    with backend.lock(exclusive=True):
        if not dry_run:
            report.incomplete_removed = backend.cleanup_incomplete()
        for machine in arc.machines():
            points = arc.points(machine)
            kept_ids = keep(points, policy)
            parent_of = {p.point: p.parent for p in points}
            for p in points:
                if p.point not in kept_ids:
                    report.removed.append(p)
                    continue
                report.kept.append(p)
                parent = p.parent
                while parent is not None and parent not in kept_ids:
                    parent = parent_of.get(parent)
                if parent != p.parent:
                    report.relinked[f"{machine}@{p.point}"] = parent
                    if not dry_run:
                        arc.write_point(_with_parent(p, parent), arc.chunk_table(p))
        if not dry_run:
            for p in report.removed:
                tomb = tombstone(p)
                if not backend.exists(tomb):  # the evidence replicate follows (a lost manifest has none)
                    backend.put(tomb, b"")
                backend.delete(p.key)
        report.index_manifests_deleted, report.index_pieces_deleted = prune_index(arc, report.kept, dry_run)
        live: set[bytes] = set()
        for p in report.kept:
            live.update(arc.chunk_table(p).referenced())
        _collect(arc, live, report)
    if not dry_run:
        arc.reload_index()
    return report


def tombstone(p: PointInfo) -> str:
    """The key of the tombstone prune leaves for a removed point: replicas follow it."""
    return f"{PRUNED_PREFIX}{p.machine}/{p.point}"


def _with_parent(p: PointInfo, parent: str | None) -> PointInfo:
    return PointInfo(**(p.to_json() | {"parent": parent}))


def _collect(arc: Archive, live: set[bytes], report: PruneReport) -> None:
    """Delete or rewrite packs whose chunks are no longer referenced."""
    backend = arc.backend
    placed: set[bytes] = set()
    writer = PackWriter(backend, ChunkIndex())
    for key in sorted(backend.list(PACK_PREFIX)):
        try:
            entries = read_pack_index(backend, key)
        except (FormatError, KeyError):
            continue  # damaged: left for verify to report, never deleted blindly
        keep_entries = [e for e in entries if e.chunk_id in live and e.chunk_id not in placed]
        total = sum(e.length for e in entries)
        dead = total - sum(e.length for e in keep_entries)
        placed.update(e.chunk_id for e in keep_entries)
        if dead == 0 or (keep_entries and dead < REPACK_DEAD_FRACTION * total):
            continue
        report.bytes_freed += dead
        if report.dry_run:
            report.packs_deleted += not keep_entries
            report.packs_rewritten += bool(keep_entries)
            continue
        if keep_entries:
            for e in keep_entries:
                writer.add(e.chunk_id, backend.get_range(key, e.offset, e.length), e.raw_length)
            writer.finish()
            writer = PackWriter(backend, ChunkIndex())
            report.packs_rewritten += 1
        else:
            report.packs_deleted += 1
        backend.delete(key)
