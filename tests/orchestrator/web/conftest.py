"""One real world for the web pane's tests, made once per session: an archive with two machines
(``web01`` with a full and an incremental point, ``db01`` with one), a state folder holding a real
rehearsal run of ``web01`` (machines as local processes, ``procdriver.py``) with its reports, a
runbooks folder (a rehearsal ``drill.yaml``, a failover ``failover.yaml`` and a broken ``broken.yaml``),
and a ``lifeboat web`` subprocess on a free loopback port serving them, with an operator's and a
viewer's token."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.orchestrator.test_engine import ENV, machine, runbook, write_runbook
from tests.targets.realpeers import LIFEBOAT, REPO, lifeboat

TOKEN = "web-test-token-5d1f0c8e9a"
VIEWER_TOKEN = "web-viewer-token-77c2b41e03"
DRILL = "web-drill"  # the rehearsal the pane starts
BROKEN = "name: broken\nkind: rehearsal\nmachines:\n  - name: x\n    point: 12\n    bogus: 1\n"

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path("/tmp/lifeboat-web-shots")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium for this module only: while Playwright's sync API is open it keeps an asyncio loop
    running in the main thread, and later tests that run asyncio (the QMP client) would fail."""
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    yield pg
    context.close()


def shot(page: Page, tmp_path: Path, name: str) -> None:
    """Keep a full-page screenshot as ``NAME.png`` in the test's folder and in SHOTS."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SHOTS.mkdir(exist_ok=True)
    shutil.copyfile(path, SHOTS / path.name)


@dataclass(frozen=True)
class World:
    """The archive, state folder and pane the tests look at."""

    archive: Path
    state: Path
    url: str
    token: str
    viewer_token: str
    runbooks: Path
    points: dict[str, list[dict[str, object]]]  # machine -> `lifeboat points --json`
    run_id: str
    replica: Path


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("web")
    archive, state = root / "archive", root / "state"
    lifeboat("archive", "init", "--chunk-size", "65536", "--archive", str(archive), check=True)
    image = root / "web01.img"
    image.write_bytes(b"HELLO web01 v1".ljust(1024 * 1024, b"\0"))
    lifeboat("backup", "web01", str(image), "--archive", str(archive), check=True)
    with image.open("r+b") as f:
        f.seek(512 * 1024)
        f.write(b"changed" * 1000)
    lifeboat("backup", "web01", str(image), "--archive", str(archive), check=True)
    db = root / "db01.img"
    db.write_bytes(b"HELLO db01".ljust(2 * 1024 * 1024, b"\1"))
    lifeboat("backup", "db01", str(db), "--archive", str(archive), check=True)
    points = {
        m: json.loads(lifeboat("points", m, "--json", "--archive", str(archive), check=True).stdout)
        for m in ("web01", "db01")
    }

    check = {"name": "disk", "console": "LIFEBOAT-GUEST: disk HELLO web01 v1", "timeout": 30}
    rb = write_runbook(root / "rehearse.yaml",
                       runbook("rehearse-web", [machine("web01", point="web01@latest", health=[check])]))
    ran = lifeboat("run", str(rb), "--archive", str(archive), "--state", str(state), "--json", env=ENV, check=True)
    run_id = json.loads(ran.stdout)["run_id"]

    runbooks = root / "runbooks"
    runbooks.mkdir()
    # the drill's guest takes 5 s to boot: the run page opens while it runs, and follows it
    slow = machine("web01", point="web01@latest", health=[check], target={"settings": {"delay": 5}},
                   rpo_objective="12h")
    write_runbook(runbooks / "drill.yaml", runbook(DRILL, [slow]))
    failover = runbook("web-failover", [machine("web01", point="web01@latest", health=[check])], kind="failover")
    write_runbook(runbooks / "failover.yaml", failover)
    (runbooks / "broken.yaml").write_text(BROKEN)

    replica, protect = root / "replica", root / "protect"
    lifeboat("replicate", "web01", "--to", str(replica), "--archive", str(archive), check=True)
    protect.mkdir()
    for m, loop in (("web01", "capturing"), ("db01", "stopped")):  # states that do not age with the clock
        (protect / f"{m}.json").write_text(json.dumps({"machine": m, "state": loop, "updated": points[m][-1]["time"],
                                                      "last_error": None, "rpo_target_seconds": 3600}))

    with pane(root, ["--runbooks", str(runbooks), "--archive", str(archive), "--state", str(state),
                     "--protect-status", str(protect), "--replica", str(replica)]) as url:
        yield World(archive, state, url, TOKEN, VIEWER_TOKEN, runbooks, points, run_id, replica)


@contextmanager
def pane(root: Path, args: list[str]) -> Iterator[str]:
    """A ``lifeboat web`` subprocess with ``args``, the operator's and the viewer's tokens (files
    in ``root``), on a free loopback port: its URL. Its log must never hold a token."""
    token_file, viewer_file = root / "token", root / "viewer-token"
    token_file.write_text(TOKEN + "\n")
    viewer_file.write_text(VIEWER_TOKEN + "\n")
    proc = subprocess.Popen(
        [*LIFEBOAT, "web", "--listen", "127.0.0.1:0", "--token-file", str(token_file), "--viewer-token-file",
         str(viewer_file), *args],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **ENV}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.stderr else url
        yield url.rstrip("/")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert TOKEN not in err and VIEWER_TOKEN not in err, "a token must never be logged"
