"""Process helpers against real child processes: recognised by pid and token, stopped politely
or not, zombies counted as dead; and the log tail quoted in error messages."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lifeboat.plumbing.proc import log_tail, process_matches, start_service, stop_process

SLEEPER = "import signal, sys, time\nif sys.argv[1] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" \
          "print('ready', flush=True)\ntime.sleep(600)"


@contextlib.contextmanager
def child(token: str, mode: str = "polite") -> Iterator[int]:
    """A sleeping child with ``token`` on its command line; killed and reaped at the end if still there."""
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, mode, token], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with proc.stdout:
        assert proc.stdout.readline() == "ready\n"
        try:
            yield proc.pid
        finally:
            if process_matches(proc.pid, token):
                proc.kill()
            proc.wait(timeout=30)  # reaped elsewhere reads as status 0


def test_a_process_is_ours_by_pid_and_token() -> None:
    with child("lifeboat-token-1") as pid:
        assert process_matches(pid, "lifeboat-token-1")
        assert not process_matches(pid, "lifeboat-token-2")  # a reused pid is not ours
    assert not process_matches(pid, "lifeboat-token-1")


def test_stop_process_terms_then_kills() -> None:
    with child("lifeboat-polite") as polite, child("lifeboat-stubborn", "stubborn") as stubborn:
        stop_process(polite, "lifeboat-polite")
        stop_process(stubborn, "lifeboat-stubborn", grace=0.5)
        assert not process_matches(polite, "lifeboat-polite")
        assert not process_matches(stubborn, "lifeboat-stubborn")


def test_stop_process_leaves_a_stranger_alone() -> None:
    with child("lifeboat-someone-else") as pid:
        stop_process(pid, "lifeboat-not-this-one")
        assert process_matches(pid, "lifeboat-someone-else")


def test_a_zombie_is_dead_and_reaped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass", "lifeboat-zombie"])
    pid = proc.pid
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":  # exited, not reaped
        time.sleep(0.01)
    assert not process_matches(pid, "lifeboat-zombie")
    assert not Path(f"/proc/{pid}").exists()
    assert proc.wait(timeout=30) == 0  # Popen learns it is gone (reaped elsewhere reads as 0)


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    assert log_tail(log) == "(no log)"
    log.write_text("\n")
    assert log_tail(log) == "(empty log)"
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    assert log_tail(log) == "line 5 | line 6 | line 7 | line 8 | line 9"
    assert log_tail(log, lines=2) == "line 8 | line 9"


def test_start_service_records_the_pid_waits_until_ready_and_reports_a_death(tmp_path: Path) -> None:
    flag, out = tmp_path / "ready", tmp_path / "out.log"
    pids: list[int] = []
    cmd = ["sh", "-c", f"echo starting; sleep 0.3; touch {flag}; exec sleep 30"]
    assert start_service(cmd, out, flag.exists, pids.append)
    assert flag.exists() and len(pids) == 1
    os.kill(pids[0], signal.SIGTERM)
    dead = ["sh", "-c", "echo cannot bind >&2; exit 3"]
    assert not start_service(dead, out, lambda: False, pids.append)
    assert log_tail(out).endswith("cannot bind")
