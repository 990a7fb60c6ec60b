"""TLS contexts over a real loopback handshake: the optional CA of a server means client
certificate verification, a client checks the server against its CA, bad files are usage errors."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from lifeboat.plumbing.tls import TlsError, client_context, server_context
from tests.pki import make_pki


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str | None:
    """Complete one TLS handshake on loopback; the server side's error, or None when it succeeded."""
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: list[str | None] = []

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
            outcome.append(None)
        except (ssl.SSLError, OSError) as e:
            outcome.append(str(e))

    t = threading.Thread(target=accept)
    t.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=30) as raw:
            with client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.recv(2)  # with TLS 1.3 a refused client certificate shows only here
    except (ssl.SSLError, OSError):
        pass
    t.join(30)
    listener.close()
    return outcome[0]


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    return make_pki(tmp_path)


def test_client_ca_requires_a_client_certificate(pki: dict[str, str]) -> None:
    server = server_context(pki["cert"], pki["key"], pki["ca"])
    assert server.verify_mode == ssl.CERT_REQUIRED and server.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert handshake(server, client_context(pki["ca"], pki["client_cert"], pki["client_key"])) is None
    refused = handshake(server, client_context(pki["ca"]))
    assert refused is not None and "certificate" in refused.lower()


def test_without_client_ca_any_client_may_connect(pki: dict[str, str]) -> None:
    server = server_context(pki["cert"], pki["key"])
    assert server.verify_mode == ssl.CERT_NONE
    assert handshake(server, client_context(pki["ca"])) is None


def test_the_client_checks_the_server(pki: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = make_pki(tmp_path / "other")
    assert handshake(server_context(pki["cert"], pki["key"]), client_context(other["ca"])) is not None


@pytest.mark.parametrize("which", ["cert", "key", "ca"])
def test_unloadable_files_are_usage_errors(pki: dict[str, str], tmp_path: Path, which: str) -> None:
    files = {"cert": pki["cert"], "key": pki["key"], "ca": pki["ca"], which: str(tmp_path / "missing.pem")}
    with pytest.raises(TlsError, match="cannot be loaded") as e:
        server_context(files["cert"], files["key"], files["ca"])
    assert e.value.exit_code == 2
    if which == "ca":
        with pytest.raises(TlsError):
            client_context(files["ca"])
