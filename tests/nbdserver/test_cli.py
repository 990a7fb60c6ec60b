"""``lifeboat serve`` as scripts drive it: one URL line, clean exits, clear errors."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from lifeboat.orchestrator.cli import parse_size
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.plumbing.errors import UsageError
from tests.nbdserver.conftest import REPO, Served, run


def lifeboat(archive: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIFEBOAT, "--archive", str(archive), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_one_url_line_then_clean_exit(shared_archive: Path, serve: Callable[..., Served], sig: int) -> None:
    s = serve(shared_archive, "web01@latest", "--listen", "127.0.0.1:0")
    assert s.url == f"nbd://127.0.0.1:{s.port}/web01" and s.port != 0
    run(["nbdinfo", s.url])
    assert s.stop(sig) == 0
    assert s.proc.stdout is not None and s.proc.stdout.read() == ""  # nothing but the one line


def test_point_selectors_and_usage_errors(shared_archive: Path) -> None:
    for selector in ("nosuch", "web01@000000000000", "web01@1999-01-01T00:00:00"):
        proc = lifeboat(shared_archive, "serve", selector, "--listen", "127.0.0.1:0")
        assert proc.returncode == 2 and proc.stdout == "", (selector, proc.stderr)
        assert "selector" in proc.stderr
    for listen in ("nonsense", "127.0.0.1:99999"):
        proc = lifeboat(shared_archive, "serve", "web01", "--listen", listen)
        assert proc.returncode == 2 and "--listen" in proc.stderr
    proc = lifeboat(shared_archive.parent / "none", "serve", "web01")
    assert proc.returncode == 2 and "no lifeboat archive" in proc.stderr


def test_port_in_use_fails_with_status_1(shared_archive: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = lifeboat(shared_archive, "serve", "web01", "--listen", f"127.0.0.1:{port}")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "cannot listen" in proc.stderr


def test_parse_size() -> None:
    assert parse_size("1G", "x") == 1 << 30 and parse_size("512M", "x") == 512 << 20
    assert parse_size("50MB", "x") == 50 << 20 and parse_size("4096", "x") == 4096
    with pytest.raises(UsageError):
        parse_size("lots", "x")
