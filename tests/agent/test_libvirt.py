"""libvirt checkpoints + pull-mode backups of a real domain run by a real libvirtd (started here if
none answers): full and incremental points restore to states the guest had, and a deleted
checkpoint or a resized disk falls back to a full read that says why."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifeboat.agent.plan import MODE_CHECKPOINT, MODE_FULL, BackupPlan, capture
from lifeboat.agent.virt import LibvirtSource
from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.restore import restore
from lifeboat.orchestrator.sources import open_source
from tests.agent.guest import Console, check_point, make_disk

URI = "qemu:///system"


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    """A libvirtd answering on qemu:///system; started (and later stopped) here if none runs."""
    import libvirt

    def answers() -> bool:
        try:
            libvirt.open(URI).close()
            return True
        except libvirt.libvirtError:
            return False

    started: list[subprocess.Popen[bytes]] = []
    if not answers():
        for daemon in ("virtlogd", "libvirtd"):
            started.append(subprocess.Popen([daemon], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while not answers():
            assert time.monotonic() < deadline, "libvirtd did not start"
            time.sleep(0.2)
    yield
    for proc in reversed(started):
        proc.terminate()
        proc.wait(timeout=30)


class Domain:
    """A persistent domain booting the sample guest from a qcow2 disk, its console tailed."""

    def __init__(self, image: Path) -> None:
        import libvirt

        self.dir = Path(tempfile.mkdtemp(prefix="lifeboat-agent-libvirt-", dir="/var/tmp"))
        self.dir.chmod(0o755)  # the domain's QEMU runs as its own user
        self.disk = make_disk(image, self.dir)
        self.console_file = self.dir / "console.log"
        self.name = f"lifeboat-agent-test-{secrets.token_hex(4)}"
        self.console = Console()
        self.conn = libvirt.open(URI)
        xml = f"""<domain type='qemu'><name>{self.name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{self.disk}'/>
<target dev='vda' bus='virtio'/></disk>
<serial type='file'><source path='{self.console_file}'/></serial></devices></domain>"""
        self.dom = self.conn.defineXML(xml)
        self.dom.create()
        self._stop = threading.Event()
        threading.Thread(target=self._tail, daemon=True).start()
        self.wait_records(3, 90)

    @property
    def spec(self) -> str:
        return f"libvirt:///{self.name}?disk=vda&uri={URI}"

    def _tail(self) -> None:
        pos = 0
        pending = ""
        while not self._stop.wait(0.05):
            try:
                with open(self.console_file, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except OSError:
                continue
            pos += len(data)
            pending += data.decode(errors="replace").replace("\r", "")
            *done, pending = pending.split("\n")
            now = time.time()
            with self.console.cond:
                for line in done:
                    if "LIFEBOAT-GUEST: " in line:
                        self.console.lines.append((now, line.split("LIFEBOAT-GUEST: ", 1)[1].strip()))
                self.console.cond.notify_all()

    def wait_records(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.console.wrote_max() < n:
            assert time.monotonic() < deadline, f"guest wrote no record {n}: {self.console.lines[-10:]}"
            time.sleep(0.1)

    def close(self) -> None:
        import libvirt

        self._stop.set()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        self.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def domain(libvirtd: None, sample_guest_image: Path) -> Iterator[Domain]:
    d = Domain(sample_guest_image)
    try:
        yield d
    finally:
        d.close()


def backup(arc: Archive, dom: Domain) -> tuple[PointInfo, BackupPlan]:
    with open_source(dom.spec) as src:
        assert isinstance(src, LibvirtSource)
        return capture(arc, "vm", src)


def verify(arc: Archive, info: PointInfo, dom: Domain, tmp_path: Path) -> int:
    dest = tmp_path / f"{info.point}.img"
    restore(arc.reader(info), dest)
    return check_point(dest, info.time, dom.console)


def test_checkpoint_chain_and_fallbacks(arc: Archive, domain: Domain, tmp_path: Path) -> None:
    full, plan = backup(arc, domain)
    assert plan.mode == MODE_FULL and plan.fallback_reason is None and full.bytes_read == full.size
    verify(arc, full, domain, tmp_path)
    domain.wait_records(domain.console.wrote_max() + 3)
    inc, plan = backup(arc, domain)
    assert plan.mode == MODE_CHECKPOINT and plan.base and plan.base.point == full.point
    assert 0 < inc.bytes_read <= 8 * 1024 * 1024
    assert verify(arc, inc, domain, tmp_path) > 3
    checkpoints = [c.getName() for c in domain.dom.listAllCheckpoints()]
    assert len(checkpoints) == 1 and checkpoints[0] in inc.source  # the older one was deleted
    domain.dom.checkpointLookupByName(checkpoints[0]).delete(0)
    domain.wait_records(domain.console.wrote_max() + 2)
    info, plan = backup(arc, domain)
    assert plan.mode == MODE_FULL and plan.fallback_reason and "missing" in plan.fallback_reason
    verify(arc, info, domain, tmp_path)
    domain.dom.blockResize("vda", info.size + 32 * 1024 * 1024, 1)  # flag 1: size in bytes
    info, plan = backup(arc, domain)
    assert plan.mode == MODE_FULL and plan.fallback_reason and "resized" in plan.fallback_reason
    verify(arc, info, domain, tmp_path)
    domain.wait_records(domain.console.wrote_max() + 2)
    info, plan = backup(arc, domain)
    assert plan.mode == MODE_CHECKPOINT
    verify(arc, info, domain, tmp_path)
