"""What the S3 backend adds to the conformance suite: conditional writes between two writers,
multipart uploads aborted on failure, the lease lock between processes, the whole CLI on an
S3 archive, and clear errors for a missing bucket, refused credentials and an absent endpoint."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.synchronize
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from lifeboat.archive.backend import open_backend
from lifeboat.archive.errors import StorageError
from lifeboat.archive.s3 import PART_SIZE, S3Backend
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from tests.archive.s3servers import BIN, free_port, serve


def s3(location: str) -> S3Backend:
    backend = open_backend(location)
    assert isinstance(backend, S3Backend)
    return backend


def uploads(backend: S3Backend) -> list[dict[str, Any]]:
    """The multipart uploads in flight under the backend's prefix."""
    found: list[dict[str, Any]] = backend._s3.list_multipart_uploads(Bucket=backend.bucket,
                                                                     Prefix=backend.prefix).get("Uploads", [])
    return found


def test_two_writers_never_overwrite_each_other(s3_moto: str) -> None:
    a, b = s3(s3_moto), s3(s3_moto)
    a.put("config", b"v1")
    assert b.get("config") == b"v1"
    a.put("config", b"v2")  # a replaces the version it wrote
    with pytest.raises(StorageError, match="config was changed by another writer"):
        b.put("config", b"v2-from-b")  # b saw v1 only
    assert a.get("config") == b"v2"
    assert b.get("config") == b"v2"
    b.put("config", b"v3")  # having read the current version, b may replace it
    assert a.get("config") == b"v3"
    a.put("points/m/1", b"a's point")
    with pytest.raises(StorageError, match="points/m/1 was created by another writer"):
        b.put("points/m/1", b"b's point")  # b never saw it: it may only create
    assert a.get("points/m/1") == b"a's point"


def test_failed_multipart_upload_is_aborted(s3_moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = s3(s3_moto)
    real = backend._s3.upload_part
    calls = []

    def fail_second(**kwargs: Any) -> Any:
        calls.append(kwargs["PartNumber"])
        if len(calls) == 2:
            raise ConnectionResetError("dropped")
        return real(**kwargs)

    monkeypatch.setattr(backend._s3, "upload_part", fail_second)
    with pytest.raises(ConnectionResetError):
        backend.put_parts("packs/aa/p", [os.urandom(PART_SIZE), b"tail"])
    assert calls == [1, 2]
    assert uploads(backend) == []
    assert not backend.exists("packs/aa/p")


def test_cleanup_aborts_leftover_uploads_of_its_prefix_only(s3_moto: str) -> None:
    backend, other = s3(s3_moto), s3(s3_moto.rsplit("/", 1)[0] + "/other")
    backend._s3.create_multipart_upload(Bucket=backend.bucket, Key=backend.prefix + "packs/aa/dead")
    other._s3.create_multipart_upload(Bucket=other.bucket, Key=other.prefix + "packs/aa/alive")
    assert backend.cleanup_incomplete() == 1
    assert uploads(backend) == [] and len(uploads(other)) == 1


def _hold_shared(location: str, ready: multiprocessing.synchronize.Event,
                 release: multiprocessing.synchronize.Event) -> None:
    with open_backend(location).lock(exclusive=False):
        ready.set()
        release.wait(30)


def test_exclusive_lock_waits_for_a_shared_holder(s3_moto: str) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_shared, args=(s3_moto, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with s3(s3_moto).lock(exclusive=False, wait=False):  # shared locks share
            pass
        taken = threading.Event()

        def take_exclusive() -> None:
            with s3(s3_moto).lock(exclusive=True):
                taken.set()

        taker = threading.Thread(target=take_exclusive)
        taker.start()
        assert not taken.wait(4)  # longer than the 2 s lease: the holder's renewals keep it
        release.set()
        holder.join(10)
        taker.join(30)
        assert taken.is_set()
    finally:
        release.set()
        holder.join(10)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIFEBOAT, *args], capture_output=True, text=True, timeout=120,
                          env=env or dict(os.environ), stdin=subprocess.DEVNULL)


def test_cli_round_trip_on_s3(s3_moto: str, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(300_000) + bytes(200_000) + os.urandom(1234))
    r = run("--archive", s3_moto, "archive", "init", "--chunk-size", "65536")
    assert r.returncode == 0, r.stderr
    r = run("--archive", s3_moto, "backup", "web01", str(image), "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    r = run("--archive", s3_moto, "backup", "web01", str(image), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes_new"] == 0
    r = run("--archive", s3_moto, "points", "web01", "--json")
    assert r.returncode == 0, r.stderr
    assert [p["point"] for p in json.loads(r.stdout)][0] == first["point"]
    r = run("--archive", s3_moto, "restore", f"web01@{first['point']}", str(tmp_path / "back.img"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back.img").read_bytes() == image.read_bytes()
    r = run("--archive", s3_moto, "verify", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, r.stderr
    r = run("--archive", s3_moto, "archive", "init")
    assert r.returncode == 2 and "already holds" in r.stderr


def clear_failure(r: subprocess.CompletedProcess[str], status: int, says: str) -> None:
    assert r.returncode == status, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_missing_bucket_is_named(s3_moto: str) -> None:
    r = run("--archive", "s3://no-such-bucket-here/arc", "points", "web01")
    clear_failure(r, 2, "bucket 'no-such-bucket-here'")
    clear_failure(r, 2, "does not exist")


def test_unreachable_endpoint_is_named(s3_moto: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = dict(os.environ, LIFEBOAT_S3_ENDPOINT=endpoint, AWS_MAX_ATTEMPTS="1")
    clear_failure(run("--archive", s3_moto, "points", "web01", env=env), 1, f"cannot reach the S3 endpoint {endpoint}")


@pytest.fixture
def strict_moto(tmp_path: Path) -> Iterator[str]:
    """A moto server that checks credentials (it accepts any by default)."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    with serve([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], f"http://127.0.0.1:{port}",
               tmp_path / "log", env=env) as endpoint:
        yield endpoint


def test_refused_credentials_are_named(s3_moto: str, strict_moto: str) -> None:
    env = dict(os.environ, LIFEBOAT_S3_ENDPOINT=strict_moto)
    r = run("--archive", "s3://some-bucket/arc", "points", "web01", env=env)
    clear_failure(r, 2, f"bucket 'some-bucket' at {strict_moto} refused the credentials")


def test_no_credentials_at_all(s3_moto: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k in ("AWS_CONFIG_FILE",
                                                                                      "AWS_SHARED_CREDENTIALS_FILE")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    clear_failure(run("--archive", s3_moto, "archive", "init", env=env), 2, "no S3 credentials found")


class _Raw:
    """The body of a canned HTTP answer, as botocore reads it."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def test_503_and_throttling_are_retried(s3_moto: str) -> None:
    backend = s3(s3_moto)
    answers = [(503, b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"),
               (500, b"<Error><Code>InternalError</Code><Message>oops</Message></Error>")]

    def flaky(request: Any, **_: Any) -> AWSResponse | None:
        if request.method == "PUT" and answers:
            status, body = answers.pop(0)
            return AWSResponse(request.url, status, {}, _Raw(body))
        return None  # sent for real

    backend._s3.meta.events.register_first("before-send.s3.PutObject", flaky)
    backend.put("points/m/1", b"stored after two refusals")
    assert answers == []
    assert backend.get("points/m/1") == b"stored after two refusals"


def test_a_retried_write_that_had_landed_is_a_success(s3_moto: str) -> None:
    """The answer to a conditional PUT is lost after it was stored: the retry fails its
    condition, and the backend sees that the object holds its bytes."""
    backend = s3(s3_moto)
    lost: list[int] = []

    def lose_answer(response: Any, **_: Any) -> float | None:
        if not lost and response is not None and response[0] is not None:
            lost.append(response[0].status_code)
            return 0.0  # send it again at once, as after a dropped connection
        return None

    backend._s3.meta.events.register_first("needs-retry.s3.PutObject", lose_answer)
    backend.put("config", b"v1")
    assert backend.get("config") == b"v1"
    assert lost == [200]
    backend.put("config", b"v2")  # replaced through the ETag the retry found
    assert backend.get("config") == b"v2"
