"""``lifeboat backup MACHINE vsphere://...`` against govmomi's vCenter simulator, beyond the
capture-source suite (``test_source_conformance.py``, which runs the ``vsphere`` kind): what the
command prints, the change ID a point records, and the fallbacks to a full read that only vSphere
has: a server without changed-block tracking (the simulator as govmomi ships it), and a change ID
the server refuses.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lifeboat.agent.qmp import point_param
from lifeboat.archive import Archive
from lifeboat.archive.restore import restore
from lifeboat.targets.base import Disk, Guest, MemoryLog, NetworkSpec, TargetContext
from lifeboat.targets.vmware import VmwareTarget, run_folder_name
from tests.targets.realpeers import lifeboat
from tests.vcsim import VCenter, start

MiB = 1024 * 1024


class Vm:
    """A VM with one flat disk of random bytes, made by the vmware target, removed at the end."""

    def __init__(self, vcsim: VCenter, root: Path, name: str, seed: int) -> None:
        self.target = VmwareTarget(vcsim.settings(), TargetContext())
        self.guest = Guest(name, "20260101T000000-7b7b7b", root, NetworkSpec("none"))
        image = root / f"{name}.raw"
        image.write_bytes(random.Random(seed).randbytes(2 * MiB))
        self.log = MemoryLog("vmware")
        self.target.provision(self.guest, Disk(2 * MiB, image_path=image, image_format="raw"), self.log)
        token = self.guest.token
        self.spec = f"vsphere://{vcsim.host}/DC0/vm/{run_folder_name(self.guest.run_id)}/{token}?disk=0"
        content = vcsim.connect().RetrieveContent()
        store = Path(next(ds.info.url for dc in content.rootFolder.childEntity for ds in dc.datastore))
        self.flat = store / token / f"{token}-flat.vmdk"

    def write(self, at: int, data: bytes) -> None:
        """A write of the guest (no snapshot exists between captures)."""
        with open(self.flat, "r+b") as f:
            f.seek(at)
            f.write(data)

    def remove(self) -> None:
        self.target.teardown(self.log)


def env_for(vcsim: VCenter) -> dict[str, str]:
    return {
        "LIFEBOAT_VSPHERE_USER": vcsim.user,
        "LIFEBOAT_VSPHERE_PASSWORD_FILE": str(vcsim.password_file),
        "LIFEBOAT_VSPHERE_CA_FILE": str(vcsim.ca_file),
    }


def backup(machine: str, spec: str, archive: Path, vcsim: VCenter) -> dict[str, Any]:
    done = lifeboat("backup", machine, spec, "--archive", str(archive), "--json", env=env_for(vcsim))
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "archive"
    lifeboat("archive", "init", "--archive", str(path), check=True)
    return path


def reads_back(archive: Path, machine: str, flat: Path, tmp_path: Path) -> None:
    arc = Archive.open(str(archive))
    out = tmp_path / "restored.raw"
    restore(arc.reader(arc.resolve(f"{machine}@latest")), out)
    assert out.read_bytes() == flat.read_bytes()


def test_backup_prints_the_mode_and_records_the_change_id(vcsim: VCenter, archive: Path, tmp_path: Path) -> None:
    vm = Vm(vcsim, tmp_path, "cli", 21)
    try:
        first = backup("vm1", vm.spec, archive, vcsim)
        assert first["mode"] == "full" and first["fallback_reason"] is None
        assert any("changed-block tracking turned on" in n for n in first["notes"])
        vm.write(3 * 65536, b"\x5a" * 4096)
        second = backup("vm1", vm.spec, archive, vcsim)
        assert second["mode"] == "incremental-cbt" and second["base"] == first["point"]
        assert second["changed_bytes"] == 65536  # one 64 KiB block of the tracking
        reads_back(archive, "vm1", vm.flat, tmp_path)
        arc = Archive.open(str(archive))
        ids = [point_param(p, "vsphere", "change_id") for p in arc.points("vm1")]
        assert all(ids) and ids[0] != ids[1]
        assert "password" not in arc.points("vm1")[-1].source
    finally:
        vm.remove()


def test_a_refused_change_id_falls_back_to_full(vcsim: VCenter, archive: Path, tmp_path: Path) -> None:
    """A point's change ID that the disk never had (here: another VM's disk of the same size) is
    refused by the server, as after a reset of the tracking: a full read, saying why."""
    a, b = Vm(vcsim, tmp_path, "a", 22), Vm(vcsim, tmp_path, "b", 23)
    try:
        backup("other", b.spec, archive, vcsim)  # turns tracking on for b
        backup("m", a.spec, archive, vcsim)
        out = backup("m", b.spec, archive, vcsim)
        assert out["mode"] == "full" and "refused change ID" in out["fallback_reason"], out
        assert "is not one of this disk's" in out["fallback_reason"]
        reads_back(archive, "m", b.flat, tmp_path)
    finally:
        a.remove()
        b.remove()


@pytest.fixture
def stock_vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VCenter]:
    """The simulator as govmomi ships it: no change IDs, no QueryChangedDiskAreas."""
    yield from start(tmp_path_factory.mktemp("stock-vcsim"), cbt=False)


def test_a_server_without_change_tracking_reads_everything_saying_why(
    stock_vcsim: VCenter, archive: Path, tmp_path: Path
) -> None:
    vm = Vm(stock_vcsim, tmp_path, "stock", 24)
    try:
        first = backup("s", vm.spec, archive, stock_vcsim)
        assert first["mode"] == "full" and any("no change ID" in n for n in first["notes"])
        vm.write(0, b"\x01" * 512)
        second = backup("s", vm.spec, archive, stock_vcsim)
        assert second["mode"] == "full" and "without a vSphere change ID" in second["fallback_reason"]
        reads_back(archive, "s", vm.flat, tmp_path)
    finally:
        vm.remove()


def test_wrong_credentials_and_missing_vm_exit_clearly(vcsim: VCenter, archive: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    env = {**env_for(vcsim), "LIFEBOAT_VSPHERE_PASSWORD_FILE": str(wrong)}
    spec = f"vsphere://{vcsim.host}/DC0/vm/no-such-vm?disk=0"
    done = lifeboat("backup", "x", spec, "--archive", str(archive), env=env)
    assert done.returncode == 1 and "login as 'administrator@vsphere.local' refused" in done.stderr
    done = lifeboat("backup", "x", spec, "--archive", str(archive), env=env_for(vcsim))
    assert done.returncode == 2 and "no virtual machine 'no-such-vm' in datacenter 'DC0'" in done.stderr
    no_password = {k: v for k, v in env_for(vcsim).items() if k != "LIFEBOAT_VSPHERE_PASSWORD_FILE"}
    done = lifeboat("backup", "x", spec, "--archive", str(archive), env=no_password)
    assert done.returncode == 2 and "set LIFEBOAT_VSPHERE_PASSWORD_FILE" in done.stderr
    assert not os.environ.get("LIFEBOAT_VSPHERE_PASSWORD")
