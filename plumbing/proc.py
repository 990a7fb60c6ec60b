"""Processes lifeboat starts and must find again after a crash: ``lifeboat serve`` children, QEMU.

A process is recognised by its pid *and* a token on its command line (a run's token, an export
name), so a pid the kernel reused for something else is never signalled. Linux only: it reads
``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from lifeboat.plumbing.errors import LifeboatError


class ProcessError(LifeboatError):
    """A process of ours would not stop (exit status 1)."""


def process_matches(pid: int, token: str) -> bool:
    """Whether ``pid`` is alive and its command line holds ``token`` (so a reused pid is not ours)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie is dead
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return token.encode() in cmdline


def stop_process(pid: int, token: str, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; only if the process is still ours."""
    if not process_matches(pid, token):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)  # reap if it is our child
                if done == pid:
                    return
            except ChildProcessError:
                pass
            if not process_matches(pid, token):
                return
            time.sleep(0.05)
    raise ProcessError(f"process {pid} ({token}) did not stop")


def log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` lines of a log file on one line, for an error message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def start_service(
    cmd: list[str],
    output: Path,
    ready: Callable[[], bool],
    started: Callable[[int], None],
    *,
    cwd: Path | None = None,
    timeout: float = 30.0,
) -> bool:
    """Start a long-lived helper process in a session of its own (it outlives a crash of ours;
    teardown stops it by pid and token), its output appended to ``output``; ``started(pid)``
    records it at once, then wait until ``ready()``. False when it exited or ``timeout`` passed
    first: the caller names what did not start, with ``log_tail(output)``."""
    with open(output, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                cwd=cwd)
    started(proc.pid)
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
