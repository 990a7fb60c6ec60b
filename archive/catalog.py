"""The catalog summarized per machine, kept between reads: what a dashboard shows of 1,000
machines without reading 100,000 manifests per request.

``Catalog.summaries()`` asks the backend for a stamp per machine folder (``change_stamps``: a local
archive's folder times, one ``scandir``) or, where it has none, lists the keys of ``points/`` and
takes each machine's key set as its stamp. Only the machines whose stamp changed since the last call
are read again, all their manifests: a new point, a pruned one and a point rewritten by prune's
relink (which always comes with the removal of a point of the same machine) are seen at the next
call.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from lifeboat.archive.points import POINT_PREFIX, PointInfo, check_machine
from lifeboat.archive.store import Archive
from lifeboat.plumbing.errors import UsageError


@dataclass(frozen=True)
class MachineSummary:
    """What a machine's points add up to: the dashboard's row and its share of the totals."""

    machine: str
    points: int
    newest: PointInfo
    logical_bytes: int  # the sizes of its points' disks, summed
    stored_bytes: int  # what their captures added to the store, after dedup and compression


def summarize(machine: str, points: Iterable[PointInfo]) -> MachineSummary | None:
    """The summary of ``machine``'s points (any order), or ``None`` when it has none."""
    found = sorted(points, key=lambda p: (p.when, p.point))
    if not found:
        return None
    return MachineSummary(machine, len(found), found[-1], sum(p.size for p in found),
                          sum(p.bytes_stored for p in found))


class Catalog:
    """Per-machine summaries of ``archive``'s points, re-read only where the catalog changed; one
    instance serves a long-running reader (``lifeboat web``) from several threads."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self._lock = threading.Lock()
        self._known: dict[str, tuple[Hashable, MachineSummary | None]] = {}
        self.reads = 0  # machines read again, in all: what tests look at to see the cache work

    def stamps(self) -> dict[str, Hashable]:
        """A stamp per machine folder, equal between two calls only if its points did not change."""
        found = self.archive.backend.change_stamps(POINT_PREFIX)
        if found is not None:
            return found
        keys: dict[str, set[str]] = {}
        for key in self.archive.backend.list(POINT_PREFIX):
            if key.count("/") == 2:
                keys.setdefault(key.split("/")[1], set()).add(key)
        return {m: frozenset(k) for m, k in keys.items()}

    def _read(self, machine: str) -> MachineSummary | None:
        """A machine's summary from its manifests; a folder that is no machine's (``lost+found``)
        has none."""
        try:
            check_machine(machine)
        except UsageError:
            return None
        return summarize(machine, self.archive.points(machine))

    def summaries(self) -> dict[str, MachineSummary]:
        """Every machine with at least one point, by name, with its summary as of now."""
        with self._lock:
            stamps = self.stamps()
            known = {m: entry for m, entry in self._known.items() if m in stamps}
            for machine, stamp in stamps.items():
                entry = known.get(machine)
                if entry is None or entry[0] != stamp:
                    known[machine] = (stamp, self._read(machine))
                    self.reads += 1
            self._known = known
            return {m: summary for m, (_, summary) in sorted(known.items()) if summary is not None}
