"""The orchestrator's facade in process, as the web pane will call it: plan, run, status, runs and
teardown of a failover whose machine is kept, with machines as local processes
(``procdriver.py``); the CLI's use of the same facade is covered by ``test_engine.py``."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from lifeboat.orchestrator import api
from lifeboat.orchestrator.runbook import load
from tests.orchestrator.test_engine import ENV, machine, runbook, tiny_archive, write_runbook  # noqa: F401
from tests.targets.realpeers import qemu_processes


def test_plan_run_status_runs_teardown(
    tiny_archive: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    rb = load(write_runbook(tmp_path / "fo.yaml", runbook("fo", [machine("db1")], kind="failover")))
    planned = api.plan(rb, archive=str(tiny_archive))
    assert planned["archive_error"] is None and planned["machines"][0]["resolved"]["size"] == 1024 * 1024
    assert planned["machines"][0]["steps"][:3] == ["resolve", "prepare", "export"]
    assert not (tmp_path / "state").exists()  # a plan opens no state store

    state = api.open_state(tmp_path / "state")
    lines: list[str] = []
    outcome = api.run(rb, state, archive=str(tiny_archive), stop=threading.Event(), log=lines.append)
    assert outcome.run.status == "succeeded" and not outcome.resumed, lines
    assert outcome.report["machines"][0]["status"] == "succeeded"
    assert any("started" in line for line in lines)
    token = f"lifeboat-{outcome.run.id.rsplit('-', 1)[-1]}-db1"
    assert len(qemu_processes(token)) == 1  # a failover keeps its machines

    again = api.run(rb, state, archive=str(tiny_archive), log=lines.append)
    assert again.already_done and again.run.id == outcome.run.id

    report = api.status(rb, state, archive=str(tiny_archive))
    assert report["run_id"] == outcome.run.id and report["status"] == "succeeded"
    assert report["archive"] == str(tiny_archive)
    assert [s["step"] for s in report["machines"][0]["steps"]][:3] == ["resolve", "prepare", "export"]
    assert [r.id for r in api.runs(state, "fo")] == [outcome.run.id] and api.runs(state, "other") == []

    removed = api.teardown(rb, state, archive=str(tiny_archive), log=lines.append)
    assert removed.resources_removed > 0 and removed.run.phase == "done" and removed.run.status == "torn-down"
    assert qemu_processes(token) == [] and state.resources(outcome.run.id) == []
    assert not state.machines_with_resources(outcome.run.id)
    state.close()
