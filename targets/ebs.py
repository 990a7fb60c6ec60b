"""EBS snapshots written and read block by block with the EBS direct APIs (boto3's ``ebs`` client).

``write_snapshot`` is what ``lifeboat stage`` and the aws target's provision use: ``StartSnapshot``
(with ``ParentSnapshotId`` for a child), one ``PutSnapshotBlock`` per block with its SHA-256, then
``CompleteSnapshot`` with the aggregated (LINEAR) checksum. The block size is the one
``StartSnapshot`` answers (512 KiB on AWS). ``snapshot_blocks``/``read_snapshot`` read a snapshot
back (failback through ``EbsSource``, and the tests that compare it with the point byte for
byte): a child's blocks are combined with its ancestors' as AWS documents it (a block written in
the child hides the parent's), walking the ``lifeboat:parent`` tags; on AWS the child's own list
already has every block, so the walk only adds blocks that are there anyway.

Errors of the AWS APIs become ``AwsError`` (exit 1) naming the operation and AWS's error code.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from lifeboat.plumbing.errors import UsageError
from lifeboat.targets.base import TargetError, TargetUnavailable

GIB = 1 << 30
PARALLEL = 8  # PutSnapshotBlock/GetSnapshotBlock requests in flight
RETRIES = botocore.config.Config(retries={"mode": "adaptive", "max_attempts": 10}, max_pool_connections=PARALLEL * 2)

# Tags on everything lifeboat creates in AWS (a failover from another host finds them again).
T_MACHINE, T_POINT, T_TIME, T_ARCHIVE = "lifeboat:machine", "lifeboat:point", "lifeboat:point-time", "lifeboat:archive"
T_PARENT, T_STAGED, T_RUN, T_GUEST = "lifeboat:parent", "lifeboat:staged", "lifeboat:run", "lifeboat:guest"
T_SIZE = "lifeboat:size"  # the point's size in bytes (the volume is whole GiB)
T_SNAPSHOT = "lifeboat:snapshot"  # on an AMI: the root snapshot it was registered on
T_RUNBOOK = "lifeboat:runbook"  # on what a run creates: its runbook's name (teardown --force finds it)


class AwsError(TargetError):
    """An AWS API call failed; the message names the operation and AWS's error code."""


def aws_error(what: str, e: Exception) -> TargetError:
    """An ``AwsError`` for exception ``e`` of an AWS call (``what``: the machine and the operation)."""
    if isinstance(e, botocore.exceptions.ClientError):
        err = e.response.get("Error", {})
        return AwsError(f"{what}: AWS error {err.get('Code', '?')}: {err.get('Message') or 'no message'}")
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return TargetUnavailable(f"{what}: no AWS credentials found (environment, shared credentials file, profile)")
    return AwsError(f"{what}: {e}")


@contextmanager
def calling(what: str) -> Iterator[None]:
    """Turn an AWS failure inside the block into an ``AwsError`` naming ``what``."""
    try:
        yield
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
        raise aws_error(what, e) from e


def session(region: str | None) -> boto3.session.Session:
    """A boto3 session on the usual AWS places (environment, shared files, profile; the endpoint
    from ``AWS_ENDPOINT_URL``), in ``region`` or the configured one; a wrong region is refused."""
    s = boto3.session.Session(region_name=region or None)
    if s.region_name is None:
        raise TargetUnavailable("aws: no region: set the target's region or AWS_DEFAULT_REGION")
    known = {r for partition in ("aws", "aws-us-gov", "aws-cn") for r in s.get_available_regions("ec2", partition)}
    if s.region_name not in known:
        raise TargetUnavailable(f"aws: {s.region_name!r} is not an AWS region")
    return s


def client(sess: boto3.session.Session, service: str) -> Any:
    """A client of ``service`` with adaptive retries (throttling is waited out, not an error)."""
    return sess.client(service, config=RETRIES)


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    """``{"k": "v"}`` as AWS's ``[{"Key": "k", "Value": "v"}]``."""
    return [{"Key": k, "Value": str(v)} for k, v in tags.items()]


def tag_dict(tags: list[dict[str, str]] | None) -> dict[str, str]:
    """AWS's tag list as a dict."""
    return {t["Key"]: t["Value"] for t in tags or []}


def filters(tags: dict[str, str]) -> list[dict[str, Any]]:
    """``describe_*`` filters matching every tag of ``tags``."""
    return [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]


@dataclass
class Written:
    """What ``write_snapshot`` did."""

    snapshot_id: str
    block_size: int
    blocks: int  # blocks sent
    bytes_sent: int


def block_checksum(data: bytes) -> bytes:
    """The SHA-256 of one block (sent base64-encoded)."""
    return hashlib.sha256(data).digest()


def aggregate_checksum(digests: list[tuple[int, bytes]]) -> str:
    """AWS's LINEAR aggregation: SHA-256 of the blocks' SHA-256 digests in block-index order."""
    return base64.b64encode(hashlib.sha256(b"".join(d for _, d in sorted(digests))).digest()).decode()


def is_zero(offset: int, data: bytes) -> bool:
    """Whether a block is all zeros (a full copy leaves those out: a new snapshot reads as zeros)."""
    return not data.strip(b"\0")


def write_snapshot(
    ebs: Any,
    ec2: Any,
    *,
    size: int,
    read: Callable[[int, int], bytes],
    blocks: Callable[[int], Iterable[int]] | None = None,
    skip: Callable[[int, bytes], bool] = is_zero,
    parent: str | None = None,
    tags: dict[str, str],
    description: str,
    timeout: float = 3600,
) -> Written:
    """Write one snapshot of a disk of ``size`` bytes read through ``read(offset, length)``.

    ``blocks(block_size)`` names the block indexes to consider (None: every block); a block for
    which ``skip(offset, data)`` holds is not sent: by default a zero block (a full copy), for a
    child of ``parent`` a block the parent already holds (a zero block in a child hides the
    parent's data, so it is sent when the parent's was not zero). Waits until the snapshot is
    completed.
    """
    args: dict[str, Any] = {
        "VolumeSize": max(1, -(-size // GIB)),
        "Tags": tag_list(tags),
        "Description": description[:255],
        # minutes before EBS fails a snapshot not completed (an interrupted stage): time for the
        # whole disk at 10 MiB/s, within what the API allows
        "Timeout": min(4320, max(60, size // (10 << 20) // 60)),
    }
    if parent:
        args["ParentSnapshotId"] = parent
    with calling("StartSnapshot"):
        started = ebs.start_snapshot(**args)
    sid, bs = started["SnapshotId"], int(started["BlockSize"])
    indexes = range(-(-size // bs)) if blocks is None else sorted(set(blocks(bs)))

    def put(i: int) -> tuple[int, bytes] | None:
        off = i * bs
        data = read(off, min(bs, size - off))
        if skip(off, data):
            return None
        if len(data) < bs:
            data = data + bytes(bs - len(data))
        digest = block_checksum(data)
        with calling(f"PutSnapshotBlock {sid} #{i}"):
            ebs.put_snapshot_block(
                SnapshotId=sid,
                BlockIndex=i,
                BlockData=data,
                DataLength=bs,
                Checksum=base64.b64encode(digest).decode(),
                ChecksumAlgorithm="SHA256",
            )
        return i, digest

    with ThreadPoolExecutor(PARALLEL) as pool:
        digests = [d for d in pool.map(put, indexes) if d is not None]
    with calling(f"CompleteSnapshot {sid}"):
        ebs.complete_snapshot(
            SnapshotId=sid,
            ChangedBlocksCount=len(digests),
            Checksum=aggregate_checksum(digests),
            ChecksumAlgorithm="SHA256",
            ChecksumAggregationMethod="LINEAR",
        )
    wait_completed(ec2, sid, timeout)
    return Written(sid, bs, len(digests), len(digests) * bs)


def wait_completed(ec2: Any, snapshot_id: str, timeout: float) -> None:
    """Wait until the snapshot is ``completed``; an ``error`` state or the timeout is an error."""
    deadline = time.monotonic() + timeout
    while True:
        with calling(f"DescribeSnapshots {snapshot_id}"):
            snap = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
        if snap["State"] == "completed":
            return
        if snap["State"] == "error" or time.monotonic() > deadline:
            raise AwsError(f"snapshot {snapshot_id} is {snap['State']} ({snap.get('StateMessage', '')})")
        time.sleep(2)


def describe(ec2: Any, snapshot_id: str) -> dict[str, Any]:
    """One snapshot's description (``InvalidSnapshot.NotFound`` is an ``AwsError``)."""
    with calling(f"DescribeSnapshots {snapshot_id}"):
        snap: dict[str, Any] = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
    return snap


def chain(ec2: Any, snapshot_id: str) -> list[str]:
    """The snapshot and its ancestors (``lifeboat:parent`` tags), newest first."""
    out = [snapshot_id]
    while True:
        parent = tag_dict(describe(ec2, out[-1]).get("Tags")).get(T_PARENT)
        if not parent:
            return out
        out.append(parent)


def snapshot_blocks(ebs: Any, ec2: Any, snapshot_id: str) -> tuple[int, int, dict[int, tuple[str, str]]]:
    """``(volume bytes, block size, {index: (snapshot id, block token)})`` of every block with
    data, the newest snapshot of the chain that holds each block winning."""
    blocks: dict[int, tuple[str, str]] = {}
    volume, bs = 0, 0
    for sid in chain(ec2, snapshot_id):
        token = None
        while True:
            kw: dict[str, Any] = {"SnapshotId": sid, "MaxResults": 10000}
            if token:
                kw["NextToken"] = token
            with calling(f"ListSnapshotBlocks {sid}"):
                page = ebs.list_snapshot_blocks(**kw)
            if not volume:
                volume, bs = int(page["VolumeSize"]) * GIB, int(page["BlockSize"])
            for b in page.get("Blocks", []):
                blocks.setdefault(int(b["BlockIndex"]), (sid, b["BlockToken"]))
            token = page.get("NextToken")
            if not token:
                break
    return volume, bs, blocks


def read_snapshot(ebs: Any, ec2: Any, snapshot_id: str, write: Callable[[int, bytes], None]) -> tuple[int, int]:
    """Read every block of a snapshot (its chain combined) into ``write(offset, data)``, each
    checked against its SHA-256; returns ``(volume bytes, block size)``. Blocks not listed are zero."""
    volume, bs, blocks = snapshot_blocks(ebs, ec2, snapshot_id)

    def get(item: tuple[int, tuple[str, str]]) -> None:
        i, (sid, token) = item
        with calling(f"GetSnapshotBlock {sid} #{i}"):
            got = ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=i, BlockToken=token)
            data = got["BlockData"].read()
        if got.get("Checksum") and base64.b64decode(got["Checksum"]) != block_checksum(data):
            raise AwsError(f"GetSnapshotBlock {sid} #{i}: the block does not match its checksum")
        write(i * bs, data)

    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(get, sorted(blocks.items())))
    return volume, bs


class EbsSource:
    """``ebs://REGION/snap-ID`` as a capture source (failback: ``lifeboat backup MACHINE
    ebs://…``): the snapshot's blocks (its lifeboat chain combined) read with ``GetSnapshotBlock``,
    blocks it does not hold being zeros. Its size is the point size a staged snapshot is tagged
    with, else the volume's. Every listed block is read and hashed; the archive stores only the
    chunks it lacks."""

    def __init__(self, spec: str) -> None:
        rest = spec.removeprefix("ebs://")
        region, _, snapshot_id = rest.partition("/")
        if not region or not snapshot_id.startswith("snap-") or "/" in snapshot_id:
            raise UsageError(f"source {spec!r}: expected ebs://REGION/snap-ID")
        sess = session(region)
        self.ec2, self.ebs = client(sess, "ec2"), client(sess, "ebs")
        self.name = spec
        self.snapshot_id = snapshot_id
        volume, self.block_size, self.blocks = snapshot_blocks(self.ebs, self.ec2, snapshot_id)
        tagged = tag_dict(describe(self.ec2, snapshot_id).get("Tags")).get(T_SIZE)
        self.size = int(tagged) if tagged else volume
        self._cache: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """The byte ranges of the blocks the snapshot holds (the rest is zeros: not read)."""
        bs = self.block_size
        for i in sorted(self.blocks):
            if i * bs < self.size:
                yield i * bs, min(bs, self.size - i * bs)

    def _block(self, i: int) -> bytes:
        with self._lock:
            data = self._cache.get(i)
        if data is not None:
            return data
        if i not in self.blocks:
            return bytes(self.block_size)
        sid, token = self.blocks[i]
        with calling(f"{self.name}: GetSnapshotBlock #{i}"):
            got = self.ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=i, BlockToken=token)
            data = got["BlockData"].read()
        if got.get("Checksum") and base64.b64decode(got["Checksum"]) != block_checksum(data):
            raise AwsError(f"{self.name}: block #{i} does not match its checksum")
        with self._lock:
            if len(self._cache) >= 64:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = data
        return data

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the snapshot."""
        bs = self.block_size
        parts, pos, end = [], offset, min(offset + length, self.size)
        while pos < end:
            i, inner = divmod(pos, bs)
            take = min(bs - inner, end - pos)
            parts.append(self._block(i)[inner:inner + take])
            pos += take
        return b"".join(parts)

    def close(self) -> None:
        """Nothing is held open."""

    def __enter__(self) -> EbsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
