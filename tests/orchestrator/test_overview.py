"""The dashboard's additions (``orchestrator/overview.py``) on hand-made inputs: the strictest RPO
objective of the runbooks, protect status files read against a given clock, off-site lag."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from lifeboat.archive import PointInfo
from lifeboat.archive.catalog import summarize
from lifeboat.orchestrator import overview
from lifeboat.orchestrator.runbook import load
from lifeboat.orchestrator.state import Run, SqliteState
from tests.orchestrator.test_engine import machine, runbook, write_runbook

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC).timestamp()


def iso(seconds_before_now: float) -> str:
    return datetime.fromtimestamp(NOW - seconds_before_now, UTC).isoformat()


def test_the_strictest_objective_of_the_runbooks_wins(tmp_path: Path) -> None:
    qemu = {"driver": "qemu"}
    a = write_runbook(tmp_path / "a.yaml", runbook("a", [machine("app", point="web01@latest", rpo_objective="4h"),
                                                          machine("db", point="db01", rpo_objective=600)], target=qemu))
    b = write_runbook(tmp_path / "b.yaml", runbook("b", [machine("web01", point="web01@latest", rpo_objective="1h"),
                                                          machine("x", point="x01")], target=qemu))
    assert overview.rpo_objectives([load(a), load(b)]) == {"web01": 3600, "db01": 600}


def test_protect_states_against_the_clock(tmp_path: Path) -> None:
    def status(name: str, machine: str, state: str, age: float, error: str | None = None) -> None:
        (tmp_path / name).write_text(json.dumps({"machine": machine, "state": state, "updated": iso(age),
                                                 "last_error": error, "rpo_target_seconds": 60}))

    status("a.json", "waiting01", "waiting", 2)
    status("b.json", "quiet01", "waiting", 600)
    status("c.json", "busy01", "capturing", 600)  # a capture writes nothing until it ends
    status("d.json", "retry01", "backing-off", 1, "StorageError: gone")
    status("e.json", "done01", "stopped", 5)
    status("f-old.json", "waiting01", "stopped", 900)  # an older file of the same machine
    (tmp_path / "g.json").write_text("{not json")
    found = overview.protect_states(tmp_path, NOW)
    assert {m: s["state"] for m, s in found.items()} == {"waiting01": "running", "quiet01": "silent",
                                                         "busy01": "capturing", "retry01": "backing-off",
                                                         "done01": "stopped"}
    assert found["quiet01"]["quiet_seconds"] == 600 and found["retry01"]["last_error"] == "StorageError: gone"
    assert overview.protect_states(tmp_path / "absent", NOW) == {} and overview.protect_states(None, NOW) == {}


def test_offsite_lag() -> None:
    def point(machine: str, name: str, age: float) -> PointInfo:
        return PointInfo(machine, name, iso(age), None, 1, 1, 1, 1, 1, "test")

    def summaries(points: list[PointInfo]) -> dict[str, object]:
        return {p.machine: summarize(p.machine, [q for q in points if q.machine == p.machine]) for p in points}

    here = summaries([point("a", "a1", 7200), point("a", "a2", 60), point("b", "b1", 30), point("c", "c1", 10)])
    there = summaries([point("a", "a1", 7200), point("b", "b1", 30)])
    lag = overview.offsite_lag(here, there, NOW)  # type: ignore[arg-type]
    # as `lifeboat replicate` says it: the age of the newest point not yet off-site (a2's, c1's)
    assert lag["a"] == {"newest_point": "a1", "newest_time": iso(7200), "lag_seconds": 60}
    assert lag["b"]["lag_seconds"] == 0 and lag["c"] == {"newest_point": None, "newest_time": None, "lag_seconds": 10}


def test_last_verified_and_a_drill_that_failed_since() -> None:
    def run(rid: str, kind: str, at: float, *machines: tuple[str, str, str]) -> Run:
        report = {"machines": [{"name": n, "point_machine": pm, "status": st, "point": "p" + rid, "rto_seconds": 9.5}
                               for n, pm, st in machines]}
        return Run(rid, "drill", "/r.yaml", "d", kind, "x", "done", at, at + 60, 0, None, report)

    runs = [
        run("1", "rehearsal", 100, ("app", "web01", "succeeded"), ("db", "db01", "succeeded")),
        run("2", "failover", 200, ("app", "web01", "failed")),  # not a rehearsal: not a verification
        run("3", "rehearsal", 300, ("app", "web01", "failed"), ("db", "db01", "succeeded")),
        run("4", "rehearsal", 400, ("x", "new01", "blocked")),
    ]
    found = overview.last_verified(runs)
    assert found["web01"]["run"] == "1" and found["web01"]["point"] == "p1" and found["web01"]["when"] == 160
    assert found["web01"]["latest"] == {"run": "3", "status": "failed", "when": 360}
    assert found["db01"]["run"] == "3" and found["db01"]["latest"]["status"] == "succeeded"
    assert found["new01"]["run"] is None and found["new01"]["latest"]["status"] == "blocked"


def test_the_state_store_finds_what_last_verified_needs_without_every_run(tmp_path: Path) -> None:
    state = SqliteState(tmp_path)
    plan = [("drill", "rehearsal", [("app", "web01", "succeeded"), ("db", "db01", "succeeded")])] * 30 + [
        ("fail", "failover", [("app", "web01", "failed")]),
        ("drill", "rehearsal", [("app", "web01", "failed"), ("db", "db01", "succeeded")]),
        ("other", "rehearsal", [("x", "new01", "blocked")]),
    ]
    for at, (name, kind, machines) in enumerate(plan):
        r = state.new_run(name, f"/{name}.yaml", "d", kind)
        report = {"machines": [{"name": n, "point_machine": pm, "status": st, "point": f"p{at}", "rto_seconds": 9.5}
                               for n, pm, st in machines]}
        state.update_run(r.id, status="succeeded", phase="done", started=float(at), finished=at + 0.5, report=report)
    chosen = state.verifying_runs()
    assert len(chosen) <= 4 < len(state.runs())  # per machine its last success and last drill
    assert overview.last_verified(chosen) == overview.last_verified(state.runs())
    assert [(r.runbook, r.started) for r in state.newest_runs()] == [("drill", 31), ("fail", 30), ("other", 32)]
    state.close()
