"""A disk of a vSphere virtual machine, read from a snapshot, with changed-block tracking.

SOURCE ``vsphere://HOST[:PORT]/DATACENTER/vm/[FOLDER/...]NAME?disk=N`` (N: the VM's Nth virtual
disk, from 0). The login comes from the environment, never from the SOURCE: the user from
``LIFEBOAT_VSPHERE_USER`` (or ``&user=``), the password from the file named by
``LIFEBOAT_VSPHERE_PASSWORD_FILE`` or from ``LIFEBOAT_VSPHERE_PASSWORD``; the server's certificate
is verified against ``LIFEBOAT_VSPHERE_CA_FILE`` (or ``&ca_file=``), else the system's trust store.

How a capture runs (``agent/plan.py``'s order):

- ``prepare``: changed-block tracking is turned on if it is off (``ReconfigVM_Task``
  ``changeTrackingEnabled``; noted, and the capture reads everything); a snapshot without memory
  (``CreateSnapshot_Task``) freezes the disk: from then on ESXi writes to a delta file and the
  disk file the snapshot names stays as it was (crash-consistent). Its change ID (the disk's
  backing ``changeId`` in the snapshot) is recorded in the point's source
  (``...&change_id=ID``). With a base point of the same size that has a change ID,
  ``QueryChangedDiskAreas(snapshot, disk, offset, base change ID)`` gives the extents to read;
  a full read asks with change ID ``*`` for the extents holding data, so holes are not read.
- the disk's bytes come over the datastore's HTTP file access with range requests, from the
  flat extent its descriptor names (thick and thin VMFS/NFS disks; a disk that is itself a delta
  or sparse file, e.g. a VM with older snapshots, is refused with a clear message);
- ``commit``/``abort``: the snapshot is removed (ESXi consolidates the delta).

A capture falls back to a full read, saying why, when the base point has no change ID (tracking
was off), the disk was resized, tracking was off on the VM at this capture (turned off since the
base point: its change IDs are gone), or the server refuses the base change ID (tracking reset) or
does not offer ``QueryChangedDiskAreas`` at all. Snapshots a killed capture left (named
``lifeboat-...`` for this archive and machine) are removed by the next one.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from lifeboat.agent.plan import MODE_CBT, MODE_FULL, BackupPlan, CaptureError, Guarantees
from lifeboat.agent.qmp import bitmap_prefix, point_param
from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.errors import SourceError
from lifeboat.archive.points import now_utc
from lifeboat.plumbing.errors import UsageError
from lifeboat.plumbing.vsphere import DatastoreFile, Session, VsphereError, connect, fault_text, read_password

SCHEME = "vsphere"
EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]+)"', re.MULTILINE)


def parse_spec(spec: str) -> tuple[str, str, str, int, dict[str, str]]:
    """(host, datacenter, VM path, disk index, other query parameters) of a ``vsphere://`` spec."""
    parts = urlsplit(spec)
    dc, sep, vm_path = parts.path.lstrip("/").partition("/vm/")
    params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme != SCHEME or not parts.netloc or not dc or not sep or not vm_path.strip("/"):
        raise UsageError(f"source {spec!r}: expected vsphere://HOST/DATACENTER/vm/NAME?disk=N")
    disk = params.pop("disk", "")
    if not disk.isdigit():
        raise UsageError(f"source {spec!r}: add ?disk=N (the VM's Nth virtual disk, from 0)")
    params.pop("change_id", None)  # a point's record, not an input
    unknown = set(params) - {"user", "ca_file"}
    if unknown:
        raise UsageError(f"source {spec!r}: unknown parameter {sorted(unknown)[0]!r} (user, ca_file)")
    return parts.netloc, dc, vm_path.strip("/"), int(disk), params


def flat_extent(descriptor: str, where: str) -> str:
    """The one flat extent file a disk descriptor names (its bytes are the disk's bytes)."""
    if "parentFileNameHint" in descriptor and 'parentCID=ffffffff' not in descriptor:
        raise CaptureError(f"{where} is a delta disk (the VM has other snapshots): consolidate or remove them first")
    extents = EXTENT.findall(descriptor)
    if len(extents) != 1 or extents[0][2] not in ("VMFS", "FLAT"):
        kinds = ", ".join(e[2] for e in extents) or "none"
        raise CaptureError(f"{where}: only flat (VMFS/FLAT) disks are read over datastore HTTP (extents: {kinds})")
    return extents[0][3]


class VsphereSource:
    """One disk of a vSphere VM; ``prepare`` snapshots it, ``read`` reads the frozen disk file."""

    guarantees: ClassVar[Guarantees] = Guarantees(crash_consistent=True, tracks_changes=True)

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.host, self.dc_name, self.vm_path, self.disk_index, params = parse_spec(spec)
        user = params.get("user") or os.environ.get("LIFEBOAT_VSPHERE_USER")
        if not user:
            raise UsageError(f"source {spec}: set LIFEBOAT_VSPHERE_USER (or add &user=NAME)")
        password_file = os.environ.get("LIFEBOAT_VSPHERE_PASSWORD_FILE")
        if not password_file and not os.environ.get("LIFEBOAT_VSPHERE_PASSWORD"):
            raise UsageError(f"source {spec}: set LIFEBOAT_VSPHERE_PASSWORD_FILE (or LIFEBOAT_VSPHERE_PASSWORD)")
        password = read_password(password_file, None if password_file else "LIFEBOAT_VSPHERE_PASSWORD")
        ca = params.get("ca_file") or os.environ.get("LIFEBOAT_VSPHERE_CA_FILE")
        self.session: Session = connect(self.host, user, password, ca_file=ca)
        try:
            self.dc = self.session.datacenter(self.dc_name)
            self.vm = self.session.vm_by_path(self.dc, self.vm_path)
        except VsphereError as e:
            self.session.close()
            raise SourceError(f"source {spec}: {e}") from None
        disk = self._disk(self.vm.config.hardware.device)
        self.key: int = disk.key
        self.size: int = int(disk.capacityInBytes or disk.capacityInKB * 1024)
        self.name = self._name(None)
        self._snapshot: Any = None
        self._file: DatastoreFile | None = None
        self._extents: list[tuple[int, int]] | None = None

    def _name(self, change_id: str | None) -> str:
        query = {"disk": str(self.disk_index), **({"change_id": change_id} if change_id else {})}
        return f"{SCHEME}://{self.host}/{quote(self.dc_name)}/vm/{quote(self.vm_path)}?{urlencode(query)}"

    def _disk(self, devices: Any) -> Any:
        from pyVmomi import vim

        disks = sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)), key=lambda d: d.key)
        if self.disk_index >= len(disks):
            raise SourceError(f"source {self.spec}: the VM has {len(disks)} disk(s), no disk {self.disk_index}")
        return disks[self.disk_index]

    def _wait(self, task: Any, what: str) -> Any:
        try:
            return self.session.wait(task, f"{what} of VM {self.vm_path!r}")
        except VsphereError as e:
            raise CaptureError(str(e)) from None

    def prepare(self, arc: Archive, machine: str) -> BackupPlan:
        """Snapshot the VM; the extents changed since the base point's change ID, or everything."""
        from pyVmomi import vim

        prefix = bitmap_prefix(arc, machine)
        self._remove_stale(prefix)
        notes: list[str] = []
        tracking_was_on = bool(self.vm.config.changeTrackingEnabled)
        if not tracking_was_on:
            spec = vim.vm.ConfigSpec(changeTrackingEnabled=True)
            self._wait(self.vm.ReconfigVM_Task(spec=spec), "turning on changed-block tracking")
            notes.append(f"changed-block tracking turned on for VM {self.vm_path}: the next capture can be incremental")
        base, reason, base_id = self._base(arc, machine, tracking_was_on)
        started = now_utc()
        name = f"{prefix}{secrets.token_hex(4)}"
        self._snapshot = self._wait(
            self.vm.CreateSnapshot_Task(name=name, description="lifeboat capture", memory=False, quiesce=False),
            "creating a snapshot",
        )
        try:
            disk = self._disk(self._snapshot.config.hardware.device)
            change_id = getattr(disk.backing, "changeId", None) or None
            if change_id is None:
                notes.append("the snapshot's disk has no change ID: the next capture reads everything")
            self._open(disk.backing.fileName)
            changed: list[tuple[int, int]] | None = None
            if base is not None and base_id is not None and change_id is not None:
                try:
                    changed = self._changed(base_id)
                except vmodl_fault() as e:
                    reason = self._refusal(e, base, base_id)
                    base = None
            elif base is not None:
                reason = "the snapshot's disk has no change ID (changed-block tracking is not working on the VM)"
                base = None
            if changed is None and change_id is not None:
                with contextlib.suppress(*vmodl_fault()):
                    self._extents = self._changed("*")
        except BaseException:
            self.abort()
            raise
        self.name = self._name(change_id)
        mode = MODE_CBT if changed is not None else MODE_FULL
        return BackupPlan(
            mode=mode, changed=changed, base=base if changed is not None else None, started=started,
            fallback_reason=reason, notes=notes, size=self.size,
        )

    def _base(
        self, arc: Archive, machine: str, tracking_was_on: bool
    ) -> tuple[PointInfo | None, str | None, str | None]:
        """The base point and its change ID, or why there is none."""
        points = arc.points(machine)
        if not points:
            return None, None, None
        newest = points[-1]
        change_id = point_param(newest, SCHEME, "change_id")
        if change_id is None:
            return None, f"point {newest.point} was taken without a vSphere change ID", None
        if not tracking_was_on:
            return None, (
                f"changed-block tracking was turned off on VM {self.vm_path} since point {newest.point}: "
                f"its change ID {change_id} is missing"
            ), None
        if newest.size != self.size:
            resized = f"the disk was resized from {newest.size} to {self.size} bytes since point {newest.point}"
            return None, resized, None
        return newest, None, change_id

    def _refusal(self, e: Exception, base: PointInfo, base_id: str) -> str:
        kind = type(e).__name__.rsplit(".", 1)[-1]
        if kind == "MethodNotFound":
            return f"the server {self.host} does not offer QueryChangedDiskAreas (changed-block tracking)"
        return (
            f"vSphere refused change ID {base_id} of point {base.point} (tracking was reset, so it is missing): "
            f"{fault_text(e)}"
        )

    def _changed(self, change_id: str) -> list[tuple[int, int]]:
        """The extents ``QueryChangedDiskAreas`` gives since ``change_id``, merged."""
        out: list[tuple[int, int]] = []
        offset = 0
        while offset < self.size:
            info = self.vm.QueryChangedDiskAreas(
                snapshot=self._snapshot, deviceKey=self.key, startOffset=offset, changeId=change_id
            )
            for area in info.changedArea or []:
                start, length = int(area.start), min(int(area.length), self.size - int(area.start))
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + length)
                elif length > 0:
                    out.append((start, length))
            end = int(info.startOffset) + int(info.length)
            if end <= offset:
                raise CaptureError(f"VM {self.vm_path!r}: QueryChangedDiskAreas did not advance past offset {offset}")
            offset = end
        return out

    def _open(self, file_name: str) -> None:
        """Ranged reads of the flat extent of the datastore disk ``[DS] PATH.vmdk``."""
        m = re.match(r"^\[([^\]]+)\] (.+)$", file_name)
        if m is None:
            raise CaptureError(f"VM {self.vm_path!r}: disk file {file_name!r} is not a datastore path")
        ds, path = m.group(1), m.group(2)
        head = self.session.ranged(self.dc.name, ds, path)
        try:
            text = head.read(0, 64 * 1024).decode("utf-8", "replace")
        except VsphereError as e:
            raise CaptureError(str(e)) from None
        finally:
            head.close()
        if not text.startswith("# Disk DescriptorFile"):
            raise CaptureError(f"{file_name}: not a disk descriptor (only flat VMDK disks are read)")
        extent = flat_extent(text, file_name)
        folder = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
        self._file = self.session.ranged(self.dc.name, ds, folder + extent)

    def data_extents(self) -> list[tuple[int, int]]:
        """The extents holding data (CBT with change ID ``*``), so a full read skips holes; the
        whole disk when the server cannot say."""
        return self._extents if self._extents is not None else [(0, self.size)]

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the frozen disk file."""
        if self._file is None:
            raise UsageError(f"source {self.name}: read before prepare()")
        try:
            data = self._file.read(offset, length)
        except VsphereError as e:
            raise CaptureError(str(e)) from None
        if len(data) < length and offset + length <= self.size:
            data += bytes(length - len(data))  # a flat file shorter than the capacity reads as zeros
        return data

    def _remove_stale(self, prefix: str) -> None:
        """Snapshots that a killed capture of this machine left."""
        stack = list(snapshot_tree(self.session, self.vm))
        while stack:
            node = stack.pop()
            stack.extend(node.childSnapshotList or [])
            if node.name.startswith(prefix):
                stale = node.snapshot.RemoveSnapshot_Task(removeChildren=False)
                self._wait(stale, f"removing stale snapshot {node.name}")

    def _end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._snapshot is not None:
            snap, self._snapshot = self._snapshot, None
            self._wait(snap.RemoveSnapshot_Task(removeChildren=False), "removing the capture's snapshot")

    def commit(self, info: PointInfo) -> None:
        """The point is durable: remove the snapshot (its change ID stays valid for the next capture)."""
        self._end()

    def abort(self) -> None:
        """The capture failed: remove the snapshot."""
        with contextlib.suppress(CaptureError):
            self._end()

    def close(self) -> None:
        """Remove a snapshot still there and log out."""
        self.abort()
        self.session.close()

    def __enter__(self) -> VsphereSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def snapshot_tree(session: Session, vm: Any) -> list[Any]:
    """The roots of the VM's snapshot tree (none: an empty list)."""
    info = session.properties(vm, ["snapshot"]).get("snapshot")
    return list(info.rootSnapshotList) if info is not None else []


def vmodl_fault() -> tuple[type[Exception], ...]:
    """The faults a server answers a method with (``QueryChangedDiskAreas``: MethodNotFound,
    InvalidArgument, FileFault, ...)."""
    from pyVmomi import vim, vmodl

    return (vmodl.MethodFault, vim.fault.VimFault)
