"""Faults between lifeboat and the object store (``faultproxy.py`` in front of moto): dropped
connections (before and after the request took effect), 500, 503, SlowDown throttling and slow
answers. A replicate killed mid-copy has published no point without its packs; the next run
resumes and completes through the faults; reads (restore, verify, ``lifeboat serve``) go through
them too; verify passes on both sides."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.backend import open_backend
from lifeboat.archive.replicate import replicate
from lifeboat.archive.s3 import PART_SIZE
from lifeboat.archive.verify import verify
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.plumbing.errors import UsageError
from tests.archive.faultproxy import FAULTS, FaultProxy
from tests.archive.s3servers import BUCKET, client
from tests.archive.test_replicate import MiB, disk, restores, source
from tests.nbdserver.conftest import run, start_serve


def test_replicate_and_serve_through_faults_and_a_kill(moto_endpoint: str, s3_moto: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    machines = {f"m{i}": disk(60 + i, 2 * MiB) for i in range(3)}
    arc = source(tmp_path, machines)
    src = arc.backend.location
    proxy = FaultProxy(moto_endpoint, every=4, delay=0.3)
    monkeypatch.setenv("LIFEBOAT_S3_ENDPOINT", proxy.endpoint)
    points = s3_moto.split("/", 3)[3] + "/points/"
    direct = client(moto_endpoint)  # watches the bucket past the proxy
    try:
        env = {k: v for k, v in os.environ.items() if k != "LIFEBOAT_ARCHIVE"}
        proc = subprocess.Popen([*LIFEBOAT, "replicate", "--to", s3_moto, "--bwlimit", "1M", "--archive", src],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while not direct.list_objects_v2(Bucket=BUCKET, Prefix=points).get("Contents"):
                assert proc.poll() is None, f"replicate ended before it could be killed: {proc.stderr}"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        part = Archive.open(s3_moto)
        shown = sum(len(part.points(m)) for m in part.machines())
        assert 0 < shown < len(machines)
        assert verify(part).ok  # every point published has every chunk it needs

        report = replicate(src, s3_moto)
        assert report.ok and len(report.points_published) == len(machines) - shown and report.lag_seconds == 0
        restores(s3_moto, machines)  # reads and verify of the replica, through the faults
        assert verify(arc).ok
        s = start_serve(s3_moto, "m1", "--pack-cache-size", "1M")
        try:
            out = tmp_path / "m1.img"
            run(["nbdcopy", s.url, str(out)])
            assert out.read_bytes() == machines["m1"]
        finally:
            assert s.stop() == 0, s.stderr
    finally:
        proxy.close()
    assert set(proxy.counts) == set(FAULTS), proxy.counts


@pytest.mark.parametrize(("name", "value"), [("AWS_MAX_ATTEMPTS", "many"), ("AWS_MAX_ATTEMPTS", "0"),
                                             ("AWS_RETRY_MODE", "eager")])
def test_a_bad_retry_setting_is_a_usage_error(name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=value):
        open_backend("s3://bucket/prefix")


@pytest.mark.parametrize(("server", "store"), [("moto_endpoint", "s3_moto"), ("seaweedfs_endpoint", "s3_seaweedfs")])
def test_a_multipart_upload_whose_completion_answer_is_lost_is_a_success(
        server: str, store: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint: str = request.getfixturevalue(server)
    location: str = request.getfixturevalue(store)
    proxy = FaultProxy(endpoint, faults=("drop-after",), every=1, limit=1,
                       when=lambda method, path: method == "POST" and "uploadId=" in path)  # the completion
    monkeypatch.setenv("LIFEBOAT_S3_ENDPOINT", proxy.endpoint)
    data = random.Random(4).randbytes(PART_SIZE + 12345)
    try:
        backend = open_backend(location)
        backend.put_parts("packs/ab/abcdef", [data[:1000], data[1000:]])
        assert backend.get("packs/ab/abcdef") == data
    finally:
        proxy.close()
    assert proxy.counts == {"drop-after": 1}
