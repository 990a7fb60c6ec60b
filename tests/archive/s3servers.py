"""Real S3 servers on loopback for the tests: moto's server and SeaweedFS, run as processes."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions

BIN = Path(sys.executable).parent  # moto_server and weed install beside the interpreter
BUCKET = "lifeboat-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lifeboat-test", "AWS_SECRET_ACCESS_KEY": "lifeboat-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    """A free loopback port below 55000 (SeaweedFS listens on each port + 10000 for gRPC too)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 55000:
            return port


def client(endpoint: str) -> Any:
    """A plain boto3 client of the server, with the test credentials."""
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def seaweedfs_argv(work: Path) -> tuple[list[str], str]:
    """The command line of SeaweedFS (master, volume, filer and S3 gateway in one process) on
    loopback with its data in ``work``, and its S3 endpoint; its side servers (Iceberg, Lance,
    telemetry) are off."""
    master, volume, filer, s3 = (free_port() for _ in range(4))
    argv = [str(BIN / "weed"), "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={work}",
            "-volume.max=64", "-master.volumeSizeLimitMB=256", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", f"-master.port={master}", f"-volume.port={volume}",
            f"-filer.port={filer}", f"-s3.port={s3}"]
    return argv, f"http://127.0.0.1:{s3}"


@contextlib.contextmanager
def serve(argv: list[str], endpoint: str, log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run an S3 server (killed at the end: its data is thrown away); yields its endpoint once
    it answers S3 requests (an error answer counts: the server is up)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent, env=env,
                                start_new_session=True)
    probe = client(endpoint)
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, f"{argv[0]} exited: {log.read_text()[-2000:]}"
            try:
                probe.list_buckets()
                break
            except botocore.exceptions.ClientError:
                break
            except botocore.exceptions.BotoCoreError:
                assert time.monotonic() < deadline, f"{argv[0]} did not answer: {log.read_text()[-2000:]}"
                time.sleep(0.3)
        yield endpoint
    finally:
        proc.kill()
        proc.wait()
