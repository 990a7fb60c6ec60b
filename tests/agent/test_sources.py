"""Plain files and devices: read-and-hash reported as such; an LVM volume is read from a snapshot.

No device-mapper exists on this machine, so LVM itself cannot run here. The LVM test drives
``LvmSnapshotSource`` against stand-in ``lvs``/``lvcreate``/``lvremove`` commands on PATH that keep
a real loop device as the "volume" and a frozen copy of it as the "snapshot": it checks what the
agent does (snapshot before reading, read the snapshot only, remove it after success or failure),
not LVM.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
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


FAKE_LVM = r'''#!{python}
"""Stand-in for an LVM command (see the test module's docstring)."""
import os, shutil, sys
state = os.environ["FAKE_LVM_DIR"]
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.path.join(state, "calls.log"), "a") as log:
    log.write(" ".join([tool, *args]) + "\n")
origin = open(os.path.join(state, "origin")).read().strip()
if tool == "lvs":
    target = args[-1]
    if target == origin:
        print("  vg0|lv0|%d" % os.path.getsize(os.path.join(state, "backing")))
    elif target.startswith("vg0/") and os.path.exists(os.path.join(state, target[4:])):
        print("  " + os.path.join(state, target[4:]))
    else:
        sys.exit(5)
elif tool == "lvcreate":
    name = args[args.index("--name") + 1]
    shutil.copyfile(origin, os.path.join(state, name))  # the frozen state
elif tool == "lvremove":
    os.unlink(os.path.join(state, args[-1].split("/", 1)[1]))
'''


@pytest.fixture
def fake_lv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A loop device standing in for vg0/lv0, with stand-in LVM tools on PATH."""
    state = tmp_path / "lvm"
    state.mkdir()
    backing = state / "backing"
    backing.write_bytes(random.Random(5).randbytes(8 * MiB))
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    (state / "origin").write_text(dev)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("lvs", "lvcreate", "lvremove"):
        (bindir / tool).write_text(FAKE_LVM.replace("{python}", sys.executable))
        (bindir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LVM_DIR", str(state))
    try:
        yield dev, state
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_lvm_volume_is_read_from_a_snapshot(fake_lv: tuple[str, Path], arc: Archive) -> None:
    dev, state = fake_lv
    before = Path(dev).read_bytes()
    with open_source(dev) as src:
        assert isinstance(src, LvmSnapshotSource)
        plan = plan_backup(arc, "db", src)
        with open(dev, "r+b") as f:  # the volume changes after the snapshot was taken
            f.write(b"changed after the snapshot".ljust(MiB, b"!"))
            f.flush()
            os.fsync(f.fileno())
        info = run_plan(arc, "db", src, plan)
    assert arc.reader(info).read(0, info.size) == before  # the point is the frozen state
    assert any("LVM snapshot vg0/lifeboat-snap-" in n for n in plan.notes)
    calls = (state / "calls.log").read_text().splitlines()
    assert [c.split()[0] for c in calls if c.split()[0] != "lvs"] == ["lvcreate", "lvremove"]
    assert not list(state.glob("lifeboat-snap-*"))  # removed after the point was stored


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
