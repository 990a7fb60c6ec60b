"""AWS staging and failover benchmark, against moto's server on loopback (issue 12).

On the cached realistic image (``bench.common.realistic_image``, 2.5 GiB ext4 of real files) and its
1 %-changed copy (``one_percent_change``), both backed up into one archive (not timed):

- staging throughput: ``lifeboat stage`` of the first point (a full EBS snapshot of the non-zero
  512 KiB blocks, with ``PutSnapshotBlock``), then of the changed point (a child snapshot of only
  the blocks whose archive chunks changed);
- failover time, one machine, ``lifeboat failover --yes`` of the changed point: from the staged
  chain (the chain holds the first point: the last delta is staged, an AMI registered, the
  instance run) against from nothing (``use_staged: false``: the point's non-zero blocks all copied
  into a snapshot of the run's own), both including the engine's export of the raw image. The ratio
  is printed.

moto's server (``tests/moto_aws.py``: AWS's 512 KiB block size) keeps blocks in memory, so the
figures measure lifeboat's side plus a local HTTP server, not AWS's network or EBS's own speed.
One run (each step once); every staged snapshot is read back and compared with its point.

Usage::

    .venv/bin/python bench/aws_bench.py [--size-gib 2.5] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import BENCH_DIR, machine_info, one_percent_change, realistic_image, run

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lifeboat.targets.ebs import client, read_snapshot, session  # noqa: E402

LIFEBOAT = [sys.executable, "-m", "lifeboat"]


def lifeboat(*argv: str) -> str:
    """Run ``lifeboat ARGV``; its stdout."""
    return run([*LIFEBOAT, *argv]).stdout


def timed(*argv: str) -> tuple[float, str]:
    start = time.monotonic()
    out = lifeboat(*argv)
    return time.monotonic() - start, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runbook(path: Path, point: str, settings: dict[str, Any]) -> Path:
    path.write_text(
        f"version: 1\nname: {path.stem}\nkind: failover\n"
        f"target: {{driver: aws, settings: {json.dumps({'region': 'us-east-1', **settings})}}}\n"
        f"network: {{mode: none}}\nmachines:\n  - name: bench\n    point: {point}\nteardown: never\n"
    )
    return path


def read_back_equals(snapshot_id: str, image: Path) -> bool:
    """Every block of the snapshot (its chain combined) equals the image."""
    sess = session("us-east-1")
    size = image.stat().st_size
    ok = [True]
    with image.open("rb") as f:
        fd = f.fileno()

        def write(offset: int, data: bytes) -> None:
            keep = max(0, min(len(data), size - offset))
            if os.pread(fd, keep, offset) != data[:keep] or data[keep:].strip(b"\0"):
                ok[0] = False

        read_snapshot(client(sess, "ebs"), client(sess, "ec2"), snapshot_id, write)
    return ok[0]


def start_moto(work: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """moto's server on a free loopback port, and the environment that points boto3 at it."""
    port = free_port()
    with (work / "moto.log").open("wb") as log:
        moto = subprocess.Popen([sys.executable, str(REPO / "tests" / "moto_aws.py"), "-H", "127.0.0.1", "-p",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}
    return moto, env


def stage(work: Path, arc: str, selector: str) -> tuple[float, dict[str, Any]]:
    """``lifeboat stage`` of one point: seconds, and what it did."""
    rb = runbook(work / f"stage-{selector.replace('@', '-')}.yaml", selector, {})
    s, out = timed("stage", str(rb), "--json", "--archive", arc)
    return s, json.loads(out)["machines"][0]


def failover(work: Path, arc: str, selector: str, use_staged: bool) -> float:
    """``lifeboat failover --yes`` of one point into a fresh state folder: seconds."""
    name = "staged" if use_staged else "nothing"
    rb = runbook(work / f"failover-{name}.yaml", selector, {"use_staged": use_staged})
    return timed("failover", str(rb), "--yes", "--archive", arc, "--state", str(work / f"state-{name}"))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size-gib", type=float, default=2.5)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    image = realistic_image(args.size_gib)
    changed = one_percent_change(image)
    print(json.dumps(machine_info()), file=sys.stderr)
    work = BENCH_DIR / "aws-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    moto, env = start_moto(work)
    os.environ.update(env)
    mib = 1 << 20
    try:
        # two machines with the same two points: "a" for staging alone, "b" for the failovers
        arc = str(work / "arc")
        lifeboat("archive", "init", "--archive", arc)
        points: dict[str, list[str]] = {}
        for machine in ("a", "b"):
            for disk in (image, changed):
                lifeboat("backup", machine, str(disk), "--archive", arc)
            points[machine] = [p["point"] for p in json.loads(lifeboat("points", machine, "--json", "--archive", arc))]
        size = image.stat().st_size
        fig: dict[str, Any] = {"size_bytes": size}
        s, full = stage(work, arc, f"a@{points['a'][0]}")
        fig["stage_full"] = {"seconds": s, "bytes_sent": full["bytes_sent"], "blocks": full["blocks"]}
        s, delta = stage(work, arc, f"a@{points['a'][1]}")
        fig["stage_delta"] = {"seconds": s, "bytes_sent": delta["bytes_sent"], "blocks": delta["blocks"]}
        if not (read_back_equals(full["snapshot_id"], image) and read_back_equals(delta["snapshot_id"], changed)):
            raise SystemExit("a staged snapshot differs from its point")

        stage(work, arc, f"b@{points['b'][0]}")  # the chain a failover starts from: one point behind
        fig["failover_from_staged_s"] = failover(work, arc, f"b@{points['b'][1]}", True)
        fig["failover_from_nothing_s"] = failover(work, arc, f"b@{points['b'][1]}", False)
        fig["ratio_nothing_over_staged"] = fig["failover_from_nothing_s"] / fig["failover_from_staged_s"]
    finally:
        os.killpg(moto.pid, 15)
        moto.wait()
    print(json.dumps(fig, indent=1))
    f, d = fig["stage_full"], fig["stage_delta"]
    print(f"stage full ({size / mib:.0f} MiB point): {f['seconds']:.1f} s, {f['bytes_sent'] / mib:.0f} MiB sent "
          f"({f['bytes_sent'] / mib / f['seconds']:.0f} MiB/s sent, {size / mib / f['seconds']:.0f} MiB/s of disk)")
    print(f"stage 1 % change: {d['seconds']:.1f} s, {d['bytes_sent'] / mib:.0f} MiB sent in {d['blocks']} blocks")
    print(f"failover from staged {fig['failover_from_staged_s']:.1f} s, from nothing "
          f"{fig['failover_from_nothing_s']:.1f} s: ratio {fig['ratio_nothing_over_staged']:.1f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(fig, indent=1))


if __name__ == "__main__":
    main()
