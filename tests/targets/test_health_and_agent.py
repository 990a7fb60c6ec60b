"""Health checks against real peers: a TCP listener, console files, host commands, and the QEMU
guest agent protocol spoken by a real ``qemu-ga`` (run on this host in ``unix-listen`` mode, in
place of the channel QEMU exposes: the same protocol on the same kind of socket)."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifeboat.orchestrator.health import console_matches, console_text, run_check
from lifeboat.orchestrator.runbook import Check
from lifeboat.targets.base import Guest, MemoryLog, TargetContext
from lifeboat.targets.guestagent import GuestAgent
from lifeboat.targets.qemu import QemuTarget, socket_dir


@pytest.fixture
def qga(tmp_path: Path) -> Iterator[Path]:
    """A real qemu-ga listening on a Unix socket."""
    sock = tmp_path / "qga.sock"
    proc = subprocess.Popen(
        ["qemu-ga", "-m", "unix-listen", "-p", str(sock), "-f", str(tmp_path / "qga.pid"), "-t", str(tmp_path)],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "qemu-ga did not start"
        time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait()


def test_guest_agent_runs_a_command(qga: Path) -> None:
    with GuestAgent(str(qga)) as agent:
        ok = agent.exec(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], timeout=20)
        assert ok.exit_code == 3 and "out" in ok.output and "err" in ok.output


def test_command_check_in_guest_through_the_qemu_driver(qga: Path, tmp_path: Path) -> None:
    target = QemuTarget({}, TargetContext())
    guest = Guest("g", f"20260101T000000-{secrets.token_hex(3)}", tmp_path)
    sockets = socket_dir(guest)  # where the driver expects the agent channel QEMU would create
    sockets.mkdir(parents=True)
    (sockets / "qga.sock").symlink_to(qga)
    try:
        log = MemoryLog("qemu")
        passing = Check("uname", "command", {"run": ["/bin/uname", "-s"], "expect_output": "Linux"}, 20)
        r = run_check(passing, target, guest, log, {}, lambda: False, lambda: None)
        assert r.ok, r.detail
        failing = Check("false", "command", {"run": "exit 4", "expect_exit": 0}, 1)
        r = run_check(failing, target, guest, log, {}, lambda: False, lambda: None)
        assert not r.ok and "exited 4" in r.detail
    finally:
        shutil.rmtree(sockets)


def test_tcp_check_against_a_local_listener(tmp_path: Path) -> None:
    target = QemuTarget({}, TargetContext())
    guest = Guest("g", "20260101T000000-abcdef", tmp_path)
    log = MemoryLog("qemu")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        r = run_check(
            Check("tcp", "tcp", {"port": port, "host": "127.0.0.1"}, 5),
            target,
            guest,
            log,
            {},
            lambda: False,
            lambda: None,
        )
        assert r.ok and f"127.0.0.1:{port}" in r.detail
    r = run_check(
        Check("tcp", "tcp", {"port": port, "host": "127.0.0.1"}, 1), target, guest, log, {}, lambda: False, lambda: None
    )
    assert not r.ok and "timed out" in r.detail
    # through the driver's forwarded port when no host is given
    log.record("process", guest.token, {"token": guest.token, "forwards": {"22": port}})
    assert target.guest_endpoint(guest, log, 22) == ("127.0.0.1", port)


def test_host_command_gets_lifeboat_variables(tmp_path: Path) -> None:
    target = QemuTarget({}, TargetContext())
    guest = Guest("g", "20260101T000000-abcdef", tmp_path)
    check = Check("env", "command", {"run": 'test "$LIFEBOAT_MACHINE" = web01', "in": "host"}, 5)
    r = run_check(check, target, guest, MemoryLog("qemu"), {"LIFEBOAT_MACHINE": "web01"}, lambda: False, lambda: None)
    assert r.ok, r.detail


def test_console_matching_ignores_escapes_and_carriage_returns(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"\x1b[2J\x1b[HSeaBIOS\r\nLIFEBOAT-GUEST: disk-write-ok 12\r\n")
    text = console_text(log)
    assert "\r" not in text and "\x1b" not in text
    assert console_matches(text, "LIFEBOAT-GUEST: disk-write-ok", regex=False)
    assert console_matches(text, r"disk-write-ok \d+$", regex=True)
    assert not console_matches(text, r"disk-write-ok [a-z]+", regex=True)
