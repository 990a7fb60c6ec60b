"""Fixtures of the agent tests: a local archive, the sample guest running its workload under QEMU,
and stand-in LVM commands (libvirtd: the session fixture in tests/conftest.py).

No device-mapper exists on this machine, so LVM itself cannot run here. ``fake_lvm`` puts
stand-in ``lvs``/``lvcreate``/``lvremove`` commands on PATH that keep a real loop device as the
"volume" ``vg0/lv0`` and a frozen copy of it as the "snapshot": tests with it check what the agent
does (snapshot before reading, read the snapshot only, remove it after success or failure), not LVM.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from tests.agent.guest import Guest, make_disk

MiB = 1024 * 1024


@pytest.fixture
def arc(tmp_path: Path) -> Archive:
    """An empty local archive with 1 MiB chunks."""
    return Archive.init(str(tmp_path / "archive"))


@pytest.fixture
def guest(sample_guest_image: Path, tmp_path: Path) -> Iterator[Guest]:
    """The sample guest, booted from a qcow2 copy, writing a record every 100 ms."""
    work = tmp_path / "guest"
    work.mkdir()
    g = Guest(make_disk(sample_guest_image, work), work)
    g.start()
    try:
        yield g
    finally:
        g.kill()


FAKE_LVM = r'''#!{python}
"""Stand-in for an LVM command (see tests/agent/conftest.py)."""
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


def fake_lvm(root: Path, mp: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(loop device standing in for vg0/lv0, state folder): stand-in LVM tools on PATH meanwhile."""
    state = root / "lvm"
    state.mkdir()
    backing = state / "backing"
    backing.write_bytes(random.Random(5).randbytes(8 * MiB))
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    (state / "origin").write_text(dev)
    bindir = root / "bin"
    bindir.mkdir()
    for tool in ("lvs", "lvcreate", "lvremove"):
        (bindir / tool).write_text(FAKE_LVM.replace("{python}", sys.executable))
        (bindir / tool).chmod(0o755)
    mp.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    mp.setenv("FAKE_LVM_DIR", str(state))
    try:
        yield dev, state
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def fake_lv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A loop device standing in for vg0/lv0, with stand-in LVM tools on PATH."""
    yield from fake_lvm(tmp_path, monkeypatch)
