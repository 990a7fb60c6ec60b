"""The remote archive: HTTPS with a token or client certificates, only missing chunks sent,
uploads that resume after a dropped connection, and points that commit whole or not at all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.backend import open_backend
from lifeboat.archive.errors import StorageError
from lifeboat.archive.files import FileSource
from lifeboat.archive.remote import RemoteBackend
from lifeboat.archive.server import ArchiveServer
from lifeboat.archive.verify import verify
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.plumbing.errors import UsageError
from lifeboat.plumbing.tls import server_context
from tests.pki import make_pki

MiB = 1024 * 1024


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    return make_pki(tmp_path)


# -- a proxy that drops connections -----------------------------------------------------------------
class DroppingProxy:
    """TCP proxy to ``target``; a connection that has carried ``after`` upstream bytes is cut,
    ``drops`` times in all (``drops=-1``: every connection, forever, and new ones too)."""

    def __init__(self, target: tuple[str, int], after: int, drops: int) -> None:
        self.target, self.after, self.drops = target, after, drops
        self.dropped = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.drops < 0 and self.dropped > 0:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counting: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if counting:
                    sent += len(data)
                    with self.lock:
                        cut = sent > self.after and (self.drops < 0 or self.dropped < self.drops)
                        if cut:
                            self.dropped += 1
                    if cut:
                        dst.sendall(data[: len(data) // 2])  # half a request reaches the server
                        break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ArchiveServer]:
    """An archive server (plain HTTP on loopback, token) over a fresh local archive."""
    Archive.init(str(tmp_path / "served"))
    monkeypatch.setenv("LIFEBOAT_ARCHIVE_TOKEN", "t0ken")
    srv = ArchiveServer(open_backend(str(tmp_path / "served")), "127.0.0.1", 0, token="t0ken", tls=None,
                        spool=tmp_path / "spool").start()
    yield srv
    srv.shutdown()


def random_disk(path: Path, size: int, seed: int = 1) -> Path:
    import random

    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def test_upload_resumes_after_dropped_connections(server: ArchiveServer, tmp_path: Path) -> None:
    disk = random_disk(tmp_path / "disk.img", 48 * MiB)
    proxy = DroppingProxy((server.host, server.port), after=12 * MiB, drops=3)
    arc = Archive.open(f"http://127.0.0.1:{proxy.port}")
    with FileSource(disk) as src:
        info = arc.backup("pc", src)
    assert proxy.dropped == 3
    backend = arc.backend
    assert isinstance(backend, RemoteBackend) and backend.reconnects >= 3
    assert backend.bytes_sent < 56 * MiB  # resumed at the server's offset, not sent again from the start
    local = Archive.open(str(tmp_path / "served"))
    assert local.reader(local.resolve("pc")).read(0, info.size) == disk.read_bytes()
    assert verify(local).ok
    assert not [p for p in (tmp_path / "spool").iterdir()]  # every upload committed, none left behind
    proxy.close()


def test_lost_archive_is_a_clear_error_and_leaves_no_point(server: ArchiveServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    disk = random_disk(tmp_path / "disk.img", 40 * MiB)
    monkeypatch.setenv("LIFEBOAT_ARCHIVE_RETRY_SECONDS", "2")
    proxy = DroppingProxy((server.host, server.port), after=20 * MiB, drops=-1)
    arc = Archive.open(f"http://127.0.0.1:{proxy.port}")
    with FileSource(disk) as src, pytest.raises(StorageError, match="remote archive .* failed.*gave up"):
        arc.backup("pc", src)
    local = Archive.open(str(tmp_path / "served"))
    assert local.points("pc") == []
    assert verify(local).ok
    proxy.close()


def test_only_missing_chunks_are_sent(server: ArchiveServer, tmp_path: Path) -> None:
    disk = random_disk(tmp_path / "disk.img", 16 * MiB)
    arc = Archive.open(server.url)
    with FileSource(disk) as src:
        arc.backup("pc", src)
    backend = arc.backend
    assert isinstance(backend, RemoteBackend)
    first = backend.bytes_sent
    with open(disk, "r+b") as f:  # change one chunk
        f.seek(5 * MiB)
        f.write(b"x" * 4096)
    again = Archive.open(server.url)  # a new agent process: learns the archive's chunks from the server
    with FileSource(disk) as src:
        info = again.backup("pc", src)
    assert isinstance(again.backend, RemoteBackend)
    cs = again.chunk_size
    assert first >= 16 * MiB and again.backend.bytes_sent < cs + MiB, again.backend.bytes_sent
    assert info.bytes_new == cs
    assert again.reader(info).read(0, info.size) == disk.read_bytes()


def test_https_token_and_client_certificates(tmp_path: Path, pki: dict[str, str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    Archive.init(str(tmp_path / "served"))
    tls = server_context(pki["cert"], pki["key"], pki["ca"])
    srv = ArchiveServer(open_backend(str(tmp_path / "served")), "127.0.0.1", 0, token=None, tls=tls,
                        spool=tmp_path / "spool").start()
    try:
        monkeypatch.setenv("LIFEBOAT_ARCHIVE_CA", pki["ca"])
        monkeypatch.setenv("LIFEBOAT_ARCHIVE_RETRY_SECONDS", "1")
        with pytest.raises(StorageError):  # no client certificate: the handshake is refused
            Archive.open(srv.url)
        monkeypatch.setenv("LIFEBOAT_ARCHIVE_CERT", pki["client_cert"])
        monkeypatch.setenv("LIFEBOAT_ARCHIVE_KEY", pki["client_key"])
        disk = random_disk(tmp_path / "disk.img", 3 * MiB)
        arc = Archive.open(srv.url)
        with FileSource(disk) as src:
            info = arc.backup("pc", src)
        assert arc.reader(info).read(0, info.size) == disk.read_bytes()
    finally:
        srv.shutdown()


def test_cli_serve_over_https_with_a_token(tmp_path: Path, pki: dict[str, str]) -> None:
    served = tmp_path / "served"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFEBOAT_")}
    subprocess.run([*LIFEBOAT, "--archive", str(served), "archive", "init"], env=env, check=True, capture_output=True)
    (tmp_path / "token").write_text("s3cret\n")
    serve = ["archive", "serve", "--listen", "127.0.0.1:0", "--tls-cert", pki["cert"], "--tls-key", pki["key"],
             "--token-file", str(tmp_path / "token")]
    proc = subprocess.Popen([*LIFEBOAT, "--archive", str(served), *serve], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("https://127.0.0.1:"), url
        client = {**env, "LIFEBOAT_ARCHIVE": url, "LIFEBOAT_ARCHIVE_CA": pki["ca"], "LIFEBOAT_ARCHIVE_TOKEN": "s3cret"}
        disk = random_disk(tmp_path / "disk.img", 5 * MiB)
        out = subprocess.run([*LIFEBOAT, "backup", "pc", str(disk), "--json"], env=client, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        out = subprocess.run([*LIFEBOAT, "restore", "pc", str(tmp_path / "back.img")], env=client,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "back.img").read_bytes() == disk.read_bytes()
        bad = subprocess.run([*LIFEBOAT, "points", "pc"], env={**client, "LIFEBOAT_ARCHIVE_TOKEN": "wrong"},
                             capture_output=True, text=True)
        assert bad.returncode == 2 and "token" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_serve_refuses_unsafe_setups(tmp_path: Path) -> None:
    served = tmp_path / "served"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LIFEBOAT_")}, "LIFEBOAT_ARCHIVE_TOKEN": "x"}
    cases = [
        (["--listen", "0.0.0.0:0", "--insecure-http"], "loopback"),
        (["--listen", "127.0.0.1:0"], "--tls-cert"),
        (["--listen", "nonsense"], "HOST:PORT"),
    ]
    for args, why in cases:
        out = subprocess.run([*LIFEBOAT, "--archive", str(served), "archive", "serve", *args], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and why in out.stderr, (args, out.stderr)
    no_auth = {k: v for k, v in env.items() if k != "LIFEBOAT_ARCHIVE_TOKEN"}
    out = subprocess.run([*LIFEBOAT, "--archive", str(served), "archive", "serve", "--insecure-http"], env=no_auth,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "authentication" in out.stderr


def test_wrong_token_in_process(server: ArchiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIFEBOAT_ARCHIVE_TOKEN", "nope")
    with pytest.raises(UsageError, match="token"):
        Archive.open(server.url)
