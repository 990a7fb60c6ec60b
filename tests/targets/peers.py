"""Test peers of the target driver suite (``test_conformance.py``): one per driver *mode*.

A peer is what the suite needs to know about a driver that the driver's own interface does not
tell, and that must come from outside the driver so that the driver is not its own judge: the
driver's name and settings for the test, how to start its host or API on loopback, whether a
machine runs (processes, libvirt domains), and what the driver might have left behind
(processes, domains, networks, files).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import pytest

import lifeboat.targets.qemu
from lifeboat.targets.base import Guest
from lifeboat.targets.kvm import network_name
from lifeboat.targets.qemu import socket_dir
from tests.targets.realpeers import qemu_processes

Leftover = tuple[str, str]  # (kind, ident): ("process", "PID EXE"), ("file", PATH), ("domain", NAME), ...


class Peer(ABC):
    """One driver mode as the suite drives it (see the module docstring)."""

    id: str  # the pytest id of the mode
    driver: str  # the name a runbook's ``target.driver`` gives
    settings: dict[str, Any]  # the runbook's ``target.settings`` for the test (small guests)

    @abstractmethod
    def start(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        """Start the driver's host or API on loopback (or check it answers); fail if it cannot."""

    @abstractmethod
    def is_running(self, guest: Guest) -> bool:
        """Whether the guest's machine runs, asked of the host, not of the driver."""

    @abstractmethod
    def leftovers(self, guest: Guest) -> list[Leftover]:
        """Everything of this guest that exists on the host: machines, networks, and every path
        in the places the driver writes to (the suite tells apart the engine's own files)."""

    def __repr__(self) -> str:
        return self.id


def hypervisor_processes(token: str) -> list[Leftover]:
    """The qemu-system processes whose command line holds ``token`` (not ``lifeboat serve``)."""
    out = []
    for pid in qemu_processes(token):
        try:
            exe = Path(f"/proc/{pid}/exe").resolve().name
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if exe.startswith("qemu-system") and state != "Z":
            out.append(("process", f"{pid} {exe}"))
    return out


def paths_under(*places: Path) -> list[Leftover]:
    """Each place that exists and everything below it, as ("file", PATH) / ("dir", PATH)."""
    out: list[Leftover] = []
    for place in places:
        if place.exists():
            for p in [place, *sorted(place.rglob("*"))]:
                out.append(("dir" if p.is_dir() else "file", str(p)))
    return out


class QemuPeer(Peer):
    """qemu-system run directly: no daemon; a machine is a qemu-system process."""

    driver = "qemu"

    def __init__(self, boot: str) -> None:
        self.id = "qemu" if boot == "nbd" else f"qemu-{boot}"
        self.settings = {"memory_mib": 256, "boot": boot}

    def start(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        """No host to start. A fresh host memo: where /dev/kvm opens but KVM fails (nested),
        this exercises the restart under TCG; where KVM works, the guest simply runs under KVM."""
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setattr(lifeboat.targets.qemu, "kvm_memo", lambda: tmp_path / "kvm-memo")

    def is_running(self, guest: Guest) -> bool:
        """A qemu-system process carries the guest's token."""
        return bool(hypervisor_processes(guest.token))

    def leftovers(self, guest: Guest) -> list[Leftover]:
        """qemu-system processes; the guest's workdir and its socket folder."""
        return hypervisor_processes(guest.token) + paths_under(guest.workdir, socket_dir(guest))


class KvmPeer(Peer):
    """A real libvirtd on ``qemu:///system`` (started by the ``libvirtd`` fixture if needed)."""

    id = driver = "kvm"
    settings = {"memory_mib": 256}
    storage_dir = Path("/var/lib/lifeboat/kvm")  # the schema's default

    def start(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        """libvirtd and virtlogd, as daemons."""
        request.getfixturevalue("libvirtd")

    def _conn(self) -> Any:
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        return libvirt.open("qemu:///system")

    def is_running(self, guest: Guest) -> bool:
        """A libvirt domain named by the guest's token is active."""
        conn = self._conn()
        try:
            return any(d.name() == guest.token and d.isActive() for d in conn.listAllDomains())
        finally:
            conn.close()

    def leftovers(self, guest: Guest) -> list[Leftover]:
        """Domains and networks of the guest's run, their qemu-system processes, the guest's
        workdir and its folder under ``storage_dir``."""
        conn = self._conn()
        try:
            found: list[Leftover] = [("domain", d.name()) for d in conn.listAllDomains() if d.name() == guest.token]
            found += [("network", n.name()) for n in conn.listAllNetworks() if n.name() == network_name(guest.run_id)]
        finally:
            conn.close()
        return found + hypervisor_processes(guest.token) + paths_under(guest.workdir, self.storage_dir / guest.token)


PEERS: list[Peer] = [QemuPeer("nbd"), QemuPeer("image"), KvmPeer()]
