"""The conformance suite every target driver passes, against real peers.

Each driver boots the real sample guest from a real ``lifeboat serve`` export (qemu: qemu-system
over QMP; kvm: a real libvirtd), is checked through its console, is adopted rather than started
twice, moves onto the hydrated local disk while running, and is then torn down by a *fresh*
driver instance reading only what the state database recorded (as after a ``kill -9``): nothing
it created may be left, and nothing it did not create may be touched.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import lifeboat.targets.qemu
from examples.sample_guest import read_record
from lifeboat.orchestrator.exports import start_export, stop_export
from lifeboat.orchestrator.health import console_text
from lifeboat.orchestrator.state import DbResourceLog, State
from lifeboat.targets import driver_class
from lifeboat.targets.base import (
    BootsFromNbd,
    Disk,
    Guest,
    HasConsole,
    Localizes,
    NetworkSpec,
    TakesImage,
    Target,
    TargetContext,
    TargetError,
    capabilities,
    destroy_generic,
)
from tests.targets.realpeers import qemu_processes

DRIVERS = ["qemu", "kvm"]


def settings_for(name: str) -> dict[str, Any]:
    return {"memory_mib": 256}


def machine_pids(name: str, token: str) -> list[int]:
    """The hypervisor processes running the guest (not the export's ``lifeboat serve``)."""
    out = []
    for pid in qemu_processes(token):
        try:
            exe = Path(f"/proc/{pid}/exe").resolve().name
        except OSError:
            continue
        if exe.startswith("qemu-system"):
            out.append(pid)
    return out


def domain_exists(token: str) -> bool:
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        conn.lookupByName(token)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def network_exists(name: str) -> bool:
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        return name in conn.listNetworks() + conn.listDefinedNetworks()
    finally:
        conn.close()


@pytest.mark.parametrize("name", DRIVERS)
def test_capabilities_and_settings_schema(name: str, tmp_path: Path) -> None:
    cls = driver_class(name)
    assert issubclass(cls, Target) and cls.name == name and cls.kind in ("virtual", "physical")
    schema = cls.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    ctx = TargetContext(state_dir=tmp_path)
    target = cls({}, ctx)
    jsonschema.validate(target.settings, schema)  # the defaults satisfy the schema
    assert isinstance(target, BootsFromNbd | TakesImage), capabilities(target)
    assert target.supports_network("none")
    with pytest.raises(TargetError, match="no_such_setting"):
        cls({"no_such_setting": 1}, ctx)
    with pytest.raises(TargetError, match="memory_mib"):
        cls({"memory_mib": "lots"}, ctx)


@pytest.mark.parametrize("name", DRIVERS)
def test_lifecycle_adopt_move_to_local_and_teardown_after_a_crash(
    name: str, tmp_path: Path, sample_archive: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name == "kvm":
        request.getfixturevalue("libvirtd")
    else:
        # A fresh host memo: where /dev/kvm opens but KVM fails (nested), this exercises the
        # restart under TCG; where KVM works, the guest simply runs under KVM.
        monkeypatch.setattr(lifeboat.targets.qemu, "kvm_memo", lambda: tmp_path / "kvm-memo")
    events: list[str] = []
    ctx = TargetContext(state_dir=tmp_path / "state", log=events.append)
    run_id = f"20260101T000000-{secrets.token_hex(3)}"
    state = State(tmp_path / "state")
    guest = Guest("conf", run_id, tmp_path / "work", NetworkSpec("isolated"))
    guest.workdir.mkdir()
    target = driver_class(name)(settings_for(name), ctx)
    assert isinstance(target, Localizes) and isinstance(target, HasConsole)
    target.prepare()

    elog = DbResourceLog(state, run_id, "conf", "engine")
    local = target.local_disk_path(guest) or guest.workdir / "disk.raw"
    if not local.parent.exists():
        elog.record("dir", str(local.parent), {})
        local.parent.mkdir(parents=True)
    export = start_export(
        "sample-guest@latest",
        archive=str(sample_archive),
        key_file=None,
        token=guest.token,
        workdir=guest.workdir,
        hydrate_to=local,
        log=elog,
    )
    disk = Disk(size=256 * 1024 * 1024, nbd_url=export.url, local_path=local)
    decoy = guest.workdir / "not-created-by-the-driver.txt"
    decoy.write_text("keep me")

    tlog = DbResourceLog(state, run_id, "conf", name)
    target.provision(guest, disk, tlog)
    assert tlog.resources(), "provision records what it will create"
    target.boot(guest, tlog)
    console = target.console_path(guest, tlog)
    assert console is not None
    deadline = time.monotonic() + 240
    while "LIFEBOAT-GUEST: alive" not in console_text(console):
        target.poll(guest, tlog)
        assert time.monotonic() < deadline, console_text(console)[-2000:]
        time.sleep(0.5)
    assert target.is_running(guest, tlog)
    text = console_text(console)
    assert "LIFEBOAT-GUEST: disk-record 0 sample-guest" in text and "LIFEBOAT-GUEST: disk-write-ok 1" in text

    # booting again adopts the running machine
    target.boot(guest, tlog)
    if name == "qemu":
        assert len(machine_pids(name, guest.token)) == 1
        proc = next(r for r in tlog.resources() if r.kind == "process")
        if lifeboat.targets.qemu.kvm_usable():
            assert proc.data["accel"] == "kvm" or (tmp_path / "kvm-memo").exists()
    else:
        assert domain_exists(guest.token)

    # move onto the hydrated disk, stop the export: the guest keeps running from local storage
    deadline = time.monotonic() + 120
    while not export.hydrated():
        assert time.monotonic() < deadline, "hydration did not complete"
        time.sleep(0.2)
    target.move_to_local(guest, disk, tlog)
    target.move_to_local(guest, disk, tlog)  # idempotent
    stop_export(elog, guest.token)
    assert not export.alive()
    alive_before = console_text(console).count("LIFEBOAT-GUEST: alive")
    deadline = time.monotonic() + 60
    while console_text(console).count("LIFEBOAT-GUEST: alive") < alive_before + 2:
        target.poll(guest, tlog)
        assert time.monotonic() < deadline, "the guest stopped after leaving the NBD export"
        time.sleep(0.5)
    assert read_record(local) == (1, "sample-guest")  # the guest's write is on the local disk

    # tear down from a fresh process's point of view: new database handle, new driver instance
    state2 = State(tmp_path / "state")
    fresh = driver_class(name)(settings_for(name), TargetContext(state_dir=tmp_path / "state"))
    log2 = DbResourceLog(state2, run_id, "conf", name)
    recorded = log2.resources()
    assert {r.kind for r in recorded} >= ({"process", "file"} if name == "qemu" else {"domain", "network", "file"})
    fresh.teardown(log2)
    assert log2.resources() == []
    fresh.teardown(log2)  # idempotent
    assert machine_pids(name, guest.token) == []
    if name == "kvm":
        assert not domain_exists(guest.token)
        assert not network_exists(next(r.ident for r in recorded if r.kind == "network"))
    for r in recorded:
        if r.kind == "file":
            assert not Path(r.ident).exists(), r.ident
    assert decoy.read_text() == "keep me"  # not the driver's: untouched
    for r in reversed(DbResourceLog(state2, run_id, "conf", "engine").resources()):
        destroy_generic(r)
    assert not local.exists()
