"""``lifeboat protect``: continuous captures of a running guest, status and Prometheus metrics,
back-off while the guest is away, a clean stop on SIGINT/SIGTERM, and a chain that survives
restarts of the guest and of the agent."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lifeboat.archive import Archive
from lifeboat.archive.restore import restore
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from tests.agent.guest import Guest, check_point


class Protect:
    """A ``lifeboat protect`` process with its stderr collected."""

    def __init__(self, arc: Archive, spec: str, status: Path, *extra: str) -> None:
        env = {**os.environ, "LIFEBOAT_ARCHIVE": arc.backend.location}
        self.status_file = status
        self.proc = subprocess.Popen([*LIFEBOAT, "protect", "vm", spec, "--no-index", "--status-file", str(status),
                                      *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def status(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.status_file.read_text())
            return doc
        except (OSError, ValueError):
            return {}

    def wait(self, what: str, done: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.status()
            if doc and done(doc):
                return doc
            assert self.proc.poll() is None, "".join(self.stderr)
            time.sleep(0.2)
        raise AssertionError(f"protect never reached {what}: {self.status()}\n{''.join(self.stderr[-20:])}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def test_protect_captures_reports_and_stops_cleanly(arc: Archive, guest: Guest, tmp_path: Path) -> None:
    prom = tmp_path / "lifeboat.prom"
    p = Protect(arc, guest.spec, tmp_path / "status.json", "--rpo", "2", "--metrics-listen", "127.0.0.1:0",
                "--metrics-file", str(prom))
    doc = p.wait("four captures", lambda d: d["captures"] >= 4)
    assert doc["captures_by_mode"].get("full") == 1 and doc["captures_by_mode"].get("incremental-bitmap", 0) >= 3
    assert doc["failures"] == 0 and doc["rpo_target_seconds"] == 2 and doc["achieved"]["cycles"] >= 3
    assert doc["rpo_seconds"] is not None and doc["newest_point"]
    port = next(int(m.group(1)) for line in p.stderr if (m := re.search(r"127\.0\.0\.1:(\d+)/metrics", line)))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert re.search(r'^lifeboat_rpo_seconds\{machine="vm"\} \d', text, re.M), text
    assert re.search(r'^lifeboat_captures_total\{machine="vm",mode="incremental-bitmap"\} \d', text, re.M)
    assert 'lifeboat_rpo_cycle_seconds{machine="vm",quantile="0.99"}' in text
    assert "lifeboat_rpo_target_seconds" in prom.read_text()
    assert p.stop(signal.SIGTERM) == 0
    final = p.status()
    assert final["state"] == "stopped"
    points = arc.points("vm")
    assert len(points) == final["captures"] and points[-1].point == final["newest_point"]
    dest = tmp_path / "newest.img"
    restore(arc.reader(points[-1]), dest)
    check_point(dest, points[-1].time, guest.console)


def test_protect_backs_off_and_survives_guest_restarts(arc: Archive, sample_guest_image: Path,
                                                       tmp_path: Path) -> None:
    from tests.agent.guest import make_disk

    work = tmp_path / "g"
    work.mkdir()
    guest = Guest(make_disk(sample_guest_image, work), work)
    p = Protect(arc, guest.spec, tmp_path / "status.json", "--rpo", "1", "--max-backoff", "2")
    try:
        doc = p.wait("failures while no guest runs", lambda d: d["consecutive_failures"] >= 2)
        assert doc["captures"] == 0 and "connect" in doc["last_error"]
        guest.start()
        p.wait("captures once the guest runs", lambda d: d["captures"] >= 2)
        guest.kill()
        p.wait("a failure after the kill", lambda d: d["consecutive_failures"] >= 1)
        guest.start()
        doc = p.wait("recovery with a fallback", lambda d: d["fallbacks"] >= 1 and d["consecutive_failures"] == 0
                     and d["captures_by_mode"].get("incremental-bitmap", 0) >= 2)
        assert doc["failures"] >= 3
        assert p.stop(signal.SIGINT) == 0
        newest = arc.points("vm")[-1]
        dest = tmp_path / "newest.img"
        restore(arc.reader(newest), dest)
        check_point(dest, newest.time, guest.console)
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
        guest.kill()


def test_protect_resumes_the_chain_after_its_own_restart(arc: Archive, guest: Guest, tmp_path: Path) -> None:
    env = {**os.environ, "LIFEBOAT_ARCHIVE": arc.backend.location}
    docs = []
    for n in (2, 1):
        out = subprocess.run([*LIFEBOAT, "protect", "vm", guest.spec, "--rpo", "1", "--max-captures", str(n),
                              "--no-index", "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        docs.append(json.loads(out.stdout))
    assert docs[0]["captures_by_mode"] == {"full": 1, "incremental-bitmap": 1}
    assert docs[1]["captures_by_mode"] == {"incremental-bitmap": 1}  # the chain continued across the restart
    assert docs[1]["last_capture"]["fallback_reason"] is None
    assert len(arc.points("vm")) == 3
