"""A bare-metal server on one machine, for the pxe target's tests: a blank libvirt domain with an empty
local disk, on a host-only libvirt network whose DHCP (libvirt's dnsmasq) gives only addresses: the
boot file comes from the driver's own proxy DHCP (``dhcp: {mode: proxy}``, ``targets/pxedhcp.py``),
as on a real site whose DHCP lifeboat does not control. Driven through a real BMC emulator:
``sushy-emulator`` (sushy-tools, libvirt driver) with HTTP basic authentication, as OpenStack
Ironic's CI does.

One server per session (``pxe_server``, session-scoped): tests that restore onto it run one after
the other, each leaving it powered off. Its domain, network, bridge and subnet have fixed names;
``LIFEBOAT_PXE_TEST_SLOT=N`` (0 to 9, default 0) gives a second session on the same host its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from examples.sample_guest import IMAGE_SIZE

SLOT = int(os.environ.get("LIFEBOAT_PXE_TEST_SLOT", "0"))
assert 0 <= SLOT <= 9, "LIFEBOAT_PXE_TEST_SLOT must be 0 to 9"
_SUFFIX = f"-{SLOT}" if SLOT else ""
PLACE = Path(f"/var/lib/lifeboat/pxe-test{_SUFFIX}")  # where libvirt's QEMU (user libvirt-qemu) may read
DOMAIN = f"lifeboat-pxe-server{_SUFFIX}"
NETWORK = f"lifeboat-pxe-net{_SUFFIX}"
_NET = f"10.{214 + SLOT}.0"
HOST_IP = f"{_NET}.1"
SUBNET = f"{_NET}.0"
BRIDGE = f"lbpxe{SLOT}"
MAC = "52:54:00:4c:42:01"
SERIAL = "LBSRV0001"
DISK_BYTES = IMAGE_SIZE * 2  # larger than the sample guest's point: its last partition grows
USER = "admin"


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PxeServer:
    """The stand-in server and its BMC, as tests need them."""

    bmc_url: str
    password_file: Path
    http_port: int
    disk: Path
    console: Path

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """The pxe driver's settings for this server."""
        base: dict[str, Any] = {
            "mac": MAC,
            "bmc": {
                "protocol": "redfish",
                "address": self.bmc_url,
                "system": DOMAIN,
                "user": USER,
                "password_file": str(self.password_file),
            },
            "disk": {"serial": SERIAL},
            "http_listen": f"{HOST_IP}:{self.http_port}",
            "netboot_timeout": 300,
            "console_log": str(self.console),
            "dhcp": {"mode": "proxy", "interface": BRIDGE, "subnet": SUBNET},
        }
        base.update(overrides)
        return base

    def console_text(self) -> str:
        """What the server's serial console showed, over all its power cycles."""
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def power_off(self) -> None:
        """Off at once, as pulling the plug."""
        _virsh("destroy", DOMAIN)

    @contextlib.contextmanager
    def read_only_disk(self) -> Iterator[None]:
        """The server's disk read-only to it (libvirt ``<readonly/>``: virtio-blk refuses every write)
        while the block runs, the server off before and after."""
        self.power_off()
        _disk_read_only(True)
        try:
            yield
        finally:
            self.power_off()
            _disk_read_only(False)

    def blank(self) -> None:
        """An empty disk and console, with the server off (before each restore)."""
        self.power_off()
        with open(self.disk, "r+b") as f:
            f.truncate(0)
            f.truncate(DISK_BYTES)
        self.console.write_text("")


def _virsh(*args: str, uri: str = "qemu:///system") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True)


def _disk_read_only(read_only: bool) -> None:
    """The domain's disk read-only or not in its definition (the rest, such as the boot device the BMC
    set, kept)."""
    dom = ET.fromstring(_virsh("dumpxml", "--inactive", DOMAIN).stdout)
    disk = dom.find("devices/disk")
    assert disk is not None
    for flag in disk.findall("readonly"):
        disk.remove(flag)
    if read_only:
        ET.SubElement(disk, "readonly")
    xml = ET.tostring(dom, encoding="unicode")
    done = subprocess.run(["virsh", "-c", "qemu:///system", "define", "/dev/stdin"], input=xml, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, f"virsh define: {done.stderr}"


def network_xml() -> str:
    """Host-only, plain DHCP: addresses, no boot file (the site's DHCP, which lifeboat leaves alone).
    The server's port forwards at link-up, as a PXE site's switch port must (portfast / edge port):
    with spanning tree on, the bridge drops the server's frames for 4 s after each power-on, the
    ROM's first DHCP requests are lost, and iPXE (which waits 2 s for proxy offers) then takes
    whichever offer comes first: libvirt's once it knows the server's lease, so lifeboat's proxy
    offer lost every netboot after the first (``targets/pxedhcp.py``, ``missed_offers``)."""
    net = ET.Element("network")
    ET.SubElement(net, "name").text = NETWORK
    ET.SubElement(net, "bridge", name=BRIDGE, stp="off")
    ip = ET.SubElement(net, "ip", address=HOST_IP, netmask="255.255.255.0")
    dhcp = ET.SubElement(ip, "dhcp")
    ET.SubElement(dhcp, "range", start=f"{_NET}.10", end=f"{_NET}.99")
    return ET.tostring(net, encoding="unicode")


def domain_xml(disk: Path, console: Path) -> str:
    """A blank server: TCG (no reliance on nested KVM), a virtio disk with a serial number, one NIC on
    the PXE network, boots from its disk until its BMC says otherwise, serial console to a file."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = DOMAIN
    ET.SubElement(dom, "memory", unit="MiB").text = "512"
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "boot", dev="hd")
    dev = ET.SubElement(dom, "devices")
    d = ET.SubElement(dev, "disk", type="file", device="disk")
    ET.SubElement(d, "driver", name="qemu", type="raw")
    ET.SubElement(d, "source", file=str(disk))
    ET.SubElement(d, "target", dev="vda", bus="virtio")
    ET.SubElement(d, "serial").text = SERIAL
    iface = ET.SubElement(dev, "interface", type="network")
    ET.SubElement(iface, "source", network=NETWORK)
    ET.SubElement(iface, "mac", address=MAC)
    ET.SubElement(iface, "model", type="virtio")
    serial = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console), append="on")
    ET.SubElement(serial, "target", port="0")
    return ET.tostring(dom, encoding="unicode")


def _remove() -> None:
    _virsh("destroy", DOMAIN)
    _virsh("undefine", DOMAIN)
    _virsh("net-destroy", NETWORK)


def wait_for_redfish(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the emulator answers (401 without credentials is an answer)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/redfish/v1/", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        assert proc.poll() is None, f"sushy-emulator exited: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "sushy-emulator did not answer"
        time.sleep(0.3)


@contextlib.contextmanager
def stand_in_server(libvirt_uri: str, work: Path) -> Iterator[PxeServer]:
    """The server (domain, network, disk) and its Redfish BMC (sushy-emulator, basic auth, files
    in ``work``); all removed on exit. ``bench/pxe_bench.py`` uses it too."""
    emulator = Path(sys.executable).parent / "sushy-emulator"
    assert emulator.exists(), f"{emulator} is missing: pip install sushy-tools (pyproject.toml)"
    _remove()
    shutil.rmtree(PLACE, ignore_errors=True)
    PLACE.mkdir(parents=True)
    os.chmod(PLACE, 0o755)
    disk, console = PLACE / "disk.raw", PLACE / "console.log"
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    console.write_text("")
    http_port = free_port()
    for args in (("net-create", "/dev/stdin"), ("define", "/dev/stdin")):
        xml = network_xml() if args[0] == "net-create" else domain_xml(disk, console)
        done = subprocess.run(["virsh", "-c", libvirt_uri, *args], input=xml, capture_output=True, text=True)
        assert done.returncode == 0, f"virsh {args[0]}: {done.stderr}"
    password = "s3cret-" + os.urandom(4).hex()
    (work / "password").write_text(password + "\n")
    (work / "htpasswd").write_text(f"{USER}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()}\n")
    (work / "emulator.conf").write_text(
        f"SUSHY_EMULATOR_AUTH_FILE = {str(work / 'htpasswd')!r}\n"
        f"SUSHY_EMULATOR_LIBVIRT_URI = {libvirt_uri!r}\n"
        "SUSHY_EMULATOR_IGNORE_BOOT_DEVICE = False\n"
    )
    port = free_port()
    log = work / "emulator.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(emulator), "-i", "127.0.0.1", "-p", str(port), "--config", str(work / "emulator.conf")],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_redfish(url, proc, log)
        yield PxeServer(url, work / "password", http_port, disk, console)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        _remove()
        shutil.rmtree(PLACE, ignore_errors=True)


@pytest.fixture(scope="session")
def pxe_server(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PxeServer]:
    """The stand-in server and its Redfish BMC, for the session."""
    with stand_in_server(libvirtd, tmp_path_factory.mktemp("bmc")) as server:
        yield server


# pyghmi's BMC side answers every RMCP+ open-session request with cipher suite 3 (SHA-1), even when
# the client proposed SHA-256, which pyghmi's own client (trying SHA-256 first) then fails to parse;
# a real BMC refuses a suite it lacks (status 0x11), and the client falls back to SHA-1: do that.
VBMC_SCRIPT = """
import sys
from pathlib import Path
from pyghmi.ipmi.private.serversession import ServerSession
from virtualbmc.vbmc import VirtualBMC

answer = ServerSession.create_open_session_response

def refuse_sha256(self, request):
    if request[12] != 1:
        return bytearray([request[0], 0x11, 0, 0]) + request[4:8]
    return answer(self, request)

ServerSession.create_open_session_response = refuse_sha256
user, password_file, port, domain, uri = sys.argv[1:]
bmc = VirtualBMC(user, Path(password_file).read_text().strip(), int(port), "127.0.0.1", domain, uri)
print("listening", flush=True)
bmc.listen(timeout=1)
"""


@pytest.fixture(scope="session")
def ipmi_bmc(pxe_server: PxeServer, libvirtd: str) -> Iterator[str]:
    """An IPMI BMC for the same server: virtualbmc's ``VirtualBMC`` (pyghmi's BMC side over the
    libvirt domain) on a loopback UDP port, with the server's password; its address HOST:PORT."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", VBMC_SCRIPT, USER, str(pxe_server.password_file), str(port), DOMAIN, libvirtd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"listening", "virtualbmc did not start"
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
