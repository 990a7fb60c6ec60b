"""The scheduler: catching up on missed runs once, first sightings, and systemd timers whose
OnCalendar= expressions systemd itself agrees fire when cron (croniter) does."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from croniter import croniter

from lifeboat.archive import Archive
from lifeboat.archive.verify import verify
from lifeboat.orchestrator.scheduler import on_calendar
from lifeboat.orchestrator.state import SqliteState
from tests.archive.helpers import BytesSource
from tests.orchestrator.procdriver import PLUGIN
from tests.orchestrator.test_engine import machine, runbook, tiny_archive, write_runbook  # noqa: F401
from tests.targets.realpeers import lifeboat

ENV = {"LIFEBOAT_PLUGINS": PLUGIN}


def test_scheduler_catches_up_once_and_not_on_first_sight(tiny_archive: Path, tmp_path: Path) -> None:  # noqa: F811
    books = tmp_path / "runbooks"
    books.mkdir()
    rb = write_runbook(books / "every-30.yaml", runbook("every-30", [machine("db1")], schedule="*/30 * * * *"))
    write_runbook(books / "unscheduled.yaml", runbook("unscheduled", [machine("db1")]))
    (books / "broken.yaml").write_text("version: 1\nname: [\n")
    state_dir = tmp_path / "state"
    common = ["--archive", str(tiny_archive), "--state", str(state_dir)]

    first = lifeboat("scheduler", str(books), "--once", *common, env=ENV)
    assert first.returncode == 0, first.stderr
    assert "schedule '*/30 * * * *' starts now" in first.stderr and "broken.yaml" in first.stderr
    state = SqliteState(state_dir)
    assert state.runs() == []  # first sight: no run

    three_hours_ago = time.time() - 3 * 3600
    state.set_last_fire(str(rb.resolve()), "every-30", three_hours_ago)
    second = lifeboat("scheduler", str(books), "--once", *common, env=ENV)
    assert second.returncode == 0, second.stderr
    assert "catching up" in second.stderr and "were missed, running once" in second.stderr
    runs = state.runs()
    assert [(r.runbook, r.status) for r in runs] == [("every-30", "succeeded")]
    expected = croniter("*/30 * * * *", datetime.now(UTC)).get_prev(float)
    assert state.last_fire(str(rb.resolve())) == pytest.approx(expected, abs=1)

    third = lifeboat("scheduler", str(books), "--once", *common, env=ENV)
    assert third.returncode == 0 and len(state.runs()) == 1  # nothing due until the next half hour


@pytest.mark.parametrize("expr", ["0 3 1 * *", "*/15 * * * *", "30 2 * * 1-5", "0 4 1,15 * sun", "5 */6 * jan,jul *"])
def test_on_calendar_fires_when_cron_does(expr: str) -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    it = croniter(expr, start)
    cron_times = [it.get_next(datetime) for _ in range(6)]
    systemd_times: list[datetime] = []
    for cal in on_calendar(expr):
        out = subprocess.run(
            ["systemd-analyze", "calendar", "--iterations=6", "--base-time=2026-03-01 00:00:00 UTC", cal],
            capture_output=True,
            text=True,
            env={"TZ": "UTC", "PATH": "/usr/bin:/bin"},
        )
        assert out.returncode == 0, out.stderr
        for line in out.stdout.splitlines():
            line = line.strip()
            if line.startswith(("Next elapse:", "Iter. #")):
                stamp = line.split(":", 1)[1].strip()  # e.g. "Sun 2026-03-01 03:00:00 UTC"
                systemd_times.append(datetime.strptime(stamp[4:23], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC))
    assert sorted(set(systemd_times))[:6] == cron_times


def test_systemd_units_are_written(tmp_path: Path) -> None:
    books = tmp_path / "runbooks"
    books.mkdir()
    write_runbook(books / "rb.yaml", runbook("nightly", [machine("db1")], schedule="0 4 1,15 * sun"))
    done = lifeboat(
        "scheduler", str(books), "--systemd-units", str(tmp_path / "units"), "--state", str(tmp_path / "state"), env=ENV
    )
    assert done.returncode == 0, done.stderr
    timer = (tmp_path / "units" / "lifeboat-nightly.timer").read_text()
    service = (tmp_path / "units" / "lifeboat-nightly.service").read_text()
    assert "OnCalendar=*-*-01,15 04:00:00 UTC\nOnCalendar=Sun *-*-* 04:00:00 UTC\n" in timer
    assert "Persistent=true" in timer and "Unit=lifeboat-nightly.service" in timer
    assert f"run {(books / 'rb.yaml').resolve()} --state {(tmp_path / 'state').resolve()}" in service
    assert "Type=oneshot" in service
    assert json.loads(json.dumps(done.stdout.split()))  # one path per line


def test_a_replication_runbook_runs_on_its_schedule(tmp_path: Path) -> None:
    src = Archive.init(str(tmp_path / "arc"), chunk_size=64 * 1024)
    src.backup("db1", BytesSource(bytes(range(256)) * 1024))
    books = tmp_path / "runbooks"
    books.mkdir()
    rb = books / "offsite.yaml"
    rb.write_text(f"version: 1\nname: offsite\nkind: replication\nschedule: '*/15 * * * *'\n"
                  f"archive: {tmp_path / 'arc'}\nreplicate: {{to: {tmp_path / 'replica'}, bwlimit: 10M}}\n")
    state_dir = tmp_path / "state"
    state = SqliteState(state_dir)
    state.set_last_fire(str(rb.resolve()), "offsite", time.time() - 3600)
    done = lifeboat("scheduler", str(books), "--once", "--state", str(state_dir))
    assert done.returncode == 0, done.stderr
    [run] = state.runs()
    assert (run.runbook, run.kind, run.status) == ("offsite", "replication", "succeeded"), done.stderr
    assert run.report is not None and run.report["lag_seconds"] == 0 and len(run.report["published"]) == 1
    replica = Archive.open(str(tmp_path / "replica"))
    assert [p.point for p in replica.points("db1")] == [p.point for p in src.points("db1")] and verify(replica).ok
    again = lifeboat("run", str(rb), "--state", str(state_dir), "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["replication"]["objects_copied"] == 0
