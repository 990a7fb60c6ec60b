"""A real machine boots from the archive: the sample guest under QEMU and under libvirt, served
``--writable``; its disk write lands in the overlay and the archive point stays as it was."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.sample_guest import INITIAL_COUNTER, INITIAL_TEXT, PARTITION2_OFFSET, boot, read_record
from lifeboat.archive import Archive
from tests.nbdserver.conftest import Served, archive_digest, need, new_archive, run

BOOT_TIMEOUT = 240  # a deadline for a TCG boot on a busy machine, not a performance threshold


def record_via_nbd(url: str, tmp: Path) -> tuple[int, str]:
    """The guest's disk record as the export shows it now."""
    out = tmp / f"disk-{uuid.uuid4().hex}.img"
    run(["nbdcopy", url, str(out)])
    try:
        return read_record(out)
    finally:
        out.unlink()


@pytest.fixture
def guest_archive(tmp_path: Path, sample_guest_image: Path) -> Path:
    return new_archive(tmp_path / "archive", sample_guest_image, "guest")


def test_sample_guest_boots_under_qemu_from_writable_export(guest_archive: Path, tmp_path: Path,
                                                            serve: Callable[..., Served]) -> None:
    need("qemu-system-x86_64")
    before = archive_digest(guest_archive)
    s = serve(guest_archive, "guest", "--writable")
    result = boot(s.url, timeout=BOOT_TIMEOUT)
    assert result.matched, f"the guest did not write its disk\n{result.console[-3000:]}\n{result.stderr}"
    assert f"disk-record {INITIAL_COUNTER} {INITIAL_TEXT}" in result.console
    assert s.stop() == 0

    arc = Archive.open(str(guest_archive))
    point = arc.resolve("guest")
    assert (guest_archive / "overlays" / f"guest-{point.point}.cow").stat().st_blocks > 0
    s2 = serve(guest_archive, "guest", "--writable")
    assert record_via_nbd(s2.url, tmp_path) == (INITIAL_COUNTER + 1, INITIAL_TEXT)  # in the overlay
    s3 = serve(guest_archive, "guest")
    assert record_via_nbd(s3.url, tmp_path) == (INITIAL_COUNTER, INITIAL_TEXT)  # the point is unchanged
    assert read_record(arc.reader(point).read(PARTITION2_OFFSET, 512)) == (INITIAL_COUNTER, INITIAL_TEXT)
    assert archive_digest(guest_archive) == before


# --------------------------------------------------------------------------- libvirt


@pytest.fixture(scope="session")
def libvirt_conn(libvirtd: str) -> Iterator[Any]:
    """A connection to the session's libvirtd."""
    import libvirt

    conn = libvirt.open(libvirtd)
    yield conn
    conn.close()


def domain_xml(name: str, host: str, port: int, export: str, console: Path) -> str:
    """A transient KVM-less (type qemu) domain booting from an NBD disk, console to a file."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "256"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    disk = ET.SubElement(devices, "disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    source = ET.SubElement(disk, "source", protocol="nbd", name=export)
    ET.SubElement(source, "host", name=host, port=str(port))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
    return ET.tostring(dom, encoding="unicode")


def test_libvirt_domain_boots_from_writable_export(guest_archive: Path, tmp_path: Path, libvirt_conn: Any,
                                                   serve: Callable[..., Served]) -> None:
    import libvirt

    s = serve(guest_archive, "guest", "--writable")
    consdir = Path(tempfile.mkdtemp(prefix="lifeboat-libvirt-"))  # qemu runs as libvirt-qemu: world-traversable
    consdir.chmod(0o777)
    console = consdir / "console.log"
    name = f"lifeboat-test-{uuid.uuid4().hex[:8]}"
    dom = libvirt_conn.createXML(domain_xml(name, s.host, s.port, s.export, console), 0)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        text = ""
        while "LIFEBOAT-GUEST: disk-write-ok" not in text:
            assert time.monotonic() < deadline, f"the libvirt domain did not write its disk:\n{text[-3000:]}"
            time.sleep(0.5)
            text = console.read_text(errors="replace") if console.exists() else ""
        assert "LIFEBOAT-GUEST: booted" in text
    finally:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass  # it powered off by itself: transient domains vanish
        shutil.rmtree(consdir, ignore_errors=True)
    assert s.stop() == 0
    s2 = serve(guest_archive, "guest", "--writable")
    assert record_via_nbd(s2.url, tmp_path) == (INITIAL_COUNTER + 1, INITIAL_TEXT)
