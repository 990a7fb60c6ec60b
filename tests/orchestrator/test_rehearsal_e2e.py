"""End-to-end DR rehearsals with the real sample guest: ``lifeboat run`` under the qemu target and
under libvirt (kvm target), booting from ``lifeboat serve`` (and, for qemu, from an exported qcow2
image), checked on the serial console, moved onto the hydrated disk, torn down, reported; and
``kill -9`` of the orchestrator mid-run, then the same command resuming to a correct finish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from lifeboat.orchestrator.state import SqliteState
from tests.targets.realpeers import LIFEBOAT, REPO, lifeboat, qemu_processes

CHECKS = [
    {"name": "booted", "console": "LIFEBOAT-GUEST: booted", "timeout": "4m"},
    {"name": "wrote its disk", "console": {"match": r"LIFEBOAT-GUEST: disk-write-ok \d+", "regex": True}},
    {"name": "alive", "console": "LIFEBOAT-GUEST: alive"},
]


def rehearsal(name: str, driver: str, machines: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "name": name,
        "kind": "rehearsal",
        "target": {"driver": driver, "settings": {"memory_mib": 256}},
        "network": {"mode": "isolated"},
        "machines": machines,
        "move_to_local": True,
    }
    doc.update(extra)
    return doc


def guest(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "point": "sample-guest@latest",
        "source": {"kind": "virtual"},
        "rto_objective": "10m",
        "health": CHECKS,
        **extra,
    }


def check_report(out: dict[str, Any], names: list[str]) -> dict[str, Any]:
    assert out["status"] == "succeeded", out
    report = json.loads(Path(out["report"]["json"]).read_text())
    point = report["machines"][0]["point"]
    for m in report["machines"]:
        assert m["status"] == "succeeded" and m["point"] == point
        assert "LIFEBOAT-GUEST: disk-record 0 sample-guest" in m["console_tail"]
        assert "LIFEBOAT-GUEST: disk-write-ok 1" in m["console_tail"]
        assert any(line.startswith("LIFEBOAT-GUEST: alive") for line in m["console_tail"])
        assert [c["ok"] for c in m["health"]] == [True, True, True]
        steps = {s["step"]: s["status"] for s in m["steps"] if not s["step"].startswith("hook.")}
        assert steps == {
            s: "done" for s in ("resolve", "prepare", "export", "provision", "boot", "health", "localize", "teardown")
        }
        assert 0 < m["rto_seconds"] < 600 and m["rto_met"] is True
        point_time = m["point_time"]
        assert m["rpo_seconds"] == pytest.approx(report["started_unix"] - _unix(point_time), abs=0.01)
    suite = ET.parse(out["report"]["junit"]).getroot()
    assert suite.get("failures") == "0" and suite.get("tests") == str(5 * len(names))
    page = Path(out["report"]["html"]).read_text()
    assert "<svg" in page and "LIFEBOAT-GUEST: alive" in page and "succeeded" in page
    assert "<script" not in page and "http" not in page.split("<body>", 1)[1].split("Archive")[0]  # self-contained
    return report


def _unix(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def nothing_left(state_dir: Path, run_id: str, names: list[str]) -> None:
    assert SqliteState(state_dir).resources(run_id) == []
    short = run_id.rsplit("-", 1)[-1]
    for n in names:
        assert qemu_processes(f"lifeboat-{short}-{n}") == []
        assert not (state_dir / "runs" / run_id / n).exists()


@pytest.mark.parametrize("boot", ["nbd", "image"])
def test_rehearsal_under_qemu(boot: str, sample_archive: Path, tmp_path: Path) -> None:
    """``boot: nbd`` boots from ``lifeboat serve`` and moves onto the hydrated disk; ``boot: image``
    boots from the qcow2 file an exporter wrote for the engine, with no server running at any time."""
    doc = rehearsal(f"e2e-qemu-{boot}", "qemu", [guest("web01")])
    doc["target"]["settings"]["boot"] = boot
    rb = tmp_path / "qemu.yaml"
    rb.write_text(json.dumps(doc))
    state = tmp_path / "state"
    done = lifeboat("run", str(rb), "--archive", str(sample_archive), "--state", str(state), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    report = check_report(out, ["web01"])
    nothing_left(state, out["run_id"], ["web01"])
    assert any(e["message"] == "teardown" for e in report["events"])
    created = SqliteState(state).resources(out["run_id"], live=False)
    servers = [r for r in created if r.owner == "engine" and r.kind == "process"]
    (machine,) = [r for r in created if r.owner == "qemu" and r.kind == "process"]
    if boot == "nbd":
        assert "now running on the local disk" in done.stderr and len(servers) == 1
    else:
        assert machine.data["image_format"] == "qcow2" and "nbd_url" not in machine.data and servers == []


def test_rehearsal_under_libvirt_two_machines_in_priority_order(
    sample_archive: Path, tmp_path: Path, libvirtd: str
) -> None:
    import libvirt

    doc = rehearsal(
        "e2e-kvm",
        "kvm",
        [guest("db", group="data"), guest("app", group="apps")],
        groups=[{"name": "data", "priority": 1}, {"name": "apps", "priority": 2}],
    )
    rb = tmp_path / "kvm.yaml"
    rb.write_text(json.dumps(doc))
    state = tmp_path / "state"
    done = lifeboat("run", str(rb), "--archive", str(sample_archive), "--state", str(state), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    report = check_report(out, ["db", "app"])
    steps = {m["name"]: {s["step"]: s for s in m["steps"]} for m in report["machines"]}
    assert steps["app"]["resolve"]["start"] >= steps["db"]["health"]["end"]
    nothing_left(state, out["run_id"], ["db", "app"])
    conn = libvirt.open(libvirtd)
    short = out["run_id"].rsplit("-", 1)[-1]
    assert not [d for d in conn.listAllDomains() if short in d.name()]
    assert not [n for n in conn.listAllNetworks() if short in n.name()]
    conn.close()
    assert not list(Path("/var/lib/lifeboat/kvm").glob(f"lifeboat-{short}-*"))


@pytest.mark.parametrize("kill_at", ["health", "hook.before_teardown.0"])
def test_kill_9_mid_run_then_resume(sample_archive: Path, tmp_path: Path, kill_at: str) -> None:
    """kill -9 while the guest is booting (health) or once teardown has begun (its first step, a
    hook); the same command then adopts what runs (never a second guest) and finishes correctly."""
    rb = tmp_path / "kill.yaml"
    hooks = {"before_teardown": [{"shell": "sleep 3"}]}
    rb.write_text(json.dumps(rehearsal("e2e-kill", "qemu", [guest("web01", hooks=hooks)])))
    state_dir = tmp_path / "state"
    cmd = LIFEBOAT + ["run", str(rb), "--archive", str(sample_archive), "--state", str(state_dir), "--json"]
    errlog = open(tmp_path / "first-run.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=errlog, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    deadline = time.monotonic() + 300
    run_id = None
    while True:
        assert proc.poll() is None, (tmp_path / "first-run.log").read_text()
        assert time.monotonic() < deadline, f"never reached {kill_at}"
        if (state_dir / "state.db").exists():
            state = SqliteState(state_dir)
            runs = state.runs("e2e-kill")
            if runs:
                run_id = runs[0].id
                st = state.step(run_id, "web01", kill_at)
                if st is not None and (kill_at != "health" or "LIFEBOAT-GUEST: booted" in _console(state_dir, run_id)):
                    break
            state.close()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run_id is not None
    short = run_id.rsplit("-", 1)[-1]
    before = sorted(qemu_processes(f"lifeboat-{short}-web01"))
    assert len(before) == (2 if kill_at == "health" else 1)  # guest and export (moved to local: guest only)
    state = SqliteState(state_dir)
    killed = state.run(run_id)
    assert killed is not None and killed.status == "running"
    assert killed.phase == ("recover" if kill_at == "health" else "teardown")

    done = lifeboat("run", str(rb), "--archive", str(sample_archive), "--state", str(state_dir), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["run_id"] == run_id and out["resumed"] and out["status"] == "succeeded"
    report = check_report(out, ["web01"])
    assert report["resumes"] == 1
    nothing_left(state_dir, run_id, ["web01"])
    if kill_at == "health":
        machines = [r for r in state.resources(run_id, live=False) if r.owner == "qemu" and r.kind == "process"]
        assert len(machines) == 1 and machines[0].data["pid"] in before  # adopted, not booted twice


def _console(state_dir: Path, run_id: str) -> str:
    try:
        return (state_dir / "runs" / run_id / "web01" / "console.log").read_text(errors="replace")
    except OSError:
        return ""
