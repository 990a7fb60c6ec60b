"""The aws target beyond the driver suite, against moto's server on loopback (``moto_endpoint``,
AWS's 512 KiB EBS block size) and, for moto's own 512-byte blocks, moto in process.

- ``lifeboat stage``: a full snapshot of the non-zero blocks, then a child (``ParentSnapshotId``)
  of only the blocks changed since the staged point; each read back (the child combined with its
  parent, as AWS documents it) equals its point byte for byte; staging again sends nothing.
- a failover runbook run by the engine starts from the staged chain (staging the last delta), a
  teardown terminates and deregisters what the run made and never deletes the staged chain.
- ``teardown --force`` with the state directory of a failover lost finds what that run made by
  tag (instance, AMI, the run's own snapshot) and removes it, keeps what an open run of the local
  state owns and the staged chain; a second one removes nothing.
- errors: no credentials, a wrong region, ``InstanceLimitExceeded``: exit 1 with a message naming
  the machine and AWS's error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest

from lifeboat.archive import Archive
from lifeboat.orchestrator import api
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.orchestrator.runbook import load
from lifeboat.targets import aws as aws_driver
from lifeboat.targets.aws import AwsTarget
from lifeboat.targets.base import TargetContext, TargetError
from lifeboat.targets.ebs import GIB, T_STAGED, read_snapshot, tag_dict, write_snapshot
from tests.archive.s3servers import CREDENTIALS

MIB = 1 << 20
BS = 512 * 1024  # the block size moto_endpoint answers


@pytest.fixture
def aws(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The environment pointed at moto (as an operator's would be at AWS), no shared files."""
    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    yield moto_endpoint


def cli(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*LIFEBOAT, *argv], capture_output=True, text=True, timeout=300)
    assert not check or done.returncode == 0, done.stderr
    return done


def disk(path: Path, blocks: dict[int, bytes], size: int = 8 * MIB) -> Path:
    """A disk image of ``size`` bytes, zero except the given 512 KiB blocks."""
    with path.open("wb") as f:
        f.truncate(size)
        for i, data in blocks.items():
            f.seek(i * BS)
            f.write(data)
    return path


def runbook(path: Path, machine: str, settings: dict[str, Any], kind: str = "failover") -> Path:
    path.write_text(
        f"version: 1\nname: {path.stem}\nkind: {kind}\n"
        f"target: {{driver: aws, settings: {json.dumps(settings)}}}\n"
        f"network: {{mode: none}}\nmachines:\n  - name: {machine}\n"
        f"teardown: {'never' if kind == 'failover' else 'always'}\n"
    )
    return path


def read_back(snapshot_id: str, size: int) -> bytes:
    """Every block of a snapshot (its chain combined), as ``size`` bytes; nothing past them."""
    out = bytearray(size)
    extra: list[int] = []

    def write(offset: int, data: bytes) -> None:
        keep = max(0, min(len(data), size - offset))
        out[offset:offset + keep] = data[:keep]
        if data[keep:].strip(b"\0"):
            extra.append(offset)

    volume, bs = read_snapshot(ec2_client("ebs"), ec2_client("ec2"), snapshot_id, write)
    assert volume == GIB and bs == BS and not extra
    return bytes(out)


def ec2_client(service: str) -> Any:
    return boto3.client(service, region_name="us-east-1")


def point_bytes(arc: Archive, selector: str) -> bytes:
    info = arc.resolve(selector)
    return arc.reader(info).read(0, info.size)


def test_stage_full_then_child_of_changed_blocks(aws: str, tmp_path: Path) -> None:
    arc_path = str(tmp_path / "arc")
    cli("archive", "init", "--chunk-size", "65536", "--archive", arc_path)
    blocks = {i: os.urandom(BS) for i in (0, 1, 2, 4, 9)}
    img = disk(tmp_path / "m.img", blocks)
    cli("backup", "stagem", str(img), "--archive", arc_path)
    rb = runbook(tmp_path / "stage.yaml", "stagem", {"region": "us-east-1"})

    first = json.loads(cli("stage", str(rb), "--json", "--archive", arc_path).stdout)["machines"][0]
    assert first["error"] is None and first["parent"] is None
    assert first["blocks"] == 5 and first["block_size"] == BS, "a full copy sends only the non-zero blocks"

    # about 1 %: a few bytes in block 2, block 4 zeroed (the child must hide the parent's data),
    # block 12 written for the first time
    with img.open("r+b") as f:
        f.seek(2 * BS + 1000)
        f.write(b"changed")
        f.seek(4 * BS)
        f.write(bytes(BS))
        f.seek(12 * BS + 7)
        f.write(b"new data")
    cli("backup", "stagem", str(img), "--archive", arc_path)
    second = json.loads(cli("stage", str(rb), "--json", "--archive", arc_path).stdout)["machines"][0]
    assert second["parent"] == first["snapshot_id"] and second["blocks"] == 3

    arc = Archive.open(arc_path)
    points = arc.points("stagem")
    assert read_back(first["snapshot_id"], 8 * MIB) == point_bytes(arc, f"stagem@{points[0].point}")
    second_bytes = point_bytes(arc, f"stagem@{points[1].point}")
    assert read_back(second["snapshot_id"], 8 * MIB) == second_bytes == img.read_bytes()

    again = json.loads(cli("stage", str(rb), "--json", "--archive", arc_path).stdout)["machines"][0]
    assert again["already_staged"] and again["snapshot_id"] == second["snapshot_id"] and again["blocks"] == 0
    text = cli("stage", str(rb), "--archive", arc_path).stdout
    assert "already staged" in text

    # a failover from another host finds the chain by its tags and stages the last delta; its
    # teardown removes what the run made, never the staged chain
    with img.open("r+b") as f:
        f.seek(5 * BS)
        f.write(b"last change before the disaster")
    cli("backup", "stagem", str(img), "--archive", arc_path)
    state = api.open_state(tmp_path / "state")
    lines: list[str] = []
    outcome = api.run(load(rb), state, archive=arc_path, stop=threading.Event(), log=lines.append)
    assert outcome.run.status == "succeeded", "\n".join(lines)
    ec2 = ec2_client("ec2")
    staged = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": "tag:lifeboat:machine", "Values": ["stagem"]}, {"Name": "tag:lifeboat:staged", "Values": ["1"]}
    ])["Snapshots"]
    assert len(staged) == 3
    newest = max(staged, key=lambda s: tag_dict(s["Tags"])["lifeboat:point-time"])
    assert tag_dict(newest["Tags"])["lifeboat:parent"] == second["snapshot_id"]
    assert read_back(newest["SnapshotId"], 8 * MIB) == img.read_bytes()
    running = [i for r in ec2.describe_instances(Filters=[
        {"Name": "tag:lifeboat:run", "Values": [outcome.run.id]}])["Reservations"] for i in r["Instances"]]
    assert [i["State"]["Name"] for i in running] == ["running"]

    torn = api.teardown(load(rb), state, archive=arc_path, log=lines.append)
    assert torn.resources_removed >= 3
    after = [i for r in ec2.describe_instances(InstanceIds=[running[0]["InstanceId"]])["Reservations"]
             for i in r["Instances"]]
    assert [i["State"]["Name"] for i in after] == ["terminated"]
    assert not ec2.describe_images(Owners=["self"], Filters=[{"Name": "tag:lifeboat:run",
                                                              "Values": [outcome.run.id]}])["Images"]
    kept = ec2.describe_snapshots(SnapshotIds=[s["SnapshotId"] for s in staged])["Snapshots"]
    assert len(kept) == 3 and all(T_STAGED in tag_dict(s["Tags"]) for s in kept)
    api.teardown(load(rb), state, archive=arc_path, log=lines.append)  # idempotent


def test_ebs_direct_api_on_moto_own_block_size() -> None:
    """moto in process answers 512-byte blocks: the writer and reader use what the API answers."""
    from moto import mock_aws

    size = 64 * 1024
    data = bytearray(size)
    data[0:700] = os.urandom(700)
    data[5000:5100] = os.urandom(100)
    with mock_aws():
        ebs, ec2 = boto3.client("ebs", region_name="eu-west-1"), boto3.client("ec2", region_name="eu-west-1")
        full = write_snapshot(ebs, ec2, size=size, read=lambda o, n: bytes(data[o:o + n]), tags={"t": "1"},
                              description="full")
        assert full.block_size == 512 and full.blocks == 3  # blocks 0, 1 and 9
        data[1024:1030] = b"zzzzzz"
        child = write_snapshot(ebs, ec2, size=size, read=lambda o, n: bytes(data[o:o + n]),
                               blocks=lambda bs: [1024 // bs, 5000 // bs], skip=lambda o, d: o == 5000 // 512 * 512,
                               parent=full.snapshot_id,
                               tags={"lifeboat:parent": full.snapshot_id}, description="child")
        assert child.blocks == 1
        out = bytearray(size)

        def write(offset: int, block: bytes) -> None:
            out[offset:offset + len(block)] = block

        read_snapshot(ebs, ec2, child.snapshot_id, write)
        assert out[:size] == data


def machine_error(rb: Path, arc: str, tmp_path: Path) -> str:
    """The error a failover of ``rb`` stops with, as the CLI prints it (exit status 1)."""
    done = cli("failover", str(rb), "--yes", "--archive", arc, "--state", str(tmp_path / "st"), check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_errors_name_the_machine_and_the_aws_error(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arc = str(tmp_path / "arc")
    cli("archive", "init", "--chunk-size", "65536", "--archive", arc)
    cli("backup", "errm", str(disk(tmp_path / "e.img", {0: os.urandom(BS)}, 2 * MIB)), "--archive", arc)

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    err = machine_error(runbook(tmp_path / "nocreds.yaml", "errm", {"region": "us-east-1"}), arc, tmp_path)
    assert "errm" in err and "no AWS credentials" in err
    staged = cli("stage", str(tmp_path / "nocreds.yaml"), "--archive", arc, check=False)
    assert staged.returncode == 1 and "machine errm" in staged.stderr and "credentials" in staged.stderr
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)

    err = machine_error(runbook(tmp_path / "region.yaml", "errm", {"region": "xx-nowhere-9"}), arc, tmp_path)
    assert "errm" in err and "'xx-nowhere-9' is not an AWS region" in err

    # credentials AWS refuses, and InstanceLimitExceeded, as AWS answers them (moto accepts any
    # credentials and has no quotas): faults on GetCallerIdentity and RunInstances
    target = AwsTarget({"region": "us-east-1", "use_staged": False}, TargetContext())
    real = aws_driver.client
    faults = {
        "sts.GetCallerIdentity": ("InvalidClientTokenId", "The security token included in the request is invalid."),
        "ec2.RunInstances": ("InstanceLimitExceeded", "You have requested more instances (1) than your current "
                             "instance limit of 0 allows"),
    }

    def faulty(sess: Any, service: str) -> Any:
        c = real(sess, service)
        for where, (code, message) in faults.items():

            def fail(code: str = code, message: str = message, op: str = where, **kwargs: Any) -> None:
                raise botocore.exceptions.ClientError({"Error": {"Code": code, "Message": message}}, op)

            c.meta.events.register(f"before-call.{where}", fail)
        return c

    monkeypatch.setattr(aws_driver, "client", faulty)
    from lifeboat.targets.base import Disk, Guest, MemoryLog

    guest = Guest("errm", "20260101T000000-abcdef", tmp_path / "w")
    log = MemoryLog("aws")
    img = disk(tmp_path / "f.img", {1: os.urandom(BS)}, 2 * MIB)
    with pytest.raises(TargetError, match="GetCallerIdentity: AWS error InvalidClientTokenId: The security token"):
        target.prepare()
    target.provision(guest, Disk(size=2 * MIB, image_path=img, image_format="raw"), log)
    own = next(r for r in log.resources() if r.kind == "snapshot").data["snapshot_id"]
    assert read_back(own, 2 * MIB) == img.read_bytes()  # the image's blocks, in a snapshot of the run's own
    with pytest.raises(TargetError, match=r"errm: RunInstances \(t3.micro\): AWS error InstanceLimitExceeded"):
        target.boot(guest, log)
    target.teardown(log)
    assert log.resources() == []


def test_failback_reads_a_snapshot_back_into_a_point(aws: str, tmp_path: Path) -> None:
    """``lifeboat backup MACHINE ebs://REGION/snap-…``: a staged child snapshot (its chain
    combined) becomes a point equal to the one staged, of the point's size, not the volume's."""
    arc = str(tmp_path / "arc")
    cli("archive", "init", "--chunk-size", "65536", "--archive", arc)
    img = disk(tmp_path / "b.img", {0: os.urandom(BS), 3: os.urandom(BS)}, 6 * MIB + 4096)
    cli("backup", "backm", str(img), "--archive", arc)
    rb = runbook(tmp_path / "back.yaml", "backm", {"region": "us-east-1"})
    cli("stage", str(rb), "--archive", arc)
    with img.open("r+b") as f:
        f.seek(BS + 5)
        f.write(b"written in the cloud")
    cli("backup", "backm", str(img), "--archive", arc)
    child = json.loads(cli("stage", str(rb), "--json", "--archive", arc).stdout)["machines"][0]
    assert child["parent"]

    done = json.loads(cli("backup", "home", f"ebs://us-east-1/{child['snapshot_id']}", "--json",
                          "--archive", arc).stdout)
    assert done["size"] == img.stat().st_size
    cli("restore", "home", str(tmp_path / "back.raw"), "--archive", arc)
    assert (tmp_path / "back.raw").read_bytes() == img.read_bytes()
    bad = cli("backup", "home", "ebs://us-east-1/vol-123", "--archive", arc, check=False)
    assert bad.returncode == 2 and "ebs://REGION/snap-ID" in bad.stderr
    gone = cli("backup", "home", "ebs://us-east-1/snap-0123456789abcdef0", "--archive", arc, check=False)
    assert gone.returncode == 1 and "snap-0123456789abcdef0" in gone.stderr and "Traceback" not in gone.stderr


def test_scheduler_stages_on_the_runbooks_stage_schedule(aws: str, tmp_path: Path) -> None:
    """``stage: {schedule:}`` of a failover runbook: ``lifeboat scheduler`` runs ``lifeboat
    stage`` on it (catching up once), and writes a systemd timer for it."""
    from lifeboat.orchestrator.state import SqliteState

    arc = str(tmp_path / "arc")
    cli("archive", "init", "--chunk-size", "65536", "--archive", arc)
    cli("backup", "schedm", str(disk(tmp_path / "s.img", {2: os.urandom(BS)}, 2 * MIB)), "--archive", arc)
    books = tmp_path / "runbooks"
    books.mkdir()
    rb = runbook(books / "sched.yaml", "schedm", {"region": "us-east-1"})
    rb.write_text(rb.read_text() + "stage: {schedule: '*/30 * * * *'}\n")
    state = tmp_path / "state"
    common = ["--archive", arc, "--state", str(state)]
    first = cli("scheduler", str(books), "--once", *common)
    assert "sched-stage: schedule '*/30 * * * *' starts now" in first.stderr
    SqliteState(state).set_last_fire(f"{rb.resolve()}#stage", "sched", time.time() - 3 * 3600)
    second = cli("scheduler", str(books), "--once", *common)
    assert "starting the stage scheduled for" in second.stderr and "finished with exit status 0" in second.stderr
    staged = ec2_client("ec2").describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": "tag:lifeboat:machine", "Values": ["schedm"]}, {"Name": "tag:lifeboat:staged", "Values": ["1"]}
    ])["Snapshots"]
    assert len(staged) == 1
    assert SqliteState(state).runs() == []  # staging is not a run

    cli("scheduler", str(books), "--systemd-units", str(tmp_path / "units"), *common)
    service = (tmp_path / "units" / "lifeboat-sched-stage.service").read_text()
    assert f"-m lifeboat stage {rb.resolve()} --archive {arc}\n" in service
    assert "OnCalendar=*-*-* *:00,30:00 UTC" in (tmp_path / "units" / "lifeboat-sched-stage.timer").read_text()


def test_protect_stages_after_each_point(aws: str, tmp_path: Path) -> None:
    """``lifeboat protect MACHINE SOURCE --stage RUNBOOK``: each new point is staged (the first a
    full snapshot, the next a child of it); the chain reads back as the disk."""
    arc = str(tmp_path / "arc")
    cli("archive", "init", "--chunk-size", "65536", "--archive", arc)
    img = disk(tmp_path / "p.img", {0: os.urandom(BS), 5: os.urandom(BS)}, 4 * MIB)
    rb = runbook(tmp_path / "protect.yaml", "protm", {"region": "us-east-1"})
    done = cli("protect", "protm", str(img), "--rpo", "0.1", "--max-captures", "2", "--stage", str(rb),
               "--no-index", "--archive", arc)
    assert done.stderr.count("protect protm: staged") == 2, done.stderr
    staged = ec2_client("ec2").describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": "tag:lifeboat:machine", "Values": ["protm"]}, {"Name": "tag:lifeboat:staged", "Values": ["1"]}
    ])["Snapshots"]
    first, second = sorted(staged, key=lambda s: tag_dict(s["Tags"])["lifeboat:point-time"])
    assert tag_dict(second["Tags"])["lifeboat:parent"] == first["SnapshotId"]
    assert read_back(second["SnapshotId"], 4 * MIB) == img.read_bytes()
    other = cli("protect", "other", str(img), "--rpo", "1", "--stage", str(rb), "--archive", arc, check=False)
    assert other.returncode == 2 and "no machine of the runbook recovers other" in other.stderr


def test_two_machines_in_priority_groups_in_one_run(aws: str, tmp_path: Path) -> None:
    """A drill of two machines (the second's group after the first's) on one driver instance:
    both instances run with their own mapping, and the drill's teardown leaves none running."""
    arc = str(tmp_path / "arc")
    cli("archive", "init", "--chunk-size", "65536", "--archive", arc)
    for name in ("db", "app"):
        cli("backup", name, str(disk(tmp_path / f"{name}.img", {1: os.urandom(BS)}, 2 * MIB)), "--archive", arc)
    rb = tmp_path / "drill.yaml"
    rb.write_text(
        "version: 1\nname: drill\nkind: rehearsal\ntarget: {driver: aws, settings: {region: us-east-1}}\n"
        "network: {mode: none}\ngroups:\n  - {name: data, priority: 1}\n  - {name: apps, priority: 2}\n"
        "machines:\n  - {name: db, group: data, target: {settings: {instance_type: t3.large}}}\n"
        "  - {name: app, group: apps}\nteardown: on-success\n"
    )
    state = api.open_state(tmp_path / "state")
    lines: list[str] = []
    outcome = api.run(load(rb), state, archive=arc, stop=threading.Event(), log=lines.append)
    assert outcome.run.status == "succeeded", "\n".join(lines)
    ec2 = ec2_client("ec2")
    made = {tag_dict(i["Tags"])["lifeboat:machine"]: i for r in ec2.describe_instances(Filters=[
        {"Name": "tag:lifeboat:run", "Values": [outcome.run.id]}])["Reservations"] for i in r["Instances"]}
    assert made["db"]["InstanceType"] == "t3.large" and made["app"]["InstanceType"] == "t3.micro"
    assert {i["State"]["Name"] for i in made.values()} == {"terminated"}
    healthy = {m["name"]: m for m in outcome.report["machines"]}
    assert healthy["db"]["status"] == healthy["app"]["status"] == "succeeded"


def test_forced_teardown_sweeps_a_run_whose_state_is_lost(aws: str, tmp_path: Path) -> None:
    arc = str(tmp_path / "arc")
    cli("archive", "init", "--chunk-size", "65536", "--archive", arc)
    cli("backup", "sweepm", str(disk(tmp_path / "m.img", {0: os.urandom(BS), 3: os.urandom(BS)}, 2 * MIB)),
        "--archive", arc)
    rb = runbook(tmp_path / "sweep.yaml", "sweepm", {"region": "us-east-1", "use_staged": False})
    staged = json.loads(cli("stage", str(rb), "--json", "--archive", arc).stdout)["machines"][0]["snapshot_id"]
    ec2 = ec2_client("ec2")

    def made(run_id: str) -> dict[str, set[str]]:
        by_run = [{"Name": "tag:lifeboat:run", "Values": [run_id]}]
        return {
            "instance": {i["InstanceId"] for r in ec2.describe_instances(Filters=by_run)["Reservations"]
                         for i in r["Instances"] if i["State"]["Name"] != "terminated"},
            "image": {i["ImageId"] for i in ec2.describe_images(Owners=["self"], Filters=by_run)["Images"]},
            "snapshot": {s["SnapshotId"]
                         for s in ec2.describe_snapshots(OwnerIds=["self"], Filters=by_run)["Snapshots"]},
        }

    runs = []
    for state_dir in ("lost", "here"):  # the first run's state is lost; the second's is open here
        lines: list[str] = []
        outcome = api.run(load(rb), api.open_state(tmp_path / state_dir), archive=arc, stop=threading.Event(),
                          log=lines.append)
        assert outcome.run.status == "succeeded", "\n".join(lines)
        runs.append((outcome.run.id, made(outcome.run.id)))
    (lost, lost_made), (here, here_made) = runs
    assert all(len(ids) == 1 for ids in lost_made.values()) and staged not in lost_made["snapshot"]
    shutil.rmtree(tmp_path / "lost")

    done = json.loads(cli("teardown", str(rb), "--yes", "--force", "--json", "--state", str(tmp_path / "here")).stdout)
    assert done["kept_runs"] == [here] and done["not_swept"] == []
    assert {(r["kind"], r["id"]) for r in done["removed"]} == {(k, i) for k, ids in lost_made.items() for i in ids}
    assert made(lost) == {"instance": set(), "image": set(), "snapshot": set()}
    assert made(here) == here_made, "an open run of the local state is not swept"
    assert ec2.describe_snapshots(SnapshotIds=[staged])["Snapshots"], "the staged chain is kept"
    again = cli("teardown", str(rb), "--yes", "--force", "--state", str(tmp_path / "here"))
    assert "removed 0 resources" in again.stdout + again.stderr
