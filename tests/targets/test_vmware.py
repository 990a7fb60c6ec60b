"""The vmware target against govmomi's vCenter simulator (``tests/vcsim.py``), beyond the driver
suite: a whole rehearsal through ``lifeboat run`` (VM created, powered on, checked, torn down,
nothing left on the simulator), and every way it fails: a clear message naming the object, exit
status 1, nothing left behind after teardown.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from lifeboat.plumbing.vsphere import VsphereError, VsphereSettingsError
from lifeboat.targets.base import TargetContext
from lifeboat.targets.vmware import VmwareTarget, run_folder_name
from tests.targets.realpeers import lifeboat
from tests.vcsim import VCenter


def rehearsal(vcsim: VCenter, **settings: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "name": "vmware-drill",
        "kind": "rehearsal",
        "target": {
            "driver": "vmware",
            "settings": vcsim.settings(memory_mib=256, isolated_port_group="DC0_DVPG0", **settings),
        },
        "network": {"mode": "isolated"},
        "machines": [
            {
                "name": "web01",
                "point": "sample-guest@latest",
                "health": [{"name": "host side", "command": {"run": "true", "in": "host"}}],
            }
        ],
        "teardown": "always",
    }


def run(doc: dict[str, Any], tmp_path: Path, archive: Path) -> tuple[Any, dict[str, Any] | None]:
    tmp_path.mkdir(exist_ok=True)
    rb = tmp_path / "vmware.yaml"
    rb.write_text(json.dumps(doc))
    done = lifeboat("run", str(rb), "--archive", str(archive), "--state", str(tmp_path / "state"), "--json")
    out = json.loads(done.stdout) if done.stdout.strip() else None
    return done, out


def on_simulator(vcsim: VCenter, run_id: str) -> list[str]:
    """Every VM, folder and datastore file of the run on the simulator."""
    from pyVmomi import vim

    short = run_id.rsplit("-", 1)[-1][:12]
    content = vcsim.connect().RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine, vim.Folder], True)
    found = [f"{type(e).__name__} {e.name}" for e in view.view if short in e.name]
    view.Destroy()
    for dc in content.rootFolder.childEntity:
        for ds in dc.datastore:
            found += [str(p) for p in Path(ds.info.url).glob(f"*{short}*")]
    return found


def tools_report(vcsim: VCenter, ip: str, stop: threading.Event) -> None:
    """Play VMware Tools for every powered-on VM of a lifeboat run: report ``ip`` as the guest's
    address (the simulator's ``SET.guest.ipAddress`` extraConfig; its VMs run no Tools)."""
    from pyVmomi import vim, vmodl

    si = vcsim.connect()
    content = si.RetrieveContent()
    done: set[str] = set()
    while not stop.wait(0.2):
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        for vm in view.view:
            try:
                if vm.name.startswith("lifeboat-") and vm.name not in done and vm.runtime.powerState == "poweredOn":
                    option = vim.option.OptionValue(key="SET.guest.ipAddress", value=ip)
                    vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=[option]))
                    done.add(vm.name)
            except (vim.fault.VimFault, vmodl.fault.ManagedObjectNotFound):
                pass  # removed meanwhile by the run's teardown
        view.Destroy()


def test_rehearsal_waits_for_the_guests_address_checks_it_and_removes_everything(
    vcsim: VCenter, sample_archive: Path, tmp_path: Path
) -> None:
    """The TCP check has no host: the engine asks the driver, which answers the address VMware
    Tools report; the check connects there (a listener of this test stands in for the guest)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    doc = rehearsal(vcsim, cpus=2, firmware="efi", disk_controller="pvscsi")
    doc["machines"][0]["health"].append({"name": "guest port", "tcp": {"port": port}, "timeout": "2m"})
    stop = threading.Event()
    tools = threading.Thread(target=tools_report, args=(vcsim, "127.0.0.1", stop), daemon=True)
    tools.start()
    try:
        done, out = run(doc, tmp_path, sample_archive)
    finally:
        stop.set()
        tools.join()
        listener.close()
    assert done.returncode == 0, done.stderr
    assert out is not None and out["status"] == "succeeded", out
    assert "powered on" in done.stderr and "uploading the disk" in done.stderr
    report = json.loads(Path(out["report"]["json"]).read_text())
    assert [c["ok"] for c in report["machines"][0]["health"]] == [True, True]
    assert on_simulator(vcsim, out["run_id"]) == []


def test_vm_has_the_runbooks_hardware(vcsim: VCenter, sample_archive: Path, tmp_path: Path) -> None:
    """The VM as the simulator holds it: CPUs, memory, firmware, controller, port group, disk."""
    from pyVmomi import vim

    from lifeboat.archive import Archive
    from lifeboat.exporters import EXPORTERS
    from lifeboat.targets.base import Disk, Guest, MemoryLog, NetworkSpec

    target = VmwareTarget(
        vcsim.settings(cpus=2, memory_mib=512, firmware="efi", disk_controller="pvscsi", nic_model="e1000e"),
        TargetContext(),
    )
    target.prepare()
    guest = Guest("hw", "20260101T000000-abcdef", tmp_path, NetworkSpec("mapped", {"lan": "DC0_DVPG0"}))
    arc = Archive.open(str(sample_archive))
    point = arc.resolve("sample-guest@latest")
    image = tmp_path / "disk.raw"
    EXPORTERS.get("raw")().write(arc.reader(point), image)
    log = MemoryLog("vmware")
    try:
        target.provision(guest, Disk(point.size, image_path=image, image_format="raw"), log)
        target.provision(guest, Disk(point.size, image_path=image, image_format="raw"), log)  # idempotent
        target.boot(guest, log)
        target.boot(guest, log)  # adopts
        vm = target._vm(guest)
        assert vm is not None and vm.runtime.powerState == "poweredOn"
        hw = vm.config.hardware
        assert (hw.numCPU, hw.memoryMB, vm.config.firmware) == (2, 512, "efi")
        kinds = [type(d) for d in hw.device]
        assert vim.vm.device.ParaVirtualSCSIController in kinds and vim.vm.device.VirtualE1000e in kinds
        (nic,) = [d for d in hw.device if isinstance(d, vim.vm.device.VirtualE1000e)]
        assert isinstance(nic.backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo)
        disk: Any = next(d for d in hw.device if isinstance(d, vim.vm.device.VirtualDisk))
        assert disk.backing.fileName == f"[LocalDS_0] {guest.token}/{guest.token}.vmdk"
        assert vm.config.files.vmPathName == f"[LocalDS_0] {guest.token}/{guest.token}.vmx"
        assert vm.parent.name == run_folder_name(guest.run_id)
    finally:
        fresh = VmwareTarget(vcsim.settings(), TargetContext())
        fresh.teardown(log)
    assert on_simulator(vcsim, guest.run_id) == []


@pytest.mark.parametrize(
    "settings, network, message",
    [
        ({"datastore": "nope-ds"}, None, "no datastore 'nope-ds' in datacenter 'DC0'"),
        ({"resource_pool": "DC0_C0/nope-pool"}, None, "no resource pool 'DC0_C0/nope-pool'"),
        ({"datacenter": "nope-dc"}, None, "no datacenter 'nope-dc'"),
        ({"folder": "nope-folder"}, None, "no VM folder 'nope-folder'"),
        ({}, {"lan": "nope-pg"}, "no port group 'nope-pg' in datacenter 'DC0'"),
        ({}, None, "creating the VM lifeboat-[0-9a-f]+-err in resource pool 'Resources' failed: .*FileAlreadyExists"),
    ],
    ids=["datastore", "resource-pool", "datacenter", "folder", "port-group", "failed-task"],
)
def test_missing_objects_and_failed_tasks_are_named(
    settings: dict[str, Any],
    network: dict[str, str] | None,
    message: str,
    vcsim: VCenter,
    tmp_path: Path,
) -> None:
    from lifeboat.targets.base import Disk, Guest, MemoryLog, NetworkSpec

    target = VmwareTarget(vcsim.settings(**settings), TargetContext())
    guest = Guest("err", "20260101T000000-0e0e0e", tmp_path, NetworkSpec("mapped", network or {}))
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\1" * 4096)
    log = MemoryLog("vmware")
    if "FileAlreadyExists" in message:  # a stray VM configuration file where the VM's goes: the task fails
        (datastore_dir(vcsim) / guest.token).mkdir()
        (datastore_dir(vcsim) / guest.token / f"{guest.token}.vmx").write_text("stray")
    with pytest.raises(VsphereError, match=message) as err:
        target.prepare()
        target.provision(guest, Disk(4096, image_path=image, image_format="raw"), log)
    assert err.value.exit_code == 1 and vcsim.host in str(err.value)
    VmwareTarget(vcsim.settings(), TargetContext()).teardown(log)
    assert on_simulator(vcsim, guest.run_id) == []


def test_a_datastore_too_full_is_named_before_any_upload(vcsim: VCenter, tmp_path: Path) -> None:
    from lifeboat.targets.base import Disk, Guest, MemoryLog, NetworkSpec

    target = VmwareTarget(vcsim.settings(), TargetContext())
    guest = Guest("full", "20260101T000000-0f0f0f", tmp_path, NetworkSpec("none"))
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\1" * 4096)
    log = MemoryLog("vmware")
    full = "datastore 'LocalDS_0' is too full: .* bytes free, the disk needs 1152921504606846976"
    with pytest.raises(VsphereError, match=full):
        target.provision(guest, Disk(1 << 60, image_path=image, image_format="raw"), log)
    VmwareTarget(vcsim.settings(), TargetContext()).teardown(log)
    assert on_simulator(vcsim, guest.run_id) == []


def test_a_task_that_hangs_is_cancelled_after_the_step_timeout(
    vcsim: VCenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulator finishes every task at once, so a task stuck running is a stand-in: its state
    as the server would keep answering it."""
    from lifeboat.plumbing.vsphere import connect

    session = connect(vcsim.host, vcsim.user, vcsim.password, ca_file=str(vcsim.ca_file), timeout=0.3)

    class StuckTask:
        cancelled = False

        def CancelTask(self) -> None:  # noqa: N802 - the vSphere method's name
            self.cancelled = True

    task = StuckTask()
    monkeypatch.setattr(session, "properties", lambda obj, paths: {"info.state": "running"})
    with pytest.raises(VsphereError, match="powering on the VM x did not finish within 0.3 s") as err:
        session.wait(task, "powering on the VM x")
    assert err.value.exit_code == 1 and task.cancelled
    session.close()


def datastore_dir(vcsim: VCenter) -> Path:
    """Where the simulator keeps LocalDS_0's files on this host."""
    content = vcsim.connect().RetrieveContent()
    return Path(next(ds.info.url for dc in content.rootFolder.childEntity for ds in dc.datastore))


def test_login_and_certificate_errors(vcsim: VCenter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    silent = socket.create_server(("127.0.0.1", 0))
    cases = [
        (vcsim.settings(password_file=str(wrong)), "login as 'administrator@vsphere.local' refused"),
        ({k: v for k, v in vcsim.settings().items() if k != "ca_file"}, "TLS certificate is not trusted"),
        (vcsim.settings(host="127.0.0.1:1"), "cannot connect"),
        # a server that accepts and never answers: the step's timeout ends the wait
        (vcsim.settings(host=f"127.0.0.1:{silent.getsockname()[1]}", task_timeout_seconds=0.5), "connect.*timed out"),
    ]
    for settings, message in cases:
        with pytest.raises(VsphereError, match=message) as err:
            VmwareTarget(settings, TargetContext()).prepare()
        assert err.value.exit_code == 1
    silent.close()
    # insecure only when the runbook says so; the password from the environment
    settings = {k: v for k, v in vcsim.settings().items() if k not in ("ca_file", "password_file")}
    monkeypatch.setenv("VC_PASS", vcsim.password)
    VmwareTarget({**settings, "insecure": True, "password_env": "VC_PASS"}, TargetContext()).prepare()
    monkeypatch.delenv("VC_PASS")
    with pytest.raises(VsphereSettingsError, match="VC_PASS is not set"):
        VmwareTarget({**settings, "insecure": True, "password_env": "VC_PASS"}, TargetContext()).prepare()


def test_cli_wrong_password_and_a_missing_datastore_exit_1_and_leave_nothing(
    vcsim: VCenter, sample_archive: Path, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    done, out = run(rehearsal(vcsim, password_file=str(wrong)), tmp_path / "a", sample_archive)
    assert done.returncode == 1 and out is not None and out["status"] == "failed"
    assert "login as 'administrator@vsphere.local' refused" in done.stderr
    done, out = run(rehearsal(vcsim, datastore="nope-ds"), tmp_path / "b", sample_archive)
    assert done.returncode == 1 and out is not None and out["status"] == "failed"
    assert "no datastore 'nope-ds' in datacenter 'DC0'" in done.stderr
    assert on_simulator(vcsim, out["run_id"]) == []
