"""``scripts/setup.sh`` waits for another package manager's lock instead of exiting 100.

Its ``apt_get`` is run (the script sourced, nothing installed) against apt's lock files in a temp
folder, never the machine's: ``apt-get update`` with no sources into a temp lists folder (the
lists lock) and ``apt-get check`` on a copy of dpkg's status (the dpkg frontend lock; ``check``
installs nothing). The test holds the lock itself, with ``fcntl`` as apt does.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"


def _apt_args(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """Per case: (the lock file, apt-get's arguments), all inside ``root``."""
    (root / "lists" / "partial").mkdir(parents=True)
    (root / "parts").mkdir()
    (root / "cache" / "archives" / "partial").mkdir(parents=True)
    (root / "dpkg" / "updates").mkdir(parents=True)
    shutil.copyfile("/var/lib/dpkg/status", root / "dpkg" / "status")
    common = ["-o", f"Dir::Cache={root / 'cache'}", "-o", f"Dir::State::status={root / 'dpkg' / 'status'}"]
    return {
        "update": (root / "lists" / "lock",
                   [*common, "-o", f"Dir::State::Lists={root / 'lists'}", "-o", "Dir::Etc::sourcelist=/dev/null",
                    "-o", f"Dir::Etc::sourceparts={root / 'parts'}", "update"]),
        "install": (root / "dpkg" / "lock-frontend", [*common, "check"]),
    }


@pytest.fixture
def held(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[int, list[str]]]:
    """(fd holding the case's lock, apt-get's arguments)."""
    lock, args = _apt_args(tmp_path)[request.param]
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    try:
        yield fd, args
    finally:
        os.close(fd)


def _apt_get(args: list[str], wait: int) -> subprocess.Popen[str]:
    script = f'source "{SETUP}" && apt_get "$@"'
    env = dict(os.environ, APT_LOCK_WAIT=str(wait))
    return subprocess.Popen(["bash", "-c", script, "apt_get", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def _read_until(proc: subprocess.Popen[str], needle: str, limit: float = 120) -> str:
    """stderr up to the line holding ``needle`` (fails if the process ends first)."""
    assert proc.stderr is not None
    seen = ""
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    end = time.monotonic() + limit  # a guard against a hang, not a timing assertion
    while needle not in seen:
        assert time.monotonic() < end, f"no {needle!r} on stderr: {seen!r}"
        if sel.select(timeout=1):
            line = proc.stderr.readline()
            assert line, f"apt_get ended (exit {proc.wait()}) before {needle!r}: {seen!r}"
            seen += line
    return seen


@pytest.mark.parametrize("held", ["update", "install"], indirect=True)
def test_waits_for_the_lock_then_succeeds(held: tuple[int, list[str]]) -> None:
    fd, args = held
    proc = _apt_get(args, wait=600)
    try:
        said = _read_until(proc, "setup: waiting for another package manager")
        assert "Could not get lock" in said and "held by process" in said
        assert proc.poll() is None, "apt_get must still be waiting while the lock is held"
        fcntl.lockf(fd, fcntl.LOCK_UN)
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, rest
    assert "gave up" not in rest


@pytest.mark.parametrize("held", ["update", "install"], indirect=True)
def test_gives_up_after_the_bound(held: tuple[int, list[str]]) -> None:
    _, args = held
    proc = _apt_get(args, wait=0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 100, err
    assert "Could not get lock" in err and "setup: gave up after 0 s" in err


def test_setup_runs_apt_get_through_the_waiting_function() -> None:
    body = SETUP.read_text().split("main() {", 1)[1]
    calls = [line.split()[0] for line in body.splitlines() if "apt-get" in line or "apt_get" in line]
    assert calls and set(calls) == {"apt_get"}, calls
