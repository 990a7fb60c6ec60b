"""The ``aws`` target: a machine brought back as an EC2 instance from an EBS snapshot of its point.

Provision writes the point's disk into an EBS snapshot with the EBS direct APIs
(``targets/ebs.py``) and registers an AMI on it; boot runs the instance with the runbook's mapping
(instance type, subnet, security groups, private IP, key pair, instance profile, tags) and waits
until it runs. Where a staged chain exists for the machine (``lifeboat stage``: a full snapshot,
then child snapshots holding only the blocks changed since the previous staged point), provision
stages the last delta instead of copying the whole disk. Without the archive (a driver used on an
image file alone) it copies the image's non-zero blocks into a snapshot of the run's own.

Everything a run creates is tagged ``lifeboat:run`` and ``lifeboat:guest`` (the guest's token) and
the AMI is named by the token, so teardown finds it by tag or name even when the resource log
holds no AWS id (a crash between the call and the log update); teardown never deletes a staged
snapshot. It is also tagged ``lifeboat:runbook``, so ``teardown --force`` (``sweep``) finds what a
crashed run left when the state store that recorded it is lost. Credentials, endpoint
(``AWS_ENDPOINT_URL``) and, unless the runbook names one, the region come from the usual AWS places,
never from a runbook.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import botocore.exceptions

from lifeboat.targets.base import (
    Disk,
    Guest,
    InvalidSettings,
    Resource,
    ResourceLog,
    StagesAhead,
    Sweeps,
    TakesImage,
    TargetContext,
    TargetError,
    TargetUnavailable,
)
from lifeboat.targets.ebs import (
    T_ARCHIVE,
    T_GUEST,
    T_MACHINE,
    T_PARENT,
    T_POINT,
    T_RUN,
    T_RUNBOOK,
    T_SIZE,
    T_SNAPSHOT,
    T_STAGED,
    T_TIME,
    AwsError,
    calling,
    client,
    filters,
    session,
    tag_dict,
    tag_list,
    write_snapshot,
)

if TYPE_CHECKING:
    from lifeboat.archive import Archive, PointInfo

GONE = ("shutting-down", "terminated")
NOT_FOUND = (
    "InvalidInstanceID.NotFound", "InvalidAMIID.NotFound", "InvalidSnapshot.NotFound", "InvalidAMIID.Unavailable"
)


def boot_mode_of(first_sectors: bytes) -> str:
    """``uefi`` for a GPT disk (``EFI PART`` at LBA 1), else ``legacy-bios`` (MBR)."""
    return "uefi" if first_sectors[512:520] == b"EFI PART" else "legacy-bios"


def changed_blocks(old: Any, new: Any, size: int, chunk_size: int, block_size: int) -> list[int]:
    """The EBS block indexes covering the archive slots whose content differs between two chunk
    tables of points of the same size (a slot is unchanged when its chunk id and patches are)."""
    out: set[int] = set()
    for slot, (a, b) in enumerate(zip(old.ids, new.ids, strict=True)):
        if a != b or old.patches.get(slot) != new.patches.get(slot):
            start, end = slot * chunk_size, min(size, (slot + 1) * chunk_size)
            out.update(range(start // block_size, -(-end // block_size)))
    return sorted(out)


def staged_snapshots(ec2: Any, machine: str, archive_id: str) -> list[dict[str, Any]]:
    """The completed staged snapshots of ``machine`` from this archive, oldest point first. One
    that failed (an interrupted stage: EBS errors a snapshot not completed in time) is deleted;
    one still pending (a stage running now, or interrupted within the hour) is left alone."""
    with calling(f"{machine}: DescribeSnapshots"):
        snaps = ec2.describe_snapshots(
            OwnerIds=["self"],
            Filters=filters({T_STAGED: "1", T_MACHINE: machine, T_ARCHIVE: archive_id}),
        )["Snapshots"]
    for s in snaps:
        if s["State"] == "error":
            with calling(f"{machine}: DeleteSnapshot {s['SnapshotId']}"), _absent_ok():
                ec2.delete_snapshot(SnapshotId=s["SnapshotId"])
    done = [s for s in snaps if s["State"] == "completed"]
    return sorted(done, key=lambda s: (tag_dict(s.get("Tags"))[T_TIME], s["StartTime"]))


def stage_point(ebs: Any, ec2: Any, arc: Archive, info: PointInfo, *, full: bool = False) -> dict[str, Any]:
    """Bring the staged chain of ``info.machine`` up to ``info``: nothing if its newest staged
    snapshot holds that point, else a child snapshot of the blocks changed since the staged point
    (a full snapshot of the non-zero blocks when there is none, ``full``, or the staged point is
    gone from the archive or of another size). Returns what was done."""
    archive_id = str(arc.config["id"])
    staged = [] if full else staged_snapshots(ec2, info.machine, archive_id)
    newest = staged[-1] if staged else None
    if newest is not None and tag_dict(newest.get("Tags"))[T_POINT] == info.point:
        return {"machine": info.machine, "point": info.point, "snapshot_id": newest["SnapshotId"],
                "parent": tag_dict(newest.get("Tags")).get(T_PARENT), "blocks": 0, "bytes_sent": 0,
                "already_staged": True}
    base = None
    if newest is not None:
        base_point = tag_dict(newest.get("Tags"))[T_POINT]
        base = next((p for p in arc.points(info.machine) if p.point == base_point), None)
        if base is not None and (base.size != info.size or base.chunk_size != info.chunk_size):
            base = None
    reader = arc.reader(info)
    tags = {T_STAGED: "1", T_MACHINE: info.machine, T_POINT: info.point, T_TIME: info.time, T_ARCHIVE: archive_id,
            T_SIZE: str(info.size)}
    if base is None or newest is None:
        written = write_snapshot(ebs, ec2, size=info.size, read=reader.read, tags=tags,
                                 description=f"lifeboat staged {info.machine}@{info.point}")
    else:
        tags[T_PARENT] = str(newest["SnapshotId"])
        old = arc.reader(base)

        def blocks(bs: int) -> list[int]:
            return changed_blocks(old.table, reader.table, info.size, info.chunk_size, bs)

        def same(offset: int, data: bytes) -> bool:  # a changed chunk's blocks that did not change
            return old.read(offset, len(data)) == data

        written = write_snapshot(ebs, ec2, size=info.size, read=reader.read, blocks=blocks, skip=same,
                                 parent=tags[T_PARENT], tags=tags,
                                 description=f"lifeboat staged {info.machine}@{info.point}")
    return {"machine": info.machine, "point": info.point, "snapshot_id": written.snapshot_id,
            "parent": tags.get(T_PARENT),
            "blocks": written.blocks, "bytes_sent": written.bytes_sent, "block_size": written.block_size,
            "already_staged": False}


class AwsTarget(TakesImage, StagesAhead, Sweeps):
    """EC2 instances from EBS snapshots written with the EBS direct APIs (see the module docstring)."""

    name = "aws"

    def __init__(self, settings: dict[str, Any], context: TargetContext) -> None:
        super().__init__(settings, context)
        if self.settings.get("private_ip") and not self.settings.get("subnet_id"):
            raise InvalidSettings("aws settings: private_ip needs subnet_id (the subnet the address is in)")
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()  # the engine runs machines in parallel; boto3 sessions are not thread-safe

    def image_formats(self) -> list[str]:
        """A raw image: its blocks go to EBS as they are."""
        return ["raw"]

    def supports_network(self, mode: str) -> bool:
        """Any mode: the network is the settings' subnet and security groups (an isolated drill
        names an isolated subnet)."""
        return mode in ("none", "isolated", "mapped")

    # -- clients --------------------------------------------------------------------------------
    def _clients(self, region: str | None = None) -> tuple[str, Any, Any]:
        """``(region, ec2, ebs)`` clients of the settings' (or the given) region."""
        key = region or self.settings.get("region") or ""
        with self._lock:
            if key not in self._sessions:
                sess = session(key or None)
                self._sessions[key] = (sess.region_name, client(sess, "ec2"), client(sess, "ebs"))
            found: tuple[str, Any, Any] = self._sessions[key]
        return found

    # -- lifecycle ------------------------------------------------------------------------------
    def prepare(self) -> None:
        """The region is an AWS region, and credentials exist and are accepted (creates nothing)."""
        sess = session(self.settings.get("region"))
        if sess.get_credentials() is None:
            raise TargetUnavailable("aws: no AWS credentials found (environment, shared credentials file, profile)")
        with calling(f"aws ({sess.region_name}): GetCallerIdentity"):
            client(sess, "sts").get_caller_identity()

    def starts_from_stage(self) -> bool:
        """``use_staged``: provision brings the staged chain up to the point (no image needed)."""
        return bool(self.settings["use_staged"])

    def stage(self, machine: str, point: str, log: ResourceLog) -> dict[str, Any]:
        """Bring the staged chain of ``machine`` up to ``point`` (see ``stage_point``)."""
        if self.context.archive is None:
            raise TargetError(f"{machine}: staging needs the archive")
        arc = self.context.archive()
        info = arc.resolve(f"{machine}@{point}")
        _, ec2, ebs = self._clients()
        try:
            return stage_point(ebs, ec2, arc, info)
        except AwsError as e:
            raise AwsError(f"{machine}: {e}") from e

    def provision(self, guest: Guest, disk: Disk, log: ResourceLog) -> None:
        """The root snapshot (the staged chain brought up to the point, or a copy of the image of
        the run's own), then an AMI on it."""
        region, ec2, ebs = self._clients()
        try:
            snapshot = self._root_snapshot(guest, disk, log, region, ec2, ebs)
            image = self._image(guest, disk, log, region, ec2, snapshot)
        except AwsError as e:
            raise AwsError(f"{guest.name}: {e}") from e
        self.context.log(f"{guest.name}: AMI {image} on snapshot {snapshot} in {region}")

    def _root_snapshot(self, guest: Guest, disk: Disk, log: ResourceLog, region: str, ec2: Any, ebs: Any) -> str:
        if self.starts_from_stage():
            if self.context.archive is None or not disk.point:
                raise TargetError(f"{guest.name}: starting from the staged chain needs the archive")
            arc = self.context.archive()
            done = stage_point(ebs, ec2, arc, arc.resolve(disk.point))
            self.context.log(f"{guest.name}: staged {done['blocks']} blocks onto {done['snapshot_id']}")
            return str(done["snapshot_id"])
        res = log.record("snapshot", guest.token, {"region": region, "run": guest.run_id})
        sid = res.data.get("snapshot_id")
        if sid and any(x["SnapshotId"] == sid and x["State"] == "completed" for x in self._run_snapshots(ec2, res)):
            return str(sid)
        if disk.image_path is None:
            raise TargetError(f"{guest.name}: the aws target needs the point's image or the archive")
        self._delete_snapshots(ec2, res)  # an interrupted copy: start again
        fd = os.open(disk.image_path, os.O_RDONLY)
        try:
            written = write_snapshot(
                ebs, ec2, size=disk.size, read=lambda offset, length: os.pread(fd, length, offset),
                tags={T_RUN: guest.run_id, T_GUEST: guest.token, T_MACHINE: guest.name, T_SIZE: str(disk.size),
                      T_RUNBOOK: guest.runbook},
                description=f"lifeboat run {guest.run_id} {guest.name}",
            )
        finally:
            os.close(fd)
        log.update(res, {"snapshot_id": written.snapshot_id})
        return written.snapshot_id

    def _image(self, guest: Guest, disk: Disk, log: ResourceLog, region: str, ec2: Any, snapshot: str) -> str:
        res = log.record("image", guest.token, {"region": region, "run": guest.run_id})
        tags = {T_RUN: guest.run_id, T_GUEST: guest.token, T_MACHINE: guest.name, T_SNAPSHOT: snapshot,
                T_RUNBOOK: guest.runbook}
        found = self._find_images(ec2, res)
        if found:
            image_id = str(found[0]["ImageId"])
        else:
            mode = self.settings["boot_mode"]
            if mode == "detect":
                mode = boot_mode_of(self._first_sectors(disk))
            root = self.settings["root_device"]
            with calling(f"RegisterImage {guest.token}"):
                image_id = ec2.register_image(
                    Name=guest.token,
                    Description=f"lifeboat run {guest.run_id} {guest.name}",
                    Architecture=self.settings["architecture"],
                    RootDeviceName=root,
                    VirtualizationType="hvm",
                    EnaSupport=True,
                    BootMode=mode,
                    BlockDeviceMappings=[{"DeviceName": root, "Ebs": {
                        "SnapshotId": snapshot, "DeleteOnTermination": True,
                        "VolumeType": self.settings["volume_type"]}}],
                    TagSpecifications=[{"ResourceType": "image", "Tags": tag_list(tags)}],  # sweep finds it
                )["ImageId"]
        log.update(res, {"image_id": image_id, "snapshot_id": snapshot})
        with calling(f"CreateTags {image_id}"):
            ec2.create_tags(Resources=[image_id], Tags=tag_list(tags))
        return image_id

    def _first_sectors(self, disk: Disk) -> bytes:
        if disk.image_path is not None:
            with Path(disk.image_path).open("rb") as f:
                return f.read(1024)
        if self.context.archive is not None and disk.point:
            arc = self.context.archive()
            return arc.reader(arc.resolve(disk.point)).read(0, min(1024, disk.size))
        return b""

    def boot(self, guest: Guest, log: ResourceLog) -> None:
        """Run the instance (adopt one of this guest's already there), wait until it runs."""
        region, ec2, _ = self._clients()
        image = next((r for r in log.resources() if r.kind == "image"), None)
        if image is None or not image.data.get("image_id"):
            raise TargetError(f"{guest.name}: boot before provision")
        res = log.record("instance", guest.token, {"region": region, "run": guest.run_id})
        live = self._find_instances(ec2, res)
        if live:
            instance_id = str(live[0]["InstanceId"])
        else:
            s = self.settings
            tags = {**s["tags"], "Name": guest.token, T_RUN: guest.run_id, T_GUEST: guest.token, T_MACHINE: guest.name,
                    T_RUNBOOK: guest.runbook}
            args: dict[str, Any] = {
                "ImageId": image.data["image_id"],
                "InstanceType": s["instance_type"],
                "MinCount": 1,
                "MaxCount": 1,
                "ClientToken": guest.token[-64:],
                "TagSpecifications": [{"ResourceType": t, "Tags": tag_list(tags)} for t in ("instance", "volume")],
            }
            if s.get("subnet_id"):
                args["SubnetId"] = s["subnet_id"]
            if s.get("security_group_ids"):
                args["SecurityGroupIds"] = s["security_group_ids"]
            if s.get("private_ip"):
                args["PrivateIpAddress"] = s["private_ip"]
            if s.get("key_name"):
                args["KeyName"] = s["key_name"]
            if s.get("instance_profile"):
                p = s["instance_profile"]
                args["IamInstanceProfile"] = {"Arn": p} if p.startswith("arn:") else {"Name": p}
            try:
                with calling(f"RunInstances ({s['instance_type']})"):
                    instance_id = ec2.run_instances(**args)["Instances"][0]["InstanceId"]
            except AwsError as e:
                raise AwsError(f"{guest.name}: {e}") from e
        log.update(res, {"instance_id": instance_id})
        deadline = time.monotonic() + self.settings["wait_timeout"]
        while (state := self._state(ec2, instance_id)) != "running":
            if state in GONE or state == "stopped" or time.monotonic() > deadline:
                raise TargetError(f"{guest.name}: instance {instance_id} is {state}, not running")
            time.sleep(2)

    def _instance(self, ec2: Any, instance_id: str) -> dict[str, Any]:
        with calling(f"DescribeInstances {instance_id}"):
            found: dict[str, Any] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        return found

    def _state(self, ec2: Any, instance_id: str) -> str:
        return str(self._instance(ec2, instance_id)["State"]["Name"])

    def _instance_id(self, guest: Guest, log: ResourceLog) -> str | None:
        res = next((r for r in log.resources() if r.kind == "instance"), None)
        return str(res.data["instance_id"]) if res and res.data.get("instance_id") else None

    def is_running(self, guest: Guest, log: ResourceLog) -> bool:
        """The instance's state is ``running``."""
        iid = self._instance_id(guest, log)
        return iid is not None and self._state(self._clients()[1], iid) == "running"

    def poll(self, guest: Guest, log: ResourceLog) -> None:
        """The instance runs and EC2's status checks have not found it impaired."""
        iid = self._instance_id(guest, log)
        if iid is None:
            raise TargetError(f"{guest.name}: no instance")
        ec2 = self._clients()[1]
        state = self._state(ec2, iid)
        if state != "running":
            raise TargetError(f"{guest.name}: instance {iid} is {state}")
        with calling(f"{guest.name}: DescribeInstanceStatus {iid}"):
            statuses = ec2.describe_instance_status(InstanceIds=[iid])["InstanceStatuses"]
        for st in statuses:
            for check in ("InstanceStatus", "SystemStatus"):
                if st.get(check, {}).get("Status") == "impaired":
                    raise TargetError(f"{guest.name}: instance {iid}: EC2 {check} is impaired")

    def guest_endpoint(self, guest: Guest, log: ResourceLog, port: int) -> tuple[str, int] | None:
        """The instance's private (or, by setting, public) address."""
        iid = self._instance_id(guest, log)
        if iid is None:
            return None
        inst = self._instance(self._clients()[1], iid)
        addr = inst.get("PublicIpAddress" if self.settings["address"] == "public" else "PrivateIpAddress")
        return (str(addr), port) if addr else None

    # -- teardown -------------------------------------------------------------------------------
    def destroy(self, resource: Resource) -> None:
        """Terminate an instance (and wait until it is), deregister an AMI, delete a snapshot of
        the run's own (never a staged one); each found by id, tag or name. Gone is success."""
        if resource.kind not in ("instance", "image", "snapshot"):
            super().destroy(resource)
            return
        _, ec2, _ = self._clients(resource.data.get("region"))
        if resource.kind == "instance":
            ids = [i["InstanceId"] for i in self._find_instances(ec2, resource)]
            if ids:
                with calling(f"TerminateInstances {ids}"):
                    ec2.terminate_instances(InstanceIds=ids)
                deadline = time.monotonic() + self.settings["wait_timeout"]
                while any(self._state(ec2, i) != "terminated" for i in ids):
                    if time.monotonic() > deadline:
                        raise TargetError(f"instances {ids} did not terminate")
                    time.sleep(2)
        elif resource.kind == "image":
            for img in self._find_images(ec2, resource):
                with calling(f"DeregisterImage {img['ImageId']}"), _absent_ok():
                    ec2.deregister_image(ImageId=img["ImageId"])
        else:
            self._delete_snapshots(ec2, resource)

    def sweep(self, runbook: str, keep_run_ids: set[str], log: Callable[[str], None]) -> list[dict[str, str]]:
        """Terminate the instances, deregister the AMIs and delete the run's own snapshots tagged
        with ``runbook`` of runs not in ``keep_run_ids`` (instances first: an AMI in use stays
        registered otherwise); a staged snapshot is never touched."""
        _, ec2, _ = self._clients()
        mine = filters({T_RUNBOOK: runbook})
        removed: list[dict[str, str]] = []

        def gone(kind: str, ident: str, run: str) -> None:
            removed.append({"kind": kind, "id": ident, "run": run})
            log(f"{runbook}: removed {kind} {ident} of run {run}")

        with calling("DescribeInstances"):
            pages = ec2.describe_instances(Filters=mine)
        instances = {i["InstanceId"]: tag_dict(i.get("Tags")).get(T_RUN, "") for r in pages["Reservations"]
                     for i in r["Instances"] if i["State"]["Name"] not in GONE}
        instances = {iid: run for iid, run in instances.items() if run not in keep_run_ids}
        if instances:
            with calling(f"TerminateInstances {sorted(instances)}"), _absent_ok():
                ec2.terminate_instances(InstanceIds=sorted(instances))
            deadline = time.monotonic() + self.settings["wait_timeout"]
            while any(self._state(ec2, i) != "terminated" for i in instances):
                if time.monotonic() > deadline:
                    raise TargetError(f"instances {sorted(instances)} did not terminate")
                time.sleep(2)
            for iid, run in sorted(instances.items()):
                gone("instance", iid, run)
        with calling("DescribeImages"):
            images = ec2.describe_images(Owners=["self"], Filters=mine)["Images"]
        for img in images:
            run = tag_dict(img.get("Tags")).get(T_RUN, "")
            if img.get("State") != "deregistered" and run not in keep_run_ids:
                with calling(f"DeregisterImage {img['ImageId']}"), _absent_ok():
                    ec2.deregister_image(ImageId=img["ImageId"])
                gone("image", img["ImageId"], run)
        with calling("DescribeSnapshots"):
            snaps = ec2.describe_snapshots(OwnerIds=["self"], Filters=mine)["Snapshots"]
        for snap in snaps:
            tags = tag_dict(snap.get("Tags"))
            if T_STAGED not in tags and tags.get(T_RUN, "") not in keep_run_ids:
                with calling(f"DeleteSnapshot {snap['SnapshotId']}"), _absent_ok():
                    ec2.delete_snapshot(SnapshotId=snap["SnapshotId"])
                gone("snapshot", snap["SnapshotId"], tags.get(T_RUN, ""))
        return removed

    def _find_instances(self, ec2: Any, res: Resource) -> list[dict[str, Any]]:
        with calling("DescribeInstances"):
            pages = ec2.describe_instances(Filters=filters({T_RUN: res.data["run"], T_GUEST: res.ident}))
        found = [i for r in pages["Reservations"] for i in r["Instances"] if i["State"]["Name"] not in GONE]
        return sorted(found, key=lambda i: i["InstanceId"] != res.data.get("instance_id"))

    def _find_images(self, ec2: Any, res: Resource) -> list[dict[str, Any]]:
        with calling("DescribeImages"):
            images: list[dict[str, Any]] = ec2.describe_images(
                Owners=["self"], Filters=[{"Name": "name", "Values": [res.ident]}]
            )["Images"]
        return [i for i in images if i.get("State") != "deregistered"]

    def _run_snapshots(self, ec2: Any, res: Resource) -> list[dict[str, Any]]:
        """The snapshots of the run's own for this guest (a staged one never counts)."""
        with calling("DescribeSnapshots"):
            snaps = ec2.describe_snapshots(
                OwnerIds=["self"], Filters=filters({T_RUN: res.data["run"], T_GUEST: res.ident})
            )
        return [s for s in snaps["Snapshots"] if T_STAGED not in tag_dict(s.get("Tags"))]

    def _delete_snapshots(self, ec2: Any, res: Resource) -> None:
        for s in self._run_snapshots(ec2, res):
            with calling(f"DeleteSnapshot {s['SnapshotId']}"), _absent_ok():
                ec2.delete_snapshot(SnapshotId=s["SnapshotId"])


@contextmanager
def _absent_ok() -> Iterator[None]:
    """Swallow the "not found" errors of a delete: already gone is success."""
    try:
        yield
    except botocore.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") not in NOT_FOUND:
            raise

