"""Health checks: is a recovered machine really back?

Three kinds, each retried until it passes or its timeout runs out:
- ``console``: a line on the serial console (the driver writes it to a file): text or a regex.
  For the sample guest this is the real check (``LIFEBOAT-GUEST: alive``).
- ``tcp``: a TCP connection succeeds, to ``host:port`` or, without a host, to wherever the driver
  says the guest's port is reachable (qemu: a loopback port forwarded into the isolated network).
- ``command``: ``in: guest`` runs it through the guest agent (the guest must run
  qemu-guest-agent); ``in: host`` runs it on the orchestrator host with ``LIFEBOAT_*`` variables
  (e.g. ``ssh``, ``curl`` against the recovered machine). Passes on the expected exit status and,
  if given, when the output contains ``expect_output``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lifeboat.orchestrator.runbook import Check
from lifeboat.targets.base import EndpointPending, ExecInGuest, Guest, HasConsole, ResourceLog, Target, TargetError

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[^\[])")


@dataclass
class CheckResult:
    """The outcome of one health check."""

    name: str
    kind: str
    ok: bool
    detail: str
    seconds: float  # from the start of the check to its verdict
    passed_at: float | None  # wall-clock time it passed


def console_text(path: Path | None) -> str:
    """The console file's text without carriage returns and terminal escapes."""
    if path is None:
        return ""
    try:
        raw = path.read_bytes()
    except OSError:
        return ""
    return _ANSI.sub("", raw.decode("utf-8", errors="replace").replace("\r", ""))


def console_matches(text: str, match: str, regex: bool) -> bool:
    """Whether a console line holds ``match`` (a substring, or a regex searched per line)."""
    if regex:
        pattern = re.compile(match)
        return any(pattern.search(line) for line in text.splitlines())
    return any(match in line for line in text.splitlines())


def tcp_open(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def run_check(
    check: Check,
    target: Target,
    guest: Guest,
    log: ResourceLog,
    env: dict[str, str],
    stop: Callable[[], bool],
    poll: Callable[[], None],
) -> CheckResult:
    """Retry ``check`` until it passes, its timeout ends, ``stop()`` says so, or ``poll()``
    raises (the machine is lost)."""
    t0 = time.monotonic()
    deadline = t0 + check.timeout
    last = "not tried"
    while True:
        try:
            poll()
            ok, last = _attempt(check, target, guest, log, env)
        except TargetError as e:
            return CheckResult(check.name, check.kind, False, str(e), time.monotonic() - t0, None)
        if ok:
            return CheckResult(check.name, check.kind, True, last, time.monotonic() - t0, time.time())
        if stop():
            return CheckResult(check.name, check.kind, False, "interrupted", time.monotonic() - t0, None)
        if time.monotonic() >= deadline:
            return CheckResult(
                check.name,
                check.kind,
                False,
                f"timed out after {check.timeout:.0f} s: {last}",
                time.monotonic() - t0,
                None,
            )
        time.sleep(0.5)


def _attempt(check: Check, target: Target, guest: Guest, log: ResourceLog, env: dict[str, str]) -> tuple[bool, str]:
    spec = check.spec
    if check.kind == "console":
        path = target.console_path(guest, log) if isinstance(target, HasConsole) else None
        if path is None:
            raise TargetError(f"the {target.name} target has no console to watch")
        text = console_text(path)
        if console_matches(text, spec["match"], bool(spec.get("regex"))):
            return True, f"console showed {spec['match']!r}"
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return False, f"console has not shown {spec['match']!r} (last line: {lines[-1][:120] if lines else 'none'!r})"
    if check.kind == "tcp":
        port = int(spec["port"])
        if "host" in spec:
            host, real_port = str(spec["host"]), port
        else:
            try:
                endpoint = target.guest_endpoint(guest, log, port)
            except EndpointPending as e:
                return False, str(e)
            if endpoint is None:
                raise TargetError(f"the {target.name} target cannot reach port {port} of {guest.name}; give tcp.host")
            host, real_port = endpoint
        if tcp_open(host, real_port):
            return True, f"TCP {host}:{real_port} accepted a connection"
        return False, f"TCP {host}:{real_port} refused or timed out"
    # command
    run = spec["run"]
    argv = ["/bin/sh", "-c", run] if isinstance(run, str) else list(run)
    want_exit = int(spec.get("expect_exit", 0))
    want_out = spec.get("expect_output")
    if spec.get("in", "guest") == "guest":
        if not isinstance(target, ExecInGuest):
            raise TargetError(f"the {target.name} target cannot run commands in the guest")
        result = target.exec_in_guest(guest, log, argv, timeout=60)
        code, out = result.exit_code, result.output
    else:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
            code, out = done.returncode, done.stdout + done.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"command failed to run: {e}"
    if code != want_exit:
        return False, f"command exited {code} (expected {want_exit}): {out.strip()[-200:]}"
    if want_out is not None and want_out not in out:
        return False, f"command output lacks {want_out!r}: {out.strip()[-200:]}"
    return True, f"command exited {code}"
