"""What the dashboard adds to each machine's RPO row: its objective from the runbooks, whether
``lifeboat protect`` is running for it, when it was last verified restorable, and how far the
off-site copy lags.

- **Objectives.** A runbook machine's ``rpo_objective`` holds the archive machine its point selector
  names to it; where several runbooks name one machine, the strictest wins. Others keep
  ``--rpo-objective``.
- **Protect.** ``lifeboat protect --status-file`` replaces its JSON status every second while it
  waits and after every capture; the pane reads those files from one folder. A loop whose file
  stopped moving for ``PROTECT_SILENT_SECONDS`` (and is not in a capture, which writes nothing
  until it ends) is ``silent``: killed, or its host is down.
- **Verified restorable.** The newest rehearsal in which the machine succeeded: booted from a
  point and passed its health checks. Its point and measured RTO are shown, and the newest
  rehearsal's result when it did not succeed.
- **Off-site lag.** The age of the newest point not yet off-site, as ``lifeboat replicate`` reports
  it, from the replica's own catalog (``lifeboat replicate`` copies manifests last, so a listed
  point is complete there): 0 while the newest local point is there.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lifeboat.archive import replicate
from lifeboat.archive.catalog import MachineSummary
from lifeboat.archive.points import parse_selector
from lifeboat.orchestrator.runbook import Runbook
from lifeboat.orchestrator.state import Run

PROTECT_SILENT_SECONDS = 30.0


def rpo_objectives(runbooks: list[Runbook]) -> dict[str, float]:
    """Archive machine -> its RPO objective in seconds, the strictest of the runbooks naming it."""
    out: dict[str, float] = {}
    for rb in runbooks:
        for m in rb.machines:
            if m.rpo_objective is None:
                continue
            machine = parse_selector(m.selector)[0]
            out[machine] = min(out.get(machine, m.rpo_objective), m.rpo_objective)
    return out


def protect_states(folder: Path | None, now: float) -> dict[str, dict[str, Any]]:
    """Machine -> its protect loop as the newest status file in ``folder`` tells it: ``state``
    (``running``, ``capturing``, ``backing-off``, ``silent`` or ``stopped``), when the file was
    written, the loop's RPO target and its last error. Unreadable files are left out."""
    out: dict[str, dict[str, Any]] = {}
    if folder is None or not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            machine, loop = str(doc["machine"]), str(doc["state"])
            updated = datetime.fromisoformat(doc["updated"]).timestamp()
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if machine in out and out[machine]["updated"] >= updated:
            continue
        quiet = max(0.0, now - updated)
        if loop == "stopped":
            state = "stopped"
        elif loop == "capturing":
            state = "capturing"
        elif quiet > PROTECT_SILENT_SECONDS:
            state = "silent"
        else:
            state = "backing-off" if loop == "backing-off" else "running"
        out[machine] = {"state": state, "updated": updated, "quiet_seconds": round(quiet, 3),
                        "rpo_target_seconds": doc.get("rpo_target_seconds"), "last_error": doc.get("last_error")}
    return out


def last_verified(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Archive machine -> the newest rehearsal (of ``runs``, oldest first) in which it succeeded:
    the run, when it ended, the point it booted and its RTO; and, as ``latest``, the newest
    rehearsal that booted it at all with the machine's status there (a drill that failed since the
    last success shows)."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r.kind != "rehearsal" or not r.report:
            continue
        for m in r.report.get("machines", []):
            machine = str(m.get("point_machine") or m.get("name"))
            entry = out.setdefault(machine, {"run": None})
            entry["latest"] = {"run": r.id, "status": m.get("status"), "when": r.finished or r.started}
            if m.get("status") == "succeeded":
                entry.update({"run": r.id, "runbook": r.runbook, "when": r.finished or r.started,
                              "point": m.get("point"), "rto_seconds": m.get("rto_seconds")})
    return out


def offsite_lag(local: dict[str, MachineSummary], replica: dict[str, MachineSummary],
                now: float) -> dict[str, dict[str, Any]]:
    """Machine -> its newest replicated point (``None`` with none) and the off-site lag as
    ``lifeboat replicate`` reports it (``archive.replicate.offsite_lag``: the age of the newest point
    not yet off-site, 0 when up to date), judged from each side's newest point."""
    out: dict[str, dict[str, Any]] = {}
    when = datetime.fromtimestamp(now, UTC)
    for machine, here in local.items():
        there = replica.get(machine)
        offsite = there is not None and (there.newest.point == here.newest.point
                                         or there.newest.when >= here.newest.when)
        out[machine] = {"newest_point": there.newest.point if there else None,
                        "newest_time": there.newest.time if there else None,
                        "lag_seconds": replicate.offsite_lag([] if offsite else [here.newest.when], when)}
    return out
