"""The capture-source suite: every kind of source (``orchestrator/sources.py: SOURCES``) passes the
same tests against a real peer, as restic's ``internal/backend/test/suite.go`` does for backends.

Each kind brings a small peer (below): it starts the disk's host (a file, an image, a stand-in LVM
volume, a QEMU guest, a libvirt domain), makes a change, holds writes off (``quiet``) so the real
disk can be compared byte for byte, breaks the change tracking, and lists what a capture left
behind. The tests branch on what the opened source says it guarantees (``agent.plan.guarantees``,
the table of ``agent/SOURCES.md``), never on its name. Guests boot once per kind (module scope);
each test starts from a fresh archive and the peer forgets all tracking state after it.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lifeboat.agent.plan import (
    MODE_BITMAP,
    MODE_CBT,
    MODE_CHECKPOINT,
    MODE_FULL,
    MODE_HASH_SCAN,
    BackupPlan,
    CaptureError,
    Guarantees,
    capture,
    guarantees,
    plan_backup,
    run_plan,
)
from lifeboat.agent.qmp import TMP_PREFIX
from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.restore import restore
from lifeboat.orchestrator.sources import open_source
from tests.agent.conftest import fake_lvm
from tests.agent.guest import Domain, Guest, make_disk

MiB = 1024 * 1024
MACHINE = "m"
CHANGED_AT_MOST = 8 * MiB  # what an incremental after one small change may read, tracking granularity included
INCREMENTAL = (MODE_BITMAP, MODE_CHECKPOINT, MODE_CBT)


class Peer:
    """The host of one source kind, as the suite drives it."""

    spec: str

    def change(self) -> None:
        """Change a few blocks of the disk (with writes on)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """No write reaches the disk inside (a running guest is paused)."""
        yield

    def disk(self, dest: Path) -> None:
        """The disk's bytes now, as a raw file ``dest`` (called inside ``quiet``)."""
        raise NotImplementedError

    def break_tracking(self) -> None:
        """Remove the change tracking lifeboat left (only for sources that track changes)."""
        raise AssertionError("this source does not track changes")

    def tracking(self) -> list[str]:
        """The change-tracking state lifeboat keeps between captures (bitmaps, checkpoints)."""
        return []

    def leftovers(self) -> list[str]:
        """Anything else a capture made and did not remove (snapshots, jobs, exports, temp files)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget all tracking state, for the next test's fresh archive."""


class FilePeer(Peer):
    """A raw image file with a hole (read and hashed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "disk.img"
        rng = random.Random(11)
        with open(self.path, "wb") as f:
            f.write(rng.randbytes(4 * MiB))
            f.seek(12 * MiB)  # a hole in the middle
            f.write(rng.randbytes(4 * MiB))
        self.spec = str(self.path)
        self.rng = random.Random(12)

    def change(self) -> None:
        with open(self.path, "r+b") as f:
            for _ in range(3):
                f.seek(self.rng.randrange(0, 16 * MiB // 4096) * 4096)
                f.write(self.rng.randbytes(64 * 1024))

    def disk(self, dest: Path) -> None:
        shutil.copyfile(self.path, dest)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p != self.path)


class ImagePeer(Peer):
    """A qcow2 image file, read through lifeboat's reader; changed with qemu-io."""

    def __init__(self, root: Path) -> None:
        self.root = root
        raw = root / "seed.raw"
        raw.write_bytes(random.Random(13).randbytes(6 * MiB))
        self.path = root / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(self.path)], check=True)
        raw.unlink()
        subprocess.run(["qemu-img", "resize", "-q", str(self.path), str(16 * MiB)], check=True)
        self.spec = str(self.path)
        self.rng = random.Random(14)

    def change(self) -> None:
        for _ in range(3):
            at = self.rng.randrange(0, 16 * MiB // 65536) * 65536
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {self.rng.randrange(1, 255)} {at} 64k",
                            str(self.path)], check=True, capture_output=True)

    def disk(self, dest: Path) -> None:
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(self.path), str(dest)], check=True)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p != self.path)


class LvmPeer(Peer):
    """A loop device standing in for an LVM volume (``conftest.fake_lvm``), read from a snapshot."""

    def __init__(self, dev: str, state: Path) -> None:
        self.spec = dev
        self.state = state
        self.rng = random.Random(15)

    def change(self) -> None:
        fd = os.open(self.spec, os.O_WRONLY)
        try:
            for _ in range(3):
                os.pwrite(fd, self.rng.randbytes(64 * 1024), self.rng.randrange(0, 8 * MiB // 65536) * 65536)
            os.fsync(fd)
        finally:
            os.close(fd)

    def disk(self, dest: Path) -> None:
        with open(self.spec, "rb") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.state.glob("lifeboat-snap-*"))


def qcow2_as_raw(qcow2: Path, dest: Path) -> None:
    """A running guest's qcow2 as raw (``-U``: QEMU holds the image; paused, it has flushed)."""
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(qcow2), str(dest)], check=True)


class QmpPeer(Peer):
    """The sample guest under QEMU with a QMP socket, its workload writing records."""

    def __init__(self, guest: Guest, scratch: Path) -> None:
        self.guest = guest
        self.scratch = scratch
        self.spec = guest.spec

    def change(self) -> None:
        self.guest.wait_records(self.guest.console.wrote_max() + 3)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        self.guest.qmp("stop")
        try:
            yield
        finally:
            self.guest.qmp("cont")

    def disk(self, dest: Path) -> None:
        qcow2_as_raw(self.guest.disk, dest)

    def _bitmaps(self) -> list[str]:
        nodes = self.guest.qmp("query-named-block-nodes", flat=True)
        assert isinstance(nodes, list)
        return sorted({str(b["name"]) for n in nodes for b in n.get("dirty-bitmaps", [])
                       if str(b.get("name", "")).startswith("lifeboat")})

    def _node(self) -> str:
        nodes = self.guest.qmp("query-named-block-nodes", flat=True)
        assert isinstance(nodes, list)
        return next(n["node-name"] for n in nodes if n.get("dirty-bitmaps"))

    def break_tracking(self) -> None:
        self.reset()

    def tracking(self) -> list[str]:
        return [b for b in self._bitmaps() if not b.startswith(TMP_PREFIX + "frozen-")]

    def leftovers(self) -> list[str]:
        nodes = self.guest.qmp("query-named-block-nodes", flat=True)
        assert isinstance(nodes, list)
        jobs = self.guest.qmp("query-block-jobs")
        exports = self.guest.qmp("query-block-exports")
        assert isinstance(jobs, list) and isinstance(exports, list)
        return ([f"job {j['device']}" for j in jobs] + [f"export {e['id']}" for e in exports]
                + [f"node {n['node-name']}" for n in nodes if str(n["node-name"]).startswith(TMP_PREFIX)]
                + [f"bitmap {b}" for b in self._bitmaps() if b.startswith(TMP_PREFIX + "frozen-")]
                + [f"file {p.name}" for d in (self.guest.workdir, self.scratch) for p in d.glob(TMP_PREFIX + "*")])

    def reset(self) -> None:
        for name in self._bitmaps():
            self.guest.qmp("block-dirty-bitmap-remove", node=self._node(), name=name)


class LibvirtPeer(Peer):
    """The sample guest as a libvirt domain, its workload writing records."""

    def __init__(self, domain: Domain, scratch: Path) -> None:
        self.domain = domain
        self.scratch = scratch  # the process's temporary folder, where captures make their workspace
        self.spec = domain.spec

    def change(self) -> None:
        self.domain.wait_records(self.domain.console.wrote_max() + 3)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        self.domain.dom.suspend()
        try:
            yield
        finally:
            self.domain.dom.resume()

    def disk(self, dest: Path) -> None:
        qcow2_as_raw(self.domain.disk, dest)

    def break_tracking(self) -> None:
        self.reset()

    def tracking(self) -> list[str]:
        return sorted(c.getName() for c in self.domain.dom.listAllCheckpoints())

    def leftovers(self) -> list[str]:
        import libvirt

        job = self.domain.dom.jobInfo()[0]
        return ([f"job of type {job}"] if job != libvirt.VIR_DOMAIN_JOB_NONE else []) + sorted(
            f"file {p.name}" for p in self.scratch.iterdir())

    def reset(self) -> None:
        for c in self.domain.dom.listAllCheckpoints():
            c.delete(0)


class VspherePeer(Peer):
    """A VM on govmomi's vCenter simulator (``tests/vcsim.py``, with its changed-block tracking),
    its flat disk uploaded by the vmware target. The simulator's VMs run nothing, so the peer writes
    the disk's datastore file itself, as ESXi would: while a snapshot exists, writes go to a delta
    (kept here) and reach the disk file when the snapshot is removed, so the file the snapshot
    names stays frozen."""

    def __init__(self, vcsim: Any, root: Path) -> None:
        from lifeboat.targets.base import Disk, MemoryLog, NetworkSpec, TargetContext
        from lifeboat.targets.base import Guest as TargetGuest
        from lifeboat.targets.vmware import VmwareTarget, run_folder_name

        self.vcsim = vcsim
        rng = random.Random(15)
        image = root / "seed.raw"
        with open(image, "wb") as f:
            f.write(rng.randbytes(4 * MiB))
            f.seek(10 * MiB)  # a hole
            f.write(rng.randbytes(6 * MiB))
        self.target = VmwareTarget(vcsim.settings(), TargetContext())
        self.guest = TargetGuest("src", "20260101T000000-5a5a5a", root, NetworkSpec("none"))
        self.log = MemoryLog("vmware")
        self.target.provision(self.guest, Disk(16 * MiB, image_path=image, image_format="raw"), self.log)
        image.unlink()
        token = self.guest.token
        self.spec = f"vsphere://{vcsim.host}/DC0/vm/{run_folder_name(self.guest.run_id)}/{token}?disk=0"
        content = vcsim.connect().RetrieveContent()
        store = Path(next(ds.info.url for dc in content.rootFolder.childEntity for ds in dc.datastore))
        self.flat = store / token / f"{token}-flat.vmdk"
        self.pending: list[tuple[int, bytes]] = []
        self.rng = random.Random(16)

    def _vm(self) -> Any:
        vm = self.target._vm(self.guest)
        assert vm is not None
        return vm

    def _flush(self) -> None:
        """Writes held in the delta reach the disk file once no snapshot remains."""
        if self.pending and not self._snapshots():
            with open(self.flat, "r+b") as f:
                for at, data in self.pending:
                    f.seek(at)
                    f.write(data)
            self.pending = []

    def _snapshots(self) -> list[str]:
        from lifeboat.agent.vsphere import snapshot_tree

        stack = snapshot_tree(self.target.session(), self._vm())
        names = []
        while stack:
            node = stack.pop()
            names.append(node.name)
            stack.extend(node.childSnapshotList or [])
        return names

    def change(self) -> None:
        self._flush()
        writes = [(self.rng.randrange(0, 16 * MiB // 4096) * 4096, self.rng.randbytes(64 * 1024)) for _ in range(3)]
        self.pending += writes
        self._flush()

    def disk(self, dest: Path) -> None:
        self._flush()
        shutil.copyfile(self.flat, dest)
        with open(dest, "r+b") as f:  # the VM's view: the disk file with the delta over it
            for at, data in self.pending:
                f.seek(at)
                f.write(data)

    def break_tracking(self) -> None:
        """Changed-block tracking turned off on the VM (vSphere then drops its change IDs)."""
        from pyVmomi import vim

        vm = self._vm()
        self.target.session().wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=False)), "cbt off")

    def tracking(self) -> list[str]:
        return ["changeTrackingEnabled"] if self._vm().config.changeTrackingEnabled else []

    def leftovers(self) -> list[str]:
        return self._snapshots()

    def reset(self) -> None:
        self.break_tracking()

    def close(self) -> None:
        self.target.teardown(self.log)


KINDS = ["file", "image", "lvm", "qmp", "libvirt", "vsphere"]


@pytest.fixture(scope="module", params=KINDS)
def peer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """One peer per source kind for the whole module (a guest boots once)."""
    root = tmp_path_factory.mktemp(request.param)
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "file":
            yield FilePeer(root)
        elif request.param == "image":
            yield ImagePeer(root)
        elif request.param == "lvm":
            for dev, state in fake_lvm(root, mp):
                yield LvmPeer(dev, state)
        elif request.param == "qmp":
            g = Guest(make_disk(request.getfixturevalue("sample_guest_image"), root), root)
            scratch = root / "tmp"
            scratch.mkdir()
            mp.setattr(tempfile, "tempdir", str(scratch))
            g.start()
            try:
                yield QmpPeer(g, scratch)
            finally:
                g.kill()
        elif request.param == "vsphere":
            vcsim = request.getfixturevalue("vcsim")
            mp.setenv("LIFEBOAT_VSPHERE_USER", vcsim.user)
            mp.setenv("LIFEBOAT_VSPHERE_PASSWORD_FILE", str(vcsim.password_file))
            mp.setenv("LIFEBOAT_VSPHERE_CA_FILE", str(vcsim.ca_file))
            vpeer = VspherePeer(vcsim, root)
            try:
                yield vpeer
            finally:
                vpeer.close()
        else:
            request.getfixturevalue("libvirtd")
            d = Domain(request.getfixturevalue("sample_guest_image"))
            scratch = d.dir / "tmp"
            scratch.mkdir()
            scratch.chmod(0o755)  # the domain's QEMU (its own user) reaches its socket through it
            mp.setattr(tempfile, "tempdir", str(scratch))
            try:
                yield LibvirtPeer(d, scratch)
            finally:
                d.close()


@pytest.fixture
def src_peer(peer: Peer) -> Iterator[Peer]:
    """The module's peer, its tracking state forgotten after each test."""
    yield peer
    peer.reset()


def quiet_capture(arc: Archive, peer: Peer, real: Path) -> tuple[PointInfo, BackupPlan, Guarantees]:
    """A capture with writes held off, and the real disk at that moment into ``real``."""
    with peer.quiet():
        with open_source(peer.spec) as src:
            info, plan = capture(arc, MACHINE, src)
            stated = guarantees(src)
        peer.disk(real)
    return info, plan, stated


def assert_reads_back(arc: Archive, info: PointInfo, real: Path) -> None:
    """The point restores to exactly the bytes of ``real``."""
    out = real.with_name(f"restored-{info.point}.img")
    restore(arc.reader(info), out)
    assert out.stat().st_size == real.stat().st_size, (out.stat().st_size, real.stat().st_size)
    assert filecmp.cmp(out, real, shallow=False), f"point {info.point} differs from the disk"
    out.unlink()


def assert_clean(peer: Peer, stated: Guarantees) -> None:
    """Only the tracking state for the next capture remains, and nothing else."""
    assert len(peer.tracking()) == (1 if stated.tracks_changes else 0), peer.tracking()
    assert peer.leftovers() == []


def test_full_backup_reads_back_byte_for_byte(arc: Archive, src_peer: Peer, tmp_path: Path) -> None:
    info, plan, stated = quiet_capture(arc, src_peer, tmp_path / "real.raw")
    assert plan.mode == MODE_FULL and plan.fallback_reason is None and plan.base is None
    assert_reads_back(arc, info, tmp_path / "real.raw")
    assert_clean(src_peer, stated)


def test_change_then_incremental(arc: Archive, src_peer: Peer, tmp_path: Path) -> None:
    first, _, _ = quiet_capture(arc, src_peer, tmp_path / "real1.raw")
    src_peer.change()
    info, plan, stated = quiet_capture(arc, src_peer, tmp_path / "real2.raw")
    assert not filecmp.cmp(tmp_path / "real1.raw", tmp_path / "real2.raw", shallow=False), "the change changed nothing"
    if stated.tracks_changes:
        assert plan.mode in INCREMENTAL and plan.fallback_reason is None, plan
        assert plan.base is not None and plan.base.point == first.point and info.parent == first.point
        assert plan.changed and 0 < info.bytes_read <= CHANGED_AT_MOST, info.bytes_read
    else:  # read again and hashed
        assert plan.mode == MODE_HASH_SCAN and plan.changed is None and plan.fallback_reason is None
    assert_reads_back(arc, info, tmp_path / "real2.raw")
    assert_clean(src_peer, stated)


def test_interrupted_tracking_falls_back_to_full(arc: Archive, src_peer: Peer, tmp_path: Path) -> None:
    quiet_capture(arc, src_peer, tmp_path / "real1.raw")
    src_peer.change()
    with open_source(src_peer.spec) as src:
        stated = guarantees(src)
    if not stated.tracks_changes:  # nothing to interrupt: every capture reads the whole disk
        info, plan, _ = quiet_capture(arc, src_peer, tmp_path / "real2.raw")
        assert plan.changed is None and plan.mode == MODE_HASH_SCAN
        assert_reads_back(arc, info, tmp_path / "real2.raw")
        return
    src_peer.break_tracking()
    info, plan, _ = quiet_capture(arc, src_peer, tmp_path / "real2.raw")
    assert plan.mode == MODE_FULL and plan.fallback_reason and "missing" in plan.fallback_reason, plan
    assert plan.base is None and info.bytes_read == info.size
    assert_reads_back(arc, info, tmp_path / "real2.raw")
    assert_clean(src_peer, stated)
    src_peer.change()
    after, plan, _ = quiet_capture(arc, src_peer, tmp_path / "real3.raw")  # the chain is whole again
    assert plan.mode in INCREMENTAL and plan.base and plan.base.point == info.point
    assert_reads_back(arc, after, tmp_path / "real3.raw")


def test_point_is_the_disk_at_one_instant(arc: Archive, src_peer: Peer, tmp_path: Path) -> None:
    """A crash-consistent source's point is the disk when the capture froze it, whatever is written
    while it reads; other sources promise nothing then (take the machine's writes off)."""
    frozen, later = tmp_path / "frozen.raw", tmp_path / "later.raw"
    with open_source(src_peer.spec) as src:
        stated = guarantees(src)
        if not stated.crash_consistent:
            return
        with src_peer.quiet():
            plan = plan_backup(arc, MACHINE, src)
            src_peer.disk(frozen)
        src_peer.change()  # written after the freeze, before and while the capture reads
        info = run_plan(arc, MACHINE, src, plan)
    with src_peer.quiet():
        src_peer.disk(later)
    assert not filecmp.cmp(frozen, later, shallow=False), "the disk did not change during the capture"
    assert_reads_back(arc, info, frozen)
    assert_clean(src_peer, stated)


def test_failed_capture_leaves_nothing_behind(arc: Archive, src_peer: Peer, tmp_path: Path) -> None:
    first, _, stated = quiet_capture(arc, src_peer, tmp_path / "real1.raw")
    src_peer.change()
    with src_peer.quiet(), open_source(src_peer.spec) as src:
        calls = 0

        def fail(*_: Any) -> bytes:
            nonlocal calls
            calls += 1
            raise CaptureError("injected read failure")

        for attr in ("read", "read_view"):
            if hasattr(src, attr):
                setattr(src, attr, fail)
        with pytest.raises(CaptureError, match="injected"):
            capture(arc, MACHINE, src)
    assert calls > 0
    assert [p.point for p in arc.points(MACHINE)] == [first.point]  # no point from the failed capture
    assert_clean(src_peer, stated)
    info, plan, _ = quiet_capture(arc, src_peer, tmp_path / "real2.raw")
    if stated.tracks_changes:  # the failed try kept the chain: the next capture reads only the change
        assert plan.mode in INCREMENTAL and plan.base and plan.base.point == first.point
    assert_reads_back(arc, info, tmp_path / "real2.raw")
