"""The remote backend passes the backend conformance suite of ``tests/archive`` (the tests that do
not reach into a local directory), plus lock leases across processes, through a real server."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from archive.backend import Backend
from archive.errors import Locked
from archive.local import LocalBackend
from archive.remote import RemoteBackend
from archive.server import ArchiveServer
from tests.archive.test_backend_conformance import (  # noqa: F401  (collected here against the remote backend)
    test_delete,
    test_get_range,
    test_invalid_keys_rejected,
    test_list_by_prefix,
    test_missing_keys_raise_keyerror,
    test_put_get_roundtrip,
    test_put_parts_equals_put_of_the_join,
    test_put_replaces_atomically,
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ArchiveServer]:
    (tmp_path / "store").mkdir()
    srv = ArchiveServer(LocalBackend(tmp_path / "store"), "127.0.0.1", 0, token="tok", tls=None,
                        spool=tmp_path / "spool", lock_ttl=2.0).start()
    yield srv
    srv.shutdown()


@pytest.fixture
def backend(server: ArchiveServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    monkeypatch.setenv("LIFEBOAT_ARCHIVE_TOKEN", "tok")
    b = RemoteBackend(server.url)
    yield b
    b.close()


def _hold_lock(url: str, ready: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:
    with RemoteBackend(url).lock(exclusive=True):
        ready.set()
        release.wait(20)


def test_exclusive_lease_excludes_other_clients(backend: Backend) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(backend.location, ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        time.sleep(3)  # longer than the lease's ttl: the holder's renewals keep it
        with pytest.raises(Locked), backend.lock(exclusive=False, wait=False):
            pass
    finally:
        release.set()
        proc.join(10)
    with backend.lock(exclusive=False, wait=False):
        pass


def test_lease_of_a_killed_client_expires(backend: Backend) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(backend.location, ready, release))
    proc.start()
    assert ready.wait(10)
    proc.kill()
    proc.join(10)
    with backend.lock(exclusive=True, wait=True):  # waits for the lease to run out (ttl 2 s here)
        pass
