"""Test peers of the target driver suite (``test_conformance.py``): one per driver *mode*.

A peer is what the suite needs to know about a driver that the driver's own interface does not
tell, and that must come from outside the driver so that the driver is not its own judge: the
driver's name and settings for the test, how to start its host or API on loopback, whether a
machine runs (processes, libvirt domains), and what the driver might have left behind
(processes, domains, networks, files).
"""

from __future__ import annotations

import os
import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import pytest

import lifeboat.targets.qemu
from lifeboat.targets.base import Guest
from lifeboat.targets.kvm import network_name
from lifeboat.targets.qemu import socket_dir
from tests.targets.pxeserver import DOMAIN as PXE_DOMAIN
from tests.targets.pxeserver import PxeServer
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

    def held_disk(self, guest: Guest, folder: Path) -> Path | None:
        """For a target that cannot really boot the guest here (no console to watch it): the
        machine's disk as the host holds it, fetched into ``folder`` (an image ``qemu-img``
        reads); None for peers whose guests really boot."""
        return None

    def server_disk(self, guest: Guest) -> Path | None:
        """A physical machine's local disk as a file on the host (None: not a physical peer)."""
        return None

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


class VmwarePeer(Peer):
    """govmomi's vCenter simulator (``tests/vcsim.py``): real vSphere API calls and datastore
    HTTP, but a VM that is powered on runs nothing, so the suite judges the disk it holds."""

    id = driver = "vmware"

    def __init__(self) -> None:
        from tests.vcsim import DATACENTER, DATASTORE

        # placeholders until start() points them at the session's simulator (the schema test
        # needs no server)
        self.settings = {
            "host": "127.0.0.1:1",
            "user": "user",
            "password_file": "/nonexistent",
            "datacenter": DATACENTER,
            "datastore": DATASTORE,
            "memory_mib": 256,
            "isolated_port_group": "DC0_DVPG0",
        }
        self.vcenter: Any = None

    def start(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        """The session's simulator."""
        self.vcenter = request.getfixturevalue("vcsim")
        self.settings = self.vcenter.settings(memory_mib=256, isolated_port_group="DC0_DVPG0")

    def _vms(self, si: Any) -> list[Any]:
        from pyVmomi import vim

        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        try:
            return list(view.view)
        finally:
            view.Destroy()

    def is_running(self, guest: Guest) -> bool:
        """A VM named by the guest's token is powered on."""
        si = self.vcenter.connect()
        return any(vm.name == guest.token and vm.runtime.powerState == "poweredOn" for vm in self._vms(si))

    def leftovers(self, guest: Guest) -> list[Leftover]:
        """VMs named by the guest's token, VM folders of its run, the datastore's files of the
        guest (read in the datastore's folder on this host), the guest's workdir."""
        from pyVmomi import vim

        from lifeboat.targets.vmware import run_folder_name

        if self.vcenter is None:
            return paths_under(guest.workdir)
        si = self.vcenter.connect()
        found: list[Leftover] = [("vm", vm.name) for vm in self._vms(si) if vm.name == guest.token]
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Folder], True)
        found += [("folder", f.name) for f in view.view if f.name == run_folder_name(guest.run_id)]
        view.Destroy()
        stores = [Path(ds.info.url) for dc in content.rootFolder.childEntity for ds in dc.datastore]
        return found + paths_under(*(store / guest.token for store in stores), guest.workdir)

    def held_disk(self, guest: Guest, folder: Path) -> Path | None:
        """The VM's disk files (descriptor and extents, as its configuration names them),
        downloaded over the datastore's HTTP access."""
        import http.client
        import ssl
        from urllib.parse import quote, urlencode

        from pyVmomi import vim

        si = self.vcenter.connect()
        vm = next(vm for vm in self._vms(si) if vm.name == guest.token)
        disk: Any = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
        ds_name, _, path = disk.backing.fileName.partition("] ")
        ds_name = ds_name.lstrip("[")
        host, _, port = self.vcenter.host.rpartition(":")
        cookie = si._stub.cookie.split(";", 1)[0]
        context = ssl.create_default_context(cafile=str(self.vcenter.ca_file))

        def get(name: str) -> bytes:
            conn = http.client.HTTPSConnection(host, int(port), context=context)
            query = urlencode({"dcPath": "DC0", "dsName": ds_name})
            conn.request("GET", f"/folder/{quote(name)}?{query}", headers={"Cookie": cookie})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, f"GET [{ds_name}] {name}: {resp.status}"
            return body

        descriptor = get(path)
        out = folder / Path(path).name
        out.write_bytes(descriptor)
        for line in descriptor.decode().splitlines():
            if line.startswith(("RW ", "RDONLY ")):
                extent = line.split('"')[1]
                (folder / extent).write_bytes(get(str(Path(path).parent / extent)))
        return out


class PxePeer(Peer):
    """A blank libvirt domain standing in for a bare-metal server, its Redfish BMC a real
    sushy-emulator (``tests/targets/pxeserver.py``)."""

    id = driver = "pxe"

    def __init__(self) -> None:
        self.server: PxeServer | None = None
        self.settings = {"bmc": {"protocol": "redfish", "address": "http://127.0.0.1:9"}, "http_listen": "127.0.0.1:9"}

    def start(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        """The session's server and BMC, the server off with a blank disk."""
        self.server = request.getfixturevalue("pxe_server")
        self.server.blank()
        self.settings = self.server.settings()

    def is_running(self, guest: Guest) -> bool:
        """libvirt says the server's domain runs."""
        done = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", PXE_DOMAIN], capture_output=True, text=True)
        return done.stdout.strip() == "running"

    def leftovers(self, guest: Guest) -> list[Leftover]:
        """Processes carrying the guest's token (the HTTP server), the guest's workdir; the server
        itself is the site's, not the driver's (``is_running`` says whether it was left on)."""
        procs: list[Leftover] = [("process", str(pid)) for pid in qemu_processes(guest.token)]
        return procs + paths_under(guest.workdir)

    def server_disk(self, guest: Guest) -> Path | None:
        """The domain's disk file."""
        return self.server.disk if self.server else None


class OpenStackPeer(Peer):
    """Real Keystone and Glance, Nova/Cinder/Neutron doubles (``openstack_cloud``: see
    ``tests/targets/openstackcloud.py``); credentials through the ``OS_*`` variables."""

    driver = "openstack"

    def __init__(self, boot_from_volume: bool) -> None:
        self.id = "openstack-volume" if boot_from_volume else "openstack"
        self.settings = {
            "flavor": "m1.tiny",
            "isolated_network": "private",
            "networks": [{"network": "public", "fixed_ip": "203.0.113.7" if boot_from_volume else "203.0.113.8"}],
            "security_groups": ["ssh"],
            "key_name": "ops",
            "availability_zone": "nova",
        }
        if boot_from_volume:
            self.settings.update(boot_from_volume=True, image_format="raw")
        self.cloud: Any = None

    def start(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        """The session's local cloud, its credentials in the environment the driver reads."""
        self.cloud = request.getfixturevalue("openstack_cloud")
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.delenv("OS_CLOUD", raising=False)
        for k, v in self.cloud.env().items():
            monkeypatch.setenv(k, v)

    def _of_run(self, kind: str, guest: Guest) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.cloud.doubles.state()[kind]
        return [i for i in items if (i.get("metadata") or {}).get("lifeboat_run") == guest.run_id]

    def is_running(self, guest: Guest) -> bool:
        """Nova (the double) has an ACTIVE server of the guest's run."""
        return any(s["status"] == "ACTIVE" for s in self._of_run("servers", guest))

    def leftovers(self, guest: Guest) -> list[Leftover]:
        """Glance images tagged with the run (asked of the real Glance as admin), servers and
        volumes carrying the run's metadata, ports of those servers; the guest's workdir."""
        conn = self.cloud.connect()
        found: list[Leftover] = [("image", i.id) for i in conn.image.images(tag=[f"lifeboat-run:{guest.run_id}"])]
        servers = self._of_run("servers", guest)
        found += [("server", s["id"]) for s in servers] + [("volume", v["id"]) for v in self._of_run("volumes", guest)]
        ids = {s["id"] for s in servers}
        found += [("port", p["id"]) for p in self.cloud.doubles.state()["ports"] if p["device_id"] in ids]
        return found + paths_under(guest.workdir)

    def held_disk(self, guest: Guest, folder: Path) -> Path | None:
        """The guest's image as the real Glance serves it (found by the run's tag and the
        guest's name, as admin), downloaded into ``folder``."""
        conn = self.cloud.connect()
        (image,) = [i for i in conn.image.images(tag=[f"lifeboat-run:{guest.run_id}"]) if i.name == guest.token]
        resp = conn.image.get(f"/images/{image.id}/file", stream=True)
        assert resp.status_code == 200, resp.text
        dest = folder / f"image.{image.disk_format}"
        with open(dest, "wb") as f:
            for chunk in resp.iter_content(1 << 20):
                f.write(chunk)
        return dest


class AwsPeer(Peer):
    """moto's server on loopback (the ``moto_endpoint`` session fixture): EC2, the EBS direct
    APIs and STS; its instances run in name only (the suite reads the uploaded blocks back)."""

    id = driver = "aws"
    settings = {"region": "us-east-1", "instance_type": "t3.micro"}

    def start(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        """boto3 pointed at moto by ``AWS_ENDPOINT_URL``, with the test credentials."""
        from tests.archive.s3servers import CREDENTIALS

        endpoint = request.getfixturevalue("moto_endpoint")
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)

    def _ec2(self) -> Any:
        import boto3

        return boto3.client("ec2", region_name=self.settings["region"])

    def _tagged(self, guest: Guest) -> list[dict[str, Any]]:
        return [{"Name": "tag:lifeboat:run", "Values": [guest.run_id]},
                {"Name": "tag:lifeboat:guest", "Values": [guest.token]}]

    def is_running(self, guest: Guest) -> bool:
        """An instance tagged with the guest's run and token is running."""
        return any(x == ("instance", "running") for x in self._machines(guest))

    def _machines(self, guest: Guest) -> list[Leftover]:
        ec2 = self._ec2()
        pages = ec2.describe_instances(Filters=self._tagged(guest))["Reservations"]
        return [("instance", i["State"]["Name"]) for r in pages for i in r["Instances"]
                if i["State"]["Name"] != "terminated"]

    def leftovers(self, guest: Guest) -> list[Leftover]:
        """Instances not terminated, AMIs named by the guest's token and snapshots of the run's
        own (tagged with the run and the guest), the guest's workdir."""
        ec2 = self._ec2()
        found = self._machines(guest)
        found += [("image", i["ImageId"]) for i in ec2.describe_images(
            Owners=["self"], Filters=[{"Name": "name", "Values": [guest.token]}])["Images"]]
        found += [("snapshot", s["SnapshotId"]) for s in ec2.describe_snapshots(
            OwnerIds=["self"], Filters=self._tagged(guest))["Snapshots"]]
        return found + paths_under(guest.workdir)


    def held_disk(self, guest: Guest, folder: Path) -> Path | None:
        """The root snapshot of the AMI named by the guest's token, every block of its chain read
        with ``GetSnapshotBlock`` into a sparse raw file of the volume's size. On AWS the AMI's
        block device mapping names the snapshot; moto ignores the mapping, so the snapshot is the
        one the AMI is tagged with (``lifeboat:snapshot``), and as moto lists only a snapshot's own
        blocks, the chain is walked child first through the ``lifeboat:parent`` tags."""
        import boto3

        ec2, ebs = self._ec2(), boto3.client("ebs", region_name=self.settings["region"])
        image = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [guest.token]}])["Images"][0]
        snapshot: str | None = {t["Key"]: t["Value"] for t in image.get("Tags", [])}["lifeboat:snapshot"]
        out, seen = folder / "held.raw", set()
        with out.open("wb") as f:
            while snapshot:
                page = ebs.list_snapshot_blocks(SnapshotId=snapshot)
                f.truncate(int(page["VolumeSize"]) << 30)
                for b in page["Blocks"]:
                    if b["BlockIndex"] not in seen:
                        seen.add(b["BlockIndex"])
                        got = ebs.get_snapshot_block(SnapshotId=snapshot, BlockIndex=b["BlockIndex"],
                                                     BlockToken=b["BlockToken"])
                        f.seek(b["BlockIndex"] * int(page["BlockSize"]))
                        f.write(got["BlockData"].read())
                tags = ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0].get("Tags", [])
                snapshot = {t["Key"]: t["Value"] for t in tags}.get("lifeboat:parent")
        return out


PEERS: list[Peer] = [
    QemuPeer("nbd"),
    QemuPeer("image"),
    KvmPeer(),
    VmwarePeer(),
    PxePeer(),
    OpenStackPeer(False),
    OpenStackPeer(True),
    AwsPeer(),
]
