"""Serving from the off-site copy: ``lifeboat serve`` straight from an S3 archive.

Two recovery hosts (two ``lifeboat serve`` processes, each with a pack cache smaller than the
point) serve one point of a bucket at once and both export its exact bytes; the sample guest
boots from a point on SeaweedFS while ``--hydrate-to`` copies it to a local disk.
"""

from __future__ import annotations

import random
from pathlib import Path

from examples.sample_guest import INITIAL_COUNTER, INITIAL_TEXT, boot, read_record
from lifeboat.archive import Archive
from lifeboat.archive.files import FileSource
from lifeboat.nbdserver.hydrate import hydration_progress
from tests.nbdserver.conftest import run, start_serve

MiB = 1024 * 1024
BOOT_TIMEOUT = 240  # a deadline for a TCG boot on a busy machine, not a performance threshold


def _backup(location: str, image: Path, machine: str) -> None:
    arc = Archive.init(location, chunk_size=MiB)
    with FileSource(image) as src:
        arc.backup(machine, src)
    arc.backend.close()


def test_two_servers_export_one_point_of_a_bucket(s3_moto: str, tmp_path: Path) -> None:
    rng = random.Random(11)
    image = tmp_path / "web01.img"
    with image.open("wb") as f:  # 12 MiB: random data, a hole, text
        f.write(rng.randbytes(5 * MiB))
        f.seek(7 * MiB)
        f.write(b"lifeboat off-site\n" * (5 * MiB // 18))
        f.truncate(12 * MiB)
    _backup(s3_moto, image, "web01")
    servers = [start_serve(s3_moto, "web01", "--pack-cache-size", "4M") for _ in range(2)]
    try:
        for i, s in enumerate(servers):
            out = tmp_path / f"copy{i}.img"
            run(["nbdcopy", s.url, str(out)])
            assert out.read_bytes() == image.read_bytes(), f"server {i} exported other bytes"
    finally:
        for s in servers:
            assert s.stop() == 0, s.stderr


def test_sample_guest_boots_from_s3_while_hydrating(s3_seaweedfs: str, sample_guest_image: Path,
                                                     tmp_path: Path) -> None:
    _backup(s3_seaweedfs, sample_guest_image, "guest")
    disk = tmp_path / "guest.img"
    s = start_serve(s3_seaweedfs, "guest", "--writable", "--hydrate-to", str(disk), "--overlay",
                    str(tmp_path / "unused.cow"))
    try:
        result = boot(s.url, timeout=BOOT_TIMEOUT)
        assert result.matched, f"the guest did not boot from S3\n{result.console[-3000:]}\n{s.stderr}"
        assert "LIFEBOAT-GUEST: booted" in result.console
    finally:
        assert s.stop() == 0, s.stderr
    done, total = hydration_progress(disk)
    if done == total:  # hydrated: the local disk is the machine, with the guest's write
        assert read_record(disk) == (INITIAL_COUNTER + 1, INITIAL_TEXT)
