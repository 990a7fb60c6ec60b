"""Plain files and devices: read-and-hash reported as such; an LVM volume is read from a snapshot
(against the stand-in LVM commands of ``conftest.fake_lvm``)."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from lifeboat.agent.lvm import LvmSnapshotSource
from lifeboat.agent.plan import MODE_FULL, MODE_HASH_SCAN, CaptureError, plan_backup, run_plan
from lifeboat.archive import Archive
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.orchestrator.sources import open_source

MiB = 1024 * 1024


def test_file_backups_say_full_then_hash_scan(tmp_path: Path) -> None:
    env = {**os.environ, "LIFEBOAT_ARCHIVE": str(tmp_path / "a")}
    subprocess.run([*LIFEBOAT, "archive", "init"], env=env, check=True, capture_output=True)
    disk = tmp_path / "disk.img"
    disk.write_bytes(random.Random(3).randbytes(4 * MiB))
    modes = []
    for _ in range(2):
        out = subprocess.run([*LIFEBOAT, "backup", "pc", str(disk), "--json"], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        modes.append((doc["mode"], doc["fallback_reason"], doc["bytes_new"]))
    assert modes == [(MODE_FULL, None, 4 * MiB), (MODE_HASH_SCAN, None, 0)]


def test_lvm_snapshot_removed_after_a_failure(fake_lv: tuple[str, Path], arc: Archive) -> None:
    dev, state = fake_lv
    with open_source(dev) as src:
        assert isinstance(src, LvmSnapshotSource)
        plan = plan_backup(arc, "db", src)
        snap = next(state.glob("lifeboat-snap-*"))
        snap.write_bytes(b"")  # the snapshot becomes unreadable mid-way (like an overflowed one)
        with pytest.raises(CaptureError, match="LVM snapshot"):
            run_plan(arc, "db", src, plan)
    assert arc.points("db") == []
    assert not list(state.glob("lifeboat-snap-*"))
