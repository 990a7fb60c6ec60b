"""The plug-in registries: every registered name imports and is of its kind's type, planned names
and unknown names fail with one clear usage error, ``LIFEBOAT_PLUGINS`` adds outside plug-ins, and
declaring or listing the registries imports no plug-in."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from lifeboat.archive.backend import Backend, open_backend
from lifeboat.exporters.base import Exporter
from lifeboat.orchestrator.plugins import list_plugins, registries
from lifeboat.orchestrator.sources import source_kind
from lifeboat.plumbing.errors import LifeboatError, UsageError
from lifeboat.plumbing.registry import Registry
from lifeboat.targets import TARGETS, driver_kind, driver_schema
from lifeboat.targets.base import Target

KINDS = ["targets", "exporters", "backends", "sources"]


def test_every_kind_has_one_registry() -> None:
    assert list(registries()) == KINDS
    listed = list_plugins()
    assert listed["targets"] == {"available": ["qemu", "kvm", "vmware", "pxe", "openstack", "aws"], "planned": []}
    assert listed["exporters"]["available"] == ["raw", "qcow2", "vmdk", "vmdk-stream", "vhdx"]
    assert listed["backends"] == {"available": ["file", "http", "https", "s3"], "planned": []}
    assert listed["sources"] == {
        "available": ["qmp+unix", "libvirt", "lvm", "file", "vsphere", "ebs"],
        "planned": [],
    }


def entries() -> list[tuple[str, str]]:
    return [(kind, name) for kind, r in registries().items() for name in r.names()]


@pytest.mark.parametrize(("kind", "name"), entries())
def test_every_registered_name_imports_and_has_its_kinds_type(kind: str, name: str) -> None:
    found: Any = registries()[kind].get(name)
    if kind == "targets":
        assert issubclass(found, Target) and found.name == name
    elif kind == "exporters":
        assert issubclass(found, Exporter) and found.format == name
    elif kind == "backends":
        assert issubclass(found, Backend)
    else:
        assert callable(found)


def test_nothing_is_planned_any_more() -> None:
    """Every designed plug-in is built: a planned name is tested on a registry of its own below."""
    assert [(kind, name) for kind, r in registries().items() for name in r.planned()] == []


def test_planned_targets_go_through_the_same_path() -> None:
    """Every target is built now: a registry with a planned name still answers with one error."""
    later: Registry[type[Target]] = Registry("targets", "target driver", {}, planned={"later": "virtual"}, base=Target)
    with pytest.raises(UsageError, match="the later target driver is planned but not available in this version"):
        later.get("later")
    assert driver_kind("pxe") == "physical" and driver_kind("aws") == "virtual" and driver_kind("nope") is None
    assert driver_schema("aws") is not None and driver_schema("qemu") is not None


def test_unknown_names_list_what_is_available() -> None:
    available = r"\(available: qemu, kvm, vmware, pxe, openstack, aws\)"
    with pytest.raises(UsageError, match=rf"unknown target driver 'nope' {available}"):
        TARGETS.get("nope")
    with pytest.raises(UsageError, match="unknown archive backend 'ftp'.*file, http, https, s3"):
        open_backend("ftp://host/x")


def test_source_forms(tmp_path: Any) -> None:
    assert source_kind("qmp+unix:///run/vm.qmp?node=virtio0") == "qmp+unix"
    assert source_kind("libvirt:///web01?disk=vda") == "libvirt"
    assert source_kind(str(tmp_path / "disk.qcow2")) == "file"
    assert source_kind("/dev/null") == "file"  # not a logical volume


def test_environment_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIFEBOAT_PLUGINS", " targets:proc=tests.orchestrator.procdriver:ProcTarget ,"
                                           "exporters:other=pkg.mod:Cls")
    assert TARGETS.names() == ["qemu", "kvm", "vmware", "pxe", "openstack", "aws", "proc"] and "proc" in TARGETS
    from tests.orchestrator.procdriver import ProcTarget

    assert TARGETS.get("proc") is ProcTarget
    with pytest.raises(LifeboatError, match=r"the other export format \(pkg.mod:Cls\) cannot be loaded"):
        registries()["exporters"].get("other")
    monkeypatch.setenv("LIFEBOAT_PLUGINS", "targets:aws=tests.orchestrator.procdriver:ProcTarget")
    assert TARGETS.get("aws") is ProcTarget and "aws" not in TARGETS.planned()  # a plug-in fills a planned name
    monkeypatch.setenv("LIFEBOAT_PLUGINS", "proc=tests.orchestrator.procdriver:ProcTarget")
    with pytest.raises(UsageError, match=r"\$LIFEBOAT_PLUGINS: .* is not KIND:NAME=MODULE:ATTR"):
        TARGETS.names()


def test_add_checks_the_type_on_get() -> None:
    r: Registry[type[Target]] = Registry("things", "thing", {}, base=Target)
    r.add("writer", "lifeboat.exporters.raw:RawExporter")
    with pytest.raises(UsageError, match=r"the writer thing \(lifeboat.exporters.raw:RawExporter\) is not a Target"):
        r.get("writer")
    with pytest.raises(UsageError, match="is not MODULE:ATTR"):
        r.add("bad", "no-colon")


def test_declaring_and_listing_imports_no_plugin() -> None:
    code = ("import sys\n"
            "from lifeboat.orchestrator.plugins import list_plugins\n"
            "list_plugins()\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('lifeboat.'))))\n")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    for plugin in ("lifeboat.targets.qemu", "lifeboat.targets.kvm", "lifeboat.archive.remote", "lifeboat.agent.qmp",
                   "lifeboat.agent.virt", "lifeboat.agent.lvm", "lifeboat.exporters.raw",
                   "lifeboat.exporters.vmdk_stream"):
        assert plugin not in loaded, loaded
