"""The ``kvm`` target: a libvirt domain (``libvirt-python``, ``qemu:///system`` by default).

The domain, built with ``xml.etree``, boots from the NBD export as a network disk. libvirt
refuses ``<transient/>`` on network disks, so the export itself is writable (copy-on-write,
hydrating to the local disk). Once hydration completes, ``move_to_local`` moves the running
domain onto the local disk with libvirt's block copy (``virDomainBlockCopy`` onto the hydrated
file, reused, then a pivot): no restart. libvirt's block copy always copies the whole disk
(it offers no ``sync=none``), so the data is read once more, from the now local export.

An isolated network for rehearsals is a libvirt network with no ``<forward>`` (host-only, DHCP),
one per run, shared by the run's machines; each machine records it and the last one torn down
removes it. The serial console goes to a file (console health checks); the guest agent channel is
added when a check runs a command in the guest.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from lifeboat.plumbing.nbd import NbdUrl
from lifeboat.targets.base import (
    Disk,
    ExecInGuest,
    ExecResult,
    Guest,
    HasConsole,
    Localizes,
    Resource,
    ResourceLog,
    TargetError,
    TargetUnavailable,
    destroy_generic,
)
from lifeboat.targets.qemu import kvm_memo, note_kvm_unusable

DISK_DEV = "vda"
_net_lock = threading.Lock()


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise TargetUnavailable("the kvm target needs the Python package libvirt-python") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions, not on stderr
    return libvirt


def network_name(run_id: str) -> str:
    """The isolated network of a run."""
    return f"lifeboat-{run_id.rsplit('-', 1)[-1][:12]}"


def domain_xml(
    *,
    name: str,
    domain_type: str,
    memory_mib: int,
    cpus: int,
    machine: str,
    disk_bus: str,
    nbd_url: str,
    console: Path,
    nic_model: str,
    network: str | None,
    agent: bool,
) -> str:
    """The domain definition, booting from ``nbd_url``."""
    url = NbdUrl.parse(nbd_url)
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = str(cpus)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine=machine).text = "hvm"
    ET.SubElement(os_, "boot", dev="hd")
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    dev = ET.SubElement(dom, "devices")
    disk = ET.SubElement(dev, "disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    src = ET.SubElement(disk, "source", protocol="nbd", name=url.export)
    ET.SubElement(src, "host", name=url.host, port=str(url.port))
    ET.SubElement(disk, "target", dev=DISK_DEV if disk_bus == "virtio" else "sda", bus=disk_bus)
    serial = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
    if network:
        iface = ET.SubElement(dev, "interface", type="network")
        ET.SubElement(iface, "source", network=network)
        ET.SubElement(iface, "model", type=nic_model)
    if agent:
        ch = ET.SubElement(dev, "channel", type="unix")
        ET.SubElement(ch, "target", type="virtio", name="org.qemu.guest_agent.0")
    video = ET.SubElement(dev, "video")
    ET.SubElement(video, "model", type="none")
    ET.SubElement(dev, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def network_xml(name: str, subnet: ipaddress.IPv4Network) -> str:
    """An isolated (no ``<forward>``) network with DHCP on ``subnet``."""
    net = ET.Element("network")
    ET.SubElement(net, "name").text = name
    ET.SubElement(net, "bridge", name="lb" + hashlib.sha1(name.encode()).hexdigest()[:10], stp="on", delay="0")
    hosts = list(subnet.hosts())
    ip = ET.SubElement(net, "ip", address=str(hosts[0]), netmask=str(subnet.netmask))
    dhcp = ET.SubElement(ip, "dhcp")
    ET.SubElement(dhcp, "range", start=str(hosts[9]), end=str(hosts[-1]))
    return ET.tostring(net, encoding="unicode")


class KvmTarget(Localizes, HasConsole, ExecInGuest):
    """A libvirt domain booting from the NBD export, moved onto the local disk by block copy."""

    name = "kvm"

    def __init__(self, settings: dict[str, Any], context: Any) -> None:
        super().__init__(settings, context)
        self._conn: Any = None
        self._conn_lock = threading.Lock()

    def supports_network(self, mode: str) -> bool:
        """isolated (a host-only libvirt network per run), none, mapped (onto libvirt networks)."""
        return mode in ("isolated", "none", "mapped")

    def local_disk_path(self, guest: Guest) -> Path | None:
        """Under ``storage_dir``, where the hypervisor's user may read and write."""
        return Path(self.settings["storage_dir"]) / guest.token / "disk.raw"

    # -- helpers --------------------------------------------------------------------------
    def conn(self) -> Any:
        """The libvirt connection (opened once)."""
        with self._conn_lock:
            if self._conn is None:
                libvirt = _libvirt()
                try:
                    self._conn = libvirt.open(self.settings["uri"])
                except libvirt.libvirtError as e:
                    raise TargetUnavailable(
                        f"libvirt at {self.settings['uri']}: {e} "
                        "(is libvirtd running? as root: libvirtd -d; virtlogd -d)"
                    ) from None
            return self._conn

    def _domain(self, name: str) -> Any:
        libvirt = _libvirt()
        try:
            return self.conn().lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise TargetError(f"libvirt: {e}") from None

    def _console(self, guest: Guest) -> Path:
        return Path(self.settings["storage_dir"]) / guest.token / "console.log"

    def _domain_type(self) -> str:
        wanted: str = self.settings["domain_type"]
        if wanted != "auto":
            return wanted
        caps = self.conn().getCapabilities()
        return "kvm" if "<domain type='kvm'" in caps and not kvm_memo().exists() else "qemu"

    # -- lifecycle ------------------------------------------------------------------------
    def prepare(self) -> None:
        """libvirt answers at ``uri``."""
        self.conn().getVersion()

    def provision(self, guest: Guest, disk: Disk, log: ResourceLog) -> None:
        """The isolated network (shared by the run), the console file, the domain's definition."""
        if not disk.nbd_url:
            raise TargetError(f"{guest.name}: the kvm target boots from an NBD export, none was given")
        for res in log.resources():
            if res.kind == "domain":
                return
        network = None
        if guest.network.mode == "isolated":
            network = self._ensure_network(guest, log)
        elif guest.network.mode == "mapped":
            network = sorted(set(guest.network.mappings.values()))[0]
        console = self._console(guest)
        console.parent.mkdir(parents=True, exist_ok=True)
        log.record("file", str(console), {})
        xml = domain_xml(
            name=guest.token,
            domain_type=self._domain_type(),
            memory_mib=self.settings["memory_mib"],
            cpus=self.settings["cpus"],
            machine=self.settings["machine"],
            disk_bus=self.settings["disk_bus"],
            nbd_url=disk.nbd_url,
            console=console,
            nic_model=self.settings["nic_model"],
            network=network,
            agent=guest.needs_agent,
        )
        log.record(
            "domain",
            guest.token,
            {"xml": xml, "persistent": bool(self.settings["persistent"]), "uri": self.settings["uri"]},
        )

    def _ensure_network(self, guest: Guest, log: ResourceLog) -> str:
        libvirt = _libvirt()
        name = network_name(guest.run_id)
        log.record("network", name, {"uri": self.settings["uri"]})
        with _net_lock:
            try:
                net = self.conn().networkLookupByName(name)
                if not net.isActive():
                    net.create()
                return name
            except libvirt.libvirtError:
                pass
            seed = int(hashlib.sha1(name.encode()).hexdigest(), 16)
            last: Exception | None = None
            for i in range(8):
                subnet = ipaddress.IPv4Network(f"10.213.{(seed + i * 37) % 250 + 1}.0/24")
                try:
                    self.conn().networkCreateXML(network_xml(name, subnet))
                    return name
                except libvirt.libvirtError as e:
                    last = e
            raise TargetError(f"cannot create the isolated network {name}: {last}")

    def boot(self, guest: Guest, log: ResourceLog) -> None:
        """Start the domain (transient, or defined then started); adopt it if it runs already."""
        dom = self._domain(guest.token)
        if dom is not None and dom.isActive():
            self.context.log(f"{guest.name}: domain {guest.token} is already running: adopted")
            return
        res = self._res(guest, log, "domain")
        self._start(res)
        self.context.log(
            f"{guest.name}: domain {guest.token} started ({'persistent' if res.data['persistent'] else 'transient'})"
        )

    def _start(self, res: Resource) -> None:
        libvirt = _libvirt()
        try:
            if res.data["persistent"]:
                dom = self.conn().defineXML(res.data["xml"])
                dom.create()
            else:
                self.conn().createXML(res.data["xml"], 0)
        except libvirt.libvirtError as e:
            raise TargetError(f"libvirt could not start {res.ident}: {e}") from None

    def _res(self, guest: Guest, log: ResourceLog, kind: str) -> Resource:
        for res in log.resources():
            if res.kind == kind:
                return res
        raise TargetError(f"{guest.name}: not provisioned")

    def is_running(self, guest: Guest, log: ResourceLog) -> bool:
        """The domain exists and runs."""
        libvirt = _libvirt()
        dom = self._domain(guest.token)
        return dom is not None and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    def poll(self, guest: Guest, log: ResourceLog) -> None:
        """Fail if the domain is gone; after a KVM internal error (paused), go to TCG under auto."""
        libvirt = _libvirt()
        dom = self._domain(guest.token)
        if dom is None or not dom.isActive():
            raise TargetError(f"{guest.name}: the domain {guest.token} is not running")
        state, reason = dom.state()
        if (
            state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_CRASHED)
            and reason != libvirt.VIR_DOMAIN_PAUSED_USER
        ):
            res = self._res(guest, log, "domain")
            root = ET.fromstring(res.data["xml"])
            if root.get("type") == "kvm" and self.settings["domain_type"] == "auto":
                self.context.log(f"{guest.name}: the KVM domain stopped (internal error?): restarting it under TCG")
                note_kvm_unusable()
                dom.destroy()
                root.set("type", "qemu")
                log.update(res, {"xml": ET.tostring(root, encoding="unicode")})
                self._start(res)
                return
            raise TargetError(f"{guest.name}: the domain stopped (state {state}, reason {reason})")

    def console_path(self, guest: Guest, log: ResourceLog) -> Path | None:
        """The serial console file."""
        return self._console(guest)

    def guest_endpoint(self, guest: Guest, log: ResourceLog, port: int) -> tuple[str, int] | None:
        """The guest's DHCP address on the run's isolated network, once it has one."""
        if guest.network.mode != "isolated":
            return None
        dom = self._domain(guest.token)
        if dom is None:
            return None
        macs = {m.get("address") for m in ET.fromstring(dom.XMLDesc()).iter("mac")}
        try:
            leases = self.conn().networkLookupByName(network_name(guest.run_id)).DHCPLeases()
        except Exception:
            return None
        for lease in leases:
            if lease.get("mac") in macs and lease.get("ipaddr"):
                return str(lease["ipaddr"]), port
        return None

    def exec_in_guest(self, guest: Guest, log: ResourceLog, argv: list[str], timeout: float) -> ExecResult:
        """``guest-exec`` through libvirt's agent channel."""
        import json

        import libvirt_qemu

        from lifeboat.targets.guestagent import guest_exec

        dom = self._domain(guest.token)
        if dom is None:
            raise TargetError(f"{guest.name}: no domain")

        def agent(execute: str, arguments: dict[str, Any]) -> Any:
            cmd = {"execute": execute, "arguments": arguments}
            try:
                return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), 10, 0))["return"]
            except _libvirt().libvirtError as e:
                raise TargetError(f"guest agent: {e}") from None

        return guest_exec(agent, argv, timeout)

    def move_to_local(self, guest: Guest, disk: Disk, log: ResourceLog) -> None:
        """Block copy onto the hydrated file (reused) and pivot; update a persistent definition."""
        libvirt = _libvirt()
        if disk.local_path is None:
            raise TargetError(f"{guest.name}: no local disk to move onto")
        dom = self._domain(guest.token)
        if dom is None:
            raise TargetError(f"{guest.name}: no domain")
        target_dev = DISK_DEV if self.settings["disk_bus"] == "virtio" else "sda"
        if self._on_local(dom, disk.local_path):
            return
        dest = ET.Element("disk", type="file", device="disk")
        ET.SubElement(dest, "driver", name="qemu", type="raw")
        ET.SubElement(dest, "source", file=str(disk.local_path))
        dest_xml = ET.tostring(dest, encoding="unicode")
        persistent = bool(dom.isPersistent())
        flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
        if persistent:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        if not dom.blockJobInfo(target_dev, 0):
            try:
                dom.blockCopy(target_dev, dest_xml, None, flags)
            except libvirt.libvirtError as e:
                raise TargetError(f"{guest.name}: block copy onto {disk.local_path}: {e}") from None
        deadline = time.monotonic() + 3600
        while True:
            info = dom.blockJobInfo(target_dev, 0)
            if info and info.get("end", 0) > 0 and info.get("cur") == info.get("end"):
                try:
                    dom.blockJobAbort(target_dev, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                    break
                except libvirt.libvirtError as e:
                    if "not ready" not in str(e).lower() and "ready" not in str(e).lower():
                        raise TargetError(f"{guest.name}: pivot onto {disk.local_path}: {e}") from None
            if not info and self._on_local(dom, disk.local_path):
                break
            if time.monotonic() > deadline:
                raise TargetError(f"{guest.name}: the block copy did not converge")
            time.sleep(0.2)
        for _ in range(100):
            if self._on_local(dom, disk.local_path):
                break
            time.sleep(0.1)
        else:
            raise TargetError(f"{guest.name}: the domain did not pivot onto {disk.local_path}")
        if persistent:
            dom.updateDeviceFlags(self._disk_xml(dom), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        res = self._res(guest, log, "domain")
        log.update(res, {"local_disk": str(disk.local_path)})
        self.context.log(f"{guest.name}: now running on the local disk {disk.local_path}")

    def _disk_xml(self, dom: Any) -> str:
        for d in ET.fromstring(dom.XMLDesc()).iter("disk"):
            if d.get("device") == "disk":
                for tag in ("backingStore", "alias", "address", "mirror"):
                    for child in d.findall(tag):
                        d.remove(child)
                return ET.tostring(d, encoding="unicode")
        raise TargetError("the domain has no disk")

    def _on_local(self, dom: Any, path: Path) -> bool:
        for d in ET.fromstring(dom.XMLDesc()).iter("disk"):
            src = d.find("source")
            if (
                d.get("device") == "disk"
                and src is not None
                and src.get("file") == str(path)
                and d.find("mirror") is None
            ):
                return True
        return False

    def destroy(self, resource: Resource) -> None:
        """Domains (destroyed and undefined), the run's network (once no domain uses it), files."""
        libvirt = _libvirt()
        if resource.kind == "domain":
            dom = self._domain(resource.ident)
            if dom is None:
                return
            try:
                _destroy_and_undefine(dom)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise TargetError(f"libvirt: removing {resource.ident}: {e}") from None
        elif resource.kind == "network":
            with _net_lock:
                try:
                    net = self.conn().networkLookupByName(resource.ident)
                except libvirt.libvirtError:
                    return
                for dom in self.conn().listAllDomains():
                    if f"network='{resource.ident}'" in dom.XMLDesc():
                        return  # another machine of the run still uses it: its teardown removes it
                try:
                    _destroy_and_undefine(net)
                except libvirt.libvirtError as e:
                    raise TargetError(f"libvirt: removing network {resource.ident}: {e}") from None
        else:
            destroy_generic(resource)


def _destroy_and_undefine(obj: Any) -> None:
    """Stop a libvirt domain or network and, if it is persistent, remove its definition."""
    persistent = obj.isPersistent()
    if obj.isActive():
        obj.destroy()
    if persistent:
        obj.undefine()
