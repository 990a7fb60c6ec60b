"""How one capture runs: a source plans it (what changed since which point), the archive stores it,
then the source commits or aborts its change tracking.

A change-tracking source implements ``prepare(arc, machine) -> BackupPlan``, ``commit(info)`` and
``abort()``. The call order is fixed: ``prepare`` freezes a point-in-time view and says which
extents changed since which base point; ``Archive.backup`` reads them; ``commit`` runs only after
the point's manifest is durable (it rotates the tracking state, e.g. removes the old bitmap), and
``abort`` after any failure (it keeps the old tracking state, so the next capture still covers
everything). A source without ``prepare`` is read whole and hashed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from lifeboat.archive import Archive, PointInfo
from lifeboat.plumbing.errors import LifeboatError

MODE_FULL = "full"  # everything read and hashed (first backup, or a fallback)
MODE_HASH_SCAN = "hash-scan"  # everything read and hashed; only chunks new to the archive stored
MODE_BITMAP = "incremental-bitmap"  # only the extents a QEMU dirty bitmap marks were read
MODE_CHECKPOINT = "incremental-checkpoint"  # the same through libvirt's checkpoints
MODE_CBT = "incremental-cbt"  # the extents vSphere's changed-block tracking gives (QueryChangedDiskAreas)


class CaptureError(LifeboatError):
    """A capture failed while it ran (the guest stopped, the connection broke): no point was stored."""


@dataclass(frozen=True)
class Guarantees:
    """What a source promises (the table of ``agent/SOURCES.md``): callers and the capture-source
    suite branch on these, never on a source's name."""

    crash_consistent: bool = False  # a point is the disk at one instant, even while it is written
    tracks_changes: bool = False  # an incremental reads only what changed; a broken chain reads all, saying why


def guarantees(source: Any) -> Guarantees:
    """What ``source`` guarantees: a source that states nothing (a plain file or device, an image
    file: they live in ``archive`` and ``exporters``) guarantees neither."""
    stated: Guarantees = getattr(source, "guarantees", Guarantees())
    return stated


@dataclass
class BackupPlan:
    """What a capture will read: ``changed`` extents relative to ``base``, or everything."""

    mode: str
    changed: list[tuple[int, int]] | None = None
    base: PointInfo | None = None
    started: datetime | None = None
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    size: int = 0

    @property
    def to_read(self) -> int:
        """Bytes the capture will read at most (for progress)."""
        if self.changed is None:
            return self.size
        return sum(length for _, length in self.changed)

    def to_json(self) -> dict[str, Any]:
        """Fields added to ``lifeboat backup --json``."""
        return {
            "mode": self.mode,
            "fallback_reason": self.fallback_reason,
            "base": self.base.point if self.base else None,
            "changed_bytes": None if self.changed is None else self.to_read,
            "notes": list(self.notes),
        }


@runtime_checkable
class ChangeTracking(Protocol):
    """A source that knows what changed since a point (see module doc for the call order)."""

    def prepare(self, arc: Archive, machine: str) -> BackupPlan: ...

    def commit(self, info: PointInfo) -> None: ...

    def abort(self) -> None: ...


def plan_backup(arc: Archive, machine: str, source: Any) -> BackupPlan:
    """The source's own plan, or a read-and-hash of everything for a plain source."""
    if isinstance(source, ChangeTracking):
        return source.prepare(arc, machine)
    mode = MODE_HASH_SCAN if arc.points(machine) else MODE_FULL
    return BackupPlan(mode=mode, size=source.size)


def run_plan(arc: Archive, machine: str, source: Any, plan: BackupPlan,
             progress: Callable[[int], None] | None = None) -> PointInfo:
    """Store the point the plan describes; commit the source's tracking, or abort it on failure."""
    tracked = isinstance(source, ChangeTracking)
    try:
        info = arc.backup(machine, source, progress=progress, changed=plan.changed, base=plan.base,
                          started=plan.started)
    except BaseException:
        if tracked:
            source.abort()
        raise
    if tracked:
        try:
            source.commit(info)
        except LifeboatError as e:  # the point is durable and correct; the next capture re-checks the chain
            plan.notes.append(f"change tracking was not rotated after the point was stored: {e}")
    return info


def capture(arc: Archive, machine: str, source: Any,
            progress: Callable[[int], None] | None = None) -> tuple[PointInfo, BackupPlan]:
    """One capture: plan, store, commit. Returns the point and the plan (its mode and why)."""
    plan = plan_backup(arc, machine, source)
    return run_plan(arc, machine, source, plan, progress), plan
