"""The conformance suite that every storage backend must pass (restic's backend/test idea)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifeboat.archive.backend import Backend, open_backend
from lifeboat.archive.errors import Locked
from lifeboat.archive.local import LocalBackend
from lifeboat.archive.remote import RemoteBackend
from lifeboat.archive.server import ArchiveServer


@pytest.fixture(params=["local", "remote", "s3_moto", "s3_seaweedfs"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """Every backend kind; a new kind adds itself to ``params``. The remote backend talks to a
    real ``ArchiveServer`` on loopback, which stores into a local directory; the S3 ones to
    moto's server and SeaweedFS on loopback (tests/archive/conftest.py)."""
    if request.param.startswith("s3_"):
        s3 = open_backend(request.getfixturevalue(request.param))
        yield s3
        s3.close()
        return
    store = tmp_path / "store"
    store.mkdir()
    if request.param == "local":
        local = LocalBackend(store)
        yield local
        local.close()
        return
    server = ArchiveServer(LocalBackend(store), "127.0.0.1", 0, token="tok", tls=None,
                           spool=tmp_path / "spool", lock_ttl=2.0).start()
    monkeypatch.setenv("LIFEBOAT_ARCHIVE_TOKEN", "tok")  # inherited by the lock holders forked below
    remote = RemoteBackend(server.url)
    try:
        yield remote
    finally:
        remote.close()
        server.shutdown()


def test_put_get_roundtrip(backend: Backend) -> None:
    backend.put("a/b/c", b"hello")
    assert backend.get("a/b/c") == b"hello"
    assert backend.exists("a/b/c")
    assert backend.size("a/b/c") == 5


def test_get_range(backend: Backend) -> None:
    data = os.urandom(10000)
    backend.put("obj", data)
    assert backend.get_range("obj", 100, 50) == data[100:150]
    assert backend.get_range("obj", 9990, 100) == data[9990:]


def test_missing_keys_raise_keyerror(backend: Backend) -> None:
    with pytest.raises(KeyError):
        backend.get("nope")
    with pytest.raises(KeyError):
        backend.get_range("nope", 0, 1)
    with pytest.raises(KeyError):
        backend.size("nope")
    assert not backend.exists("nope")
    backend.delete("nope")  # absent: no error


def test_put_replaces_atomically(backend: Backend) -> None:
    backend.put("k", b"one")
    backend.get_range("k", 0, 3)  # may cache a handle
    backend.put("k", b"two!")
    assert backend.get("k") == b"two!"
    assert backend.get_range("k", 0, 4) == b"two!"


def test_list_by_prefix(backend: Backend) -> None:
    for k in ["packs/aa/1", "packs/bb/2", "points/m/1", "config"]:
        backend.put(k, b"x")
    assert sorted(backend.list("packs/")) == ["packs/aa/1", "packs/bb/2"]
    assert sorted(backend.list("points/m/")) == ["points/m/1"]
    assert "config" in set(backend.list())


def test_delete(backend: Backend) -> None:
    backend.put("packs/x", b"1")
    backend.delete("packs/x")
    assert not backend.exists("packs/x")
    assert list(backend.list("packs/")) == []


def test_invalid_keys_rejected(backend: Backend) -> None:
    for key in ["", "/abs", "a/../b"]:
        with pytest.raises(ValueError):
            backend.put(key, b"x")


def _hold_lock(location: str, ready: multiprocessing.synchronize.Event,
               release: multiprocessing.synchronize.Event) -> None:
    with open_backend(location).lock(exclusive=True):
        ready.set()
        release.wait(20)


def test_exclusive_lock_excludes_other_processes(backend: Backend) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(backend.location, ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        if not isinstance(backend, LocalBackend):
            time.sleep(3)  # longer than the remote lease's ttl: the holder's renewals keep it
        with pytest.raises(Locked), backend.lock(exclusive=False, wait=False):
            pass
    finally:
        release.set()
        proc.join(10)
    with backend.lock(exclusive=False, wait=False):
        pass


def test_lock_released_when_holder_is_killed(backend: Backend) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(backend.location, ready, release))
    proc.start()
    assert ready.wait(10)
    proc.kill()
    proc.join(10)
    with backend.lock(exclusive=True, wait=True):  # a remote lease runs out after its ttl (2 s here)
        pass


def test_incomplete_puts_are_invisible_and_cleaned(backend: Backend) -> None:
    backend.put("packs/ok", b"1")
    if isinstance(backend, LocalBackend):  # simulate a put killed before its rename
        (backend.root / "packs" / "half.tmp-0000").write_bytes(b"partial")
    assert list(backend.list("packs/")) == ["packs/ok"]
    assert backend.cleanup_incomplete() == (1 if isinstance(backend, LocalBackend) else 0)
    assert list(backend.list("packs/")) == ["packs/ok"]


def test_put_parts_equals_put_of_the_join(backend: Backend) -> None:
    parts = [os.urandom(n) for n in (0, 1, 4096, 100_000)] * 300  # more parts than one writev takes
    backend.put_parts("packs/p", parts)
    assert backend.get("packs/p") == b"".join(parts)
