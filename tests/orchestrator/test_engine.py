"""The runbook engine through the real ``lifeboat`` CLI: order and parallelism, failures that
block dependents, hooks (shell and a real Ansible playbook), the webhook, the failover path,
SIGTERM and resume, a changed runbook, dry runs. Machines are local processes
(``procdriver.py``) so that these tests are about the engine; ``test_rehearsal_e2e.py`` and
``test_resume.py`` run real guests under qemu and libvirt."""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lifeboat.orchestrator.state import SqliteState
from tests.orchestrator.procdriver import PLUGIN
from tests.targets.realpeers import LIFEBOAT, REPO, lifeboat, qemu_processes

ENV = {"LIFEBOAT_PLUGINS": PLUGIN}


@pytest.fixture
def tiny_archive(tmp_path: Path) -> Path:
    """An archive whose machine ``tiny`` is a 1 MiB image starting with a greeting."""
    image = tmp_path / "tiny.img"
    image.write_bytes(b"HELLO tiny v1".ljust(1024 * 1024, b"\0"))
    archive = tmp_path / "archive"
    lifeboat("archive", "init", "--chunk-size", "65536", "--archive", str(archive), check=True)
    lifeboat("backup", "tiny", str(image), "--archive", str(archive), check=True)
    return archive


def write_runbook(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
    return path


def runbook(name: str, machines: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "name": name,
        "kind": "rehearsal",
        "target": {"driver": "proc"},
        "network": {"mode": "none"},
        "machines": machines,
    }
    doc.update(extra)
    return doc


def machine(name: str, **extra: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "name": name,
        "point": "tiny@latest",
        "health": [{"name": "disk", "console": "LIFEBOAT-GUEST: disk HELLO tiny v1", "timeout": 30}],
    }
    m.update(extra)
    return m


def run_json(rb: Path, archive: Path, state: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    done = lifeboat("run", str(rb), "--archive", str(archive), "--state", str(state), "--json", *args, env=ENV)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}, done.stderr


def steps_of(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    return {m["name"]: {s["step"]: s for s in m["steps"]} for m in report["machines"]}


def nothing_left(state_dir: Path, run_id: str) -> None:
    state = SqliteState(state_dir)
    assert state.resources(run_id) == []
    assert qemu_processes(f"lifeboat-{run_id.rsplit('-', 1)[-1]}-") == []
    assert not (state_dir / "runs" / run_id / "db1").exists()


def test_groups_and_dependencies_order_parallel_machines(tiny_archive: Path, tmp_path: Path) -> None:
    doc = runbook(
        "order",
        [
            machine("db1", group="data"),
            machine("db2", group="data"),
            machine("app1", group="apps"),
            machine("web", depends_on=["app1"]),
        ],
        groups=[{"name": "data", "priority": 1}, {"name": "apps", "priority": 2}],
    )
    rb = write_runbook(tmp_path / "order.yaml", doc)
    code, out, err = run_json(rb, tiny_archive, tmp_path / "state")
    assert code == 0, err
    assert out["status"] == "succeeded" and [m["status"] for m in out["machines"]] == ["succeeded"] * 4
    report = json.loads(Path(out["report"]["json"]).read_text())
    st = steps_of(report)
    data_healthy = max(st["db1"]["health"]["end"], st["db2"]["health"]["end"])
    assert st["app1"]["resolve"]["start"] >= data_healthy  # priority 2 waits for priority 1
    assert st["web"]["resolve"]["start"] >= st["app1"]["health"]["end"]  # depends_on
    db1, db2 = st["db1"]["health"], st["db2"]["health"]
    assert db1["start"] < db2["end"] and db2["start"] < db1["end"]  # same priority: in parallel
    for m in report["machines"]:
        assert "LIFEBOAT-GUEST: disk HELLO tiny v1" in m["console_tail"]
        assert m["rpo_seconds"] >= 0 and m["rto_seconds"] > 0
    assert any("started" in e["message"] for e in report["events"])
    nothing_left(tmp_path / "state", out["run_id"])
    suite = ET.parse(out["report"]["junit"]).getroot()
    assert suite.get("tests") == "8" and suite.get("failures") == "0"
    page = Path(out["report"]["html"]).read_text()
    assert "<svg" in page and all(f">{n}<" in page for n in ("db1", "db2", "app1", "web"))


class Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append({"body": json.loads(body), "token": self.headers.get("X-Token")})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    Hook.received = []
    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dr"
    server.shutdown()
    server.server_close()


def test_a_failure_blocks_dependents_is_reported_and_everything_is_torn_down(
    tiny_archive: Path, tmp_path: Path, webhook: str
) -> None:
    doc = runbook(
        "fail",
        [
            machine("db1", target={"settings": {"fail": True}}),
            machine("db2"),
            machine("app1", depends_on=["db1"]),
            machine("web", depends_on=["app1"]),
        ],
        report={"webhook": {"url": webhook, "when": "failure", "headers": {"X-Token": "s3cret"}}},
    )
    rb = write_runbook(tmp_path / "fail.yaml", doc)
    code, out, err = run_json(rb, tiny_archive, tmp_path / "state")
    assert code == 1
    assert out["status"] == "failed"
    assert {m["name"]: m["status"] for m in out["machines"]} == {
        "db1": "failed",
        "db2": "succeeded",
        "app1": "blocked",
        "web": "blocked",
    }
    assert "process exited" in out["machines"][0]["error"]
    report = json.loads(Path(out["report"]["json"]).read_text())
    assert "boot" not in steps_of(report)["app1"]  # never started
    assert "LIFEBOAT-GUEST: panic" in report["machines"][0]["console_tail"]
    nothing_left(tmp_path / "state", out["run_id"])
    suite = ET.parse(out["report"]["junit"]).getroot()
    failures = [
        c.get("classname", "").rsplit(".", 1)[-1] for c in suite.iter("testcase") if c.find("failure") is not None
    ]
    assert sorted(set(failures)) == ["app1", "db1", "web"]
    assert len(Hook.received) == 1 and Hook.received[0]["token"] == "s3cret"
    body = Hook.received[0]["body"]
    assert body["status"] == "failed" and body["run_id"] == out["run_id"]
    assert [m["status"] for m in body["machines"]] == ["failed", "succeeded", "blocked", "blocked"]


def test_hooks_shell_and_ansible_get_the_run_context(tiny_archive: Path, tmp_path: Path) -> None:
    playbook = tmp_path / "note.yml"
    playbook.write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.copy:\n"
        '        dest: "{{ out_dir }}/ansible-{{ lifeboat_machine }}.txt"\n'
        '        content: "{{ lifeboat_point }} {{ lifeboat_reip_address }}"\n'
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    m = machine(
        "db1",
        network={"reip": {"address": "10.20.0.5/24", "gateway": "10.20.0.1"}},
        hooks={
            "before_boot": [
                {"shell": f'echo "$LIFEBOAT_MACHINE $LIFEBOAT_POINT $LIFEBOAT_REIP_GATEWAY" > {out_dir}/shell.txt'}
            ],
            "after_healthy": [{"ansible": {"playbook": "note.yml", "extravars": {"out_dir": str(out_dir)}}}],
        },
    )
    doc = runbook("hooks", [m], hooks={"after_run": [{"shell": "exit 7", "on_failure": "continue"}]})
    rb = write_runbook(tmp_path / "hooks.yaml", doc)
    code, out, err = run_json(rb, tiny_archive, tmp_path / "state")
    assert code == 0, err
    point = out["machines"][0]["point"]
    assert (out_dir / "shell.txt").read_text().split() == ["db1", point, "10.20.0.1"]
    assert (out_dir / "ansible-db1.txt").read_text() == f"{point} 10.20.0.5/24"
    report = json.loads(Path(out["report"]["json"]).read_text())
    assert any("hook failed, continuing" in e["message"] and e["level"] == "warning" for e in report["events"])


def test_failover_needs_yes_is_safe_to_rerun_and_tears_down_on_request(tiny_archive: Path, tmp_path: Path) -> None:
    doc = runbook("fo", [machine("db1")], kind="failover")
    rb = write_runbook(tmp_path / "fo.yaml", doc)
    common = ["--archive", str(tiny_archive), "--state", str(tmp_path / "state")]
    assert lifeboat("failover", str(rb), *common, env=ENV).returncode == 2
    refused = lifeboat("run", str(rb), *common, env=ENV)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert not (tmp_path / "state").exists()
    first = lifeboat("failover", str(rb), "--yes", "--json", *common, env=ENV)
    assert first.returncode == 0, first.stderr
    doc1 = json.loads(first.stdout)
    token = f"lifeboat-{doc1['run_id'].rsplit('-', 1)[-1]}-db1"
    assert doc1["status"] == "succeeded" and len(qemu_processes(token)) == 1  # kept running
    again = json.loads(lifeboat("failover", str(rb), "--yes", "--json", *common, env=ENV).stdout)
    assert again["already_done"] and again["run_id"] == doc1["run_id"] and len(qemu_processes(token)) == 1
    assert lifeboat("teardown", str(rb), *common, env=ENV).returncode == 2  # production: needs --yes
    assert lifeboat("teardown", str(rb), "--yes", *common, env=ENV).returncode == 0
    assert qemu_processes(token) == []
    third = json.loads(lifeboat("failover", str(rb), "--yes", "--json", *common, env=ENV).stdout)
    assert third["run_id"] != doc1["run_id"] and not third["already_done"]
    lifeboat("teardown", str(rb), "--yes", *common, env=ENV, check=True)
    rehearsal = write_runbook(tmp_path / "r.yaml", runbook("r", [machine("db1")]))
    assert lifeboat("failover", str(rehearsal), "--yes", *common, env=ENV).returncode == 2


def start_run(rb: Path, archive: Path, state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        LIFEBOAT + ["run", str(rb), "--archive", str(archive), "--state", str(state), "--json"],
        cwd=REPO,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO), **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(state_dir: Path, runbook_name: str, machine_name: str, step: str, timeout: float = 60) -> None:
    """Until a run of ``runbook_name`` records ``step`` (runs of other runbooks in the same state
    directory do not count: a slow start must not be mistaken for an earlier run's step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (state_dir / "state.db").exists():
            state = SqliteState(state_dir)
            for run in state.runs(runbook_name):
                st = state.step(run.id, machine_name, step)
                if st is not None:
                    return
        time.sleep(0.1)
    raise AssertionError(f"{machine_name} never reached {step}")


def test_sigterm_interrupts_then_the_same_command_resumes(tiny_archive: Path, tmp_path: Path) -> None:
    m = machine("db1", target={"settings": {"delay": 3}})
    rb = write_runbook(tmp_path / "slow.yaml", runbook("slow", [m]))
    state_dir = tmp_path / "state"
    proc = start_run(rb, tiny_archive, state_dir)
    wait_for_step(state_dir, "slow", "db1", "health")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    first = json.loads(out)
    assert first["status"] == "interrupted"
    token = f"lifeboat-{first['run_id'].rsplit('-', 1)[-1]}-db1"
    pids = qemu_processes(token)
    assert len(pids) == 1  # left running for the resume
    code, second, err = run_json(rb, tiny_archive, state_dir)
    assert code == 0, err
    assert second["run_id"] == first["run_id"] and second["resumed"] and second["status"] == "succeeded"
    report = json.loads(Path(second["report"]["json"]).read_text())
    assert report["resumes"] == 1
    messages = [e["message"] for e in SqliteState(state_dir).events(second["run_id"])]
    assert "health (again)" in messages and "boot" in messages and "boot (again)" not in messages
    machine_proc = [
        r
        for r in SqliteState(state_dir).resources(second["run_id"], live=False)
        if r.kind == "process" and r.owner == "proc"
    ]
    assert [r.data["pid"] for r in machine_proc] == pids  # the same machine, not a second one
    nothing_left(state_dir, second["run_id"])


def test_changed_runbook_abandons_an_open_rehearsal_but_stops_a_failover(tiny_archive: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    # the guest boots only after 20 s (the SIGTERM cuts it short): a loaded machine must not let
    # the health check pass before the signal lands
    slow = machine("db1", target={"settings": {"delay": 20}})
    rb = write_runbook(tmp_path / "rb.yaml", runbook("changing", [slow]))
    proc = start_run(rb, tiny_archive, state_dir)
    wait_for_step(state_dir, "changing", "db1", "health")
    proc.send_signal(signal.SIGTERM)
    first = json.loads(proc.communicate(timeout=60)[0])
    write_runbook(rb, runbook("changing", [machine("db1")]))  # edited while the run is open
    code, second, err = run_json(rb, tiny_archive, state_dir)
    assert code == 0, err
    assert second["run_id"] != first["run_id"] and not second["resumed"]
    runs = {r.id: r for r in SqliteState(state_dir).runs("changing")}
    assert runs[first["run_id"]].status == "abandoned" and SqliteState(state_dir).resources(first["run_id"]) == []

    fo = write_runbook(tmp_path / "fo.yaml", runbook("fo-changing", [slow], kind="failover"))
    proc = subprocess.Popen(
        LIFEBOAT + ["failover", str(fo), "--yes", "--archive", str(tiny_archive), "--state", str(state_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO), **ENV},
        text=True,
    )
    wait_for_step(state_dir, "fo-changing", "db1", "health")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    write_runbook(fo, runbook("fo-changing", [machine("db1")], kind="failover"))
    done = lifeboat("failover", str(fo), "--yes", "--archive", str(tiny_archive), "--state", str(state_dir), env=ENV)
    assert done.returncode == 2 and "changed since run" in done.stderr
    lifeboat(
        "teardown", str(fo), "--yes", "--archive", str(tiny_archive), "--state", str(state_dir), env=ENV, check=True
    )


def test_dry_run_prints_the_plan_and_changes_nothing(tiny_archive: Path, tmp_path: Path) -> None:
    doc = runbook(
        "plan",
        [machine("db1", group="data"), machine("web", group="apps")],
        groups=[{"name": "data", "priority": 1}, {"name": "apps", "priority": 2}],
    )
    rb = write_runbook(tmp_path / "plan.yaml", doc)
    common = ["--archive", str(tiny_archive), "--state", str(tmp_path / "state")]
    done = lifeboat("run", str(rb), "--dry-run", *common, env=ENV)
    assert done.returncode == 0, done.stderr
    assert "wave 1 (in parallel): db1" in done.stdout and "wave 2 (in parallel): web" in done.stdout
    assert "nothing was changed" in done.stdout
    plan = json.loads(lifeboat("run", str(rb), "--dry-run", "--json", *common, env=ENV).stdout)
    point = json.loads(lifeboat("points", "tiny", "--archive", str(tiny_archive), "--json").stdout)[-1]["point"]
    assert plan["waves"] == [["db1"], ["web"]] and plan["machines"][0]["resolved"]["point"] == point
    assert not (tmp_path / "state").exists()
