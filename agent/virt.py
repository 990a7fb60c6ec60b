"""A disk of a libvirt domain, captured through libvirt checkpoints and pull-mode backups.

SOURCE ``libvirt:///DOMAIN?disk=vda[&uri=qemu:///system][&scratch=DIR]``.

libvirt does what ``agent/qmp.py`` does by hand, behind its own API: ``backupBegin`` with a
``<domaincheckpoint>`` creates the checkpoint (a persistent bitmap in the qcow2 image) in the same
QEMU transaction that freezes the point-in-time view, and exports that view over NBD on a unix
socket; with ``<incremental>CHECKPOINT</incremental>`` it also exports the bitmap of the changes
since that checkpoint (context ``qemu:dirty-bitmap:backup-<disk>``). ``abortJob`` ends the pull
backup. Deleting a checkpoint merges its bitmap into its neighbour, so the chain stays whole.

The checkpoint a point was taken at is named in the point's ``source`` (``...&checkpoint=NAME``).
A missing checkpoint, a bitmap libvirt refuses (broken after a crash), or a resized disk makes the
capture a full read-and-hash, and the plan says why. The disk must be qcow2 (libvirt's rule).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlencode, urlsplit
from xml.sax.saxutils import quoteattr

from lifeboat.agent.nbd import FrozenView, NbdConnection, NbdError, merge_extents
from lifeboat.agent.plan import MODE_CHECKPOINT, MODE_FULL, BackupPlan, CaptureError, Guarantees
from lifeboat.agent.qmp import bitmap_prefix, point_param
from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.errors import SourceError
from lifeboat.archive.points import now_utc
from lifeboat.plumbing.errors import UsageError
from lifeboat.plumbing.nbd import STATE_DIRTY

SCHEME = "libvirt"
DEFAULT_URI = "qemu:///system"


def parse_spec(spec: str) -> tuple[str, str, str, str | None]:
    """(domain, disk, connection uri, scratch dir) of a ``libvirt:///DOMAIN?disk=vda`` spec."""
    parts = urlsplit(spec)
    domain = parts.path.lstrip("/")
    params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme != SCHEME or not domain or "/" in domain:
        raise UsageError(f"source {spec!r}: expected libvirt:///DOMAIN?disk=vda[&uri=qemu:///system]")
    if not params.get("disk"):
        raise UsageError(f"source {spec!r}: add ?disk=TARGET (e.g. vda)")
    return domain, params["disk"], params.get("uri", DEFAULT_URI), params.get("scratch")


class LibvirtSource:
    """One disk of a running libvirt domain; ``prepare`` starts a pull backup, ``read`` reads it."""

    guarantees: ClassVar[Guarantees] = Guarantees(crash_consistent=True, tracks_changes=True)

    def __init__(self, spec: str) -> None:
        import libvirt

        self.libvirt = libvirt
        self.spec = spec
        self.domain_name, self.disk, self.uri, scratch = parse_spec(spec)
        try:
            self.conn = libvirt.open(self.uri)
            self.dom = self.conn.lookupByName(self.domain_name)
        except libvirt.libvirtError as e:
            # no such domain: the SOURCE is wrong (exit 2); libvirt unreachable: the operation failed
            error = SourceError if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN else CaptureError
            raise error(f"source {spec}: {e.get_error_message()}") from None
        self._scratch_given = Path(scratch) if scratch else None
        self.size = self._capacity()
        self.name = f"{SCHEME}:///{self.domain_name}?{urlencode({'disk': self.disk, 'uri': self.uri})}"
        self._view: FrozenView | None = None
        self._workdir: Path | None = None
        self._new: str | None = None
        self._prefix: str | None = None
        self._running = False

    def _capacity(self) -> int:
        try:
            return int(self.dom.blockInfo(self.disk)[0])
        except self.libvirt.libvirtError as e:
            raise SourceError(f"source {self.spec}: {e.get_error_message()}") from None

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self.libvirt.libvirtError as e:
            raise CaptureError(f"libvirt domain {self.domain_name}: {what} failed: {e.get_error_message()}") from None

    def _checkpoints(self) -> set[str]:
        return {c.getName() for c in self._call("listing checkpoints", self.dom.listAllCheckpoints)}

    def _workspace(self) -> Path:
        """A folder for the NBD socket and scratch file that the domain's QEMU (its own user) can use."""
        if self._scratch_given:
            return self._scratch_given
        work = Path(tempfile.mkdtemp(prefix="lifeboat-libvirt-"))
        m = re.search(r"<seclabel[^>]*model='dac'[^>]*>\s*<label>\+?(\d+):\+?(\d+)</label>", self.dom.XMLDesc(0))
        if m and os.geteuid() == 0:
            os.chown(work, int(m.group(1)), int(m.group(2)))
        return work

    def _backup_xml(self, work: Path, incremental: str | None) -> str:
        inc = f"<incremental>{incremental}</incremental>" if incremental else ""
        sock = quoteattr(str(work / "nbd.sock"))
        scratch = quoteattr(str(work / "scratch.qcow2"))
        return (f"<domainbackup mode='pull'>{inc}<server transport='unix' socket={sock}/><disks>"
                f"<disk name={quoteattr(self.disk)} backup='yes' type='file'><scratch file={scratch}/></disk>"
                f"{self._other_disks('backup')}</disks></domainbackup>")

    def _checkpoint_xml(self, name: str) -> str:
        return (f"<domaincheckpoint><name>{name}</name><disks><disk name={quoteattr(self.disk)} "
                f"checkpoint='bitmap'/>{self._other_disks('checkpoint')}</disks></domaincheckpoint>")

    def _other_disks(self, attr: str) -> str:
        targets = re.findall(r"<target dev='([^']+)'", self.dom.XMLDesc(0))
        return "".join(f"<disk name={quoteattr(t)} {attr}='no'/>" for t in targets if t != self.disk)

    def prepare(self, arc: Archive, machine: str) -> BackupPlan:
        """Start a pull backup (incremental since the base checkpoint when the chain holds)."""
        size = self._capacity()
        self.size = size
        self._prefix = bitmap_prefix(arc, machine)
        checkpoints = self._checkpoints()
        base: PointInfo | None = None
        reason: str | None = None
        points = arc.points(machine)
        named = [(p, point_param(p, SCHEME, "checkpoint")) for p in reversed(points)]
        named_ok = [(p, c) for p, c in named if c]
        for p, c in named_ok:
            if c in checkpoints:
                if p.size != size:
                    reason = f"the disk was resized from {p.size} to {size} bytes since point {p.point}"
                else:
                    base = p
                break
        else:
            if named_ok:
                p, c = named_ok[0]
                reason = f"checkpoint {c} of point {p.point} is missing (deleted, or the domain was redefined)"
            elif points:
                reason = f"no point of {machine} was taken with a libvirt checkpoint"
        self._new = f"{self._prefix}{secrets.token_hex(6)}"
        self._workdir = self._workspace()
        base_ckpt = point_param(base, SCHEME, "checkpoint") if base else None
        started = now_utc()
        try:
            self.dom.backupBegin(self._backup_xml(self._workdir, base_ckpt), self._checkpoint_xml(self._new), 0)
        except self.libvirt.libvirtError as e:
            if base is None:
                self._remove_workdir()
                raise CaptureError(f"libvirt domain {self.domain_name}: backup failed: {e.get_error_message()}") \
                    from None
            reason = f"libvirt refused the incremental from checkpoint {base_ckpt}: {e.get_error_message()}"
            base, base_ckpt = None, None
            started = now_utc()
            self._call("backupBegin", self.dom.backupBegin, self._backup_xml(self._workdir, None),
                       self._checkpoint_xml(self._new), 0)
        self._running = True
        try:
            desc = self._call("backupGetXMLDesc", self.dom.backupGetXMLDesc, 0)
            disk_re = re.compile(r"<disk name='" + re.escape(self.disk) + r"'[^>]*>")
            m = disk_re.search(desc)
            export = re.search(r"exportname='([^']+)'", m.group(0)) if m else None
            bitmap = re.search(r"exportbitmap='([^']+)'", m.group(0)) if m else None
            if export is None:
                raise CaptureError(f"libvirt domain {self.domain_name}: the backup exports no disk {self.disk}")
            sock = str(self._workdir / "nbd.sock")
            changed: list[tuple[int, int]] | None = None
            if base is not None:
                if bitmap is None:
                    raise CaptureError(f"libvirt domain {self.domain_name}: the incremental exports no bitmap")
                ctx = f"qemu:dirty-bitmap:{bitmap.group(1)}"
                conn = NbdConnection(sock, export.group(1), (ctx,))
                try:
                    changed = merge_extents(conn.block_status(ctx, 0, size), STATE_DIRTY)
                finally:
                    conn.close()
            self._view = FrozenView(sock, export.group(1), arc.backup_reads(size, changed, base))
        except NbdError as e:
            self.abort()
            raise CaptureError(f"libvirt domain {self.domain_name}: cannot read the backup export: {e}") from None
        except BaseException:
            self.abort()
            raise
        query = {"disk": self.disk, "uri": self.uri, "checkpoint": self._new}
        self.name = f"{SCHEME}:///{self.domain_name}?{urlencode(query)}"
        mode = MODE_CHECKPOINT if base is not None else MODE_FULL
        return BackupPlan(mode=mode, changed=changed, base=base, started=started, fallback_reason=reason, size=size)

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Bytes of the frozen view exported by libvirt."""
        if self._view is None:
            raise UsageError(f"source {self.name}: read before prepare()")
        try:
            return self._view.read(offset, length)
        except NbdError as e:
            raise CaptureError(f"libvirt domain {self.domain_name} stopped serving the backup "
                               f"(the domain stopped?): {e}") from None

    def _end_job(self) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None
        if self._running:
            self._running = False
            with contextlib.suppress(self.libvirt.libvirtError):
                self.dom.abortJob()
        self._remove_workdir()

    def _remove_workdir(self) -> None:
        if self._workdir is not None and self._scratch_given is None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None

    def commit(self, info: PointInfo) -> None:
        """The point is durable: end the backup job and delete the older checkpoints of this machine."""
        self._end_job()
        for c in self._call("listing checkpoints", self.dom.listAllCheckpoints):
            name = c.getName()
            if self._prefix and name.startswith(self._prefix) and name != self._new:
                self._call(f"deleting checkpoint {name}", c.delete, 0)

    def abort(self) -> None:
        """The capture failed: end the job and delete the new checkpoint (its bitmap merges back)."""
        self._end_job()
        if self._new:
            with contextlib.suppress(self.libvirt.libvirtError):
                self.dom.checkpointLookupByName(self._new).delete(0)

    def close(self) -> None:
        """End an unfinished job and close the connection."""
        if self._running:
            self.abort()
        with contextlib.suppress(Exception):
            self.conn.close()

    def __enter__(self) -> LibvirtSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
