"""STARTTLS with X.509: qemu-img's tls-creds-x509 as the client, certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.plumbing import nbd as P
from tests.nbdserver.conftest import Served, run
from tests.nbdserver.rawclient import RawClient, assemble


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
          *, ca: bool = False, server: bool = False) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@dataclass
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_dir: Path  # what qemu's tls-creds-x509 reads: ca-cert.pem, client-cert.pem, client-key.pem
    rogue_dir: Path  # a client certificate from another CA
    anonymous_dir: Path  # trusts the server, has no client certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("lifeboat test CA", ca_key, "lifeboat test CA", ca_key, ca=True)
    server_key = _key()
    (d / "ca.pem").write_bytes(ca)
    (d / "server.pem").write_bytes(_cert("localhost", server_key, "lifeboat test CA", ca_key, server=True))
    (d / "server.key").write_bytes(_pem_key(server_key))
    dirs = {}
    for name, issuer, issuer_key in (("client", "lifeboat test CA", ca_key), ("rogue", "rogue CA", rogue_ca_key)):
        cd = d / name
        cd.mkdir()
        k = _key()
        (cd / "ca-cert.pem").write_bytes(ca)
        (cd / "client-cert.pem").write_bytes(_cert(name, k, issuer, issuer_key))
        (cd / "client-key.pem").write_bytes(_pem_key(k))
        dirs[name] = cd
    anon = d / "anonymous"
    anon.mkdir()
    (anon / "ca-cert.pem").write_bytes(ca)
    return PKI(d / "ca.pem", d / "server.pem", d / "server.key", dirs["client"], dirs["rogue"], anon)


def _image_opts(s: Served, creds: str = "tls0") -> str:
    return (f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,"
            f"file.server.port={s.port},file.export={s.export},file.tls-creds={creds}")


def _tls_object(creds_dir: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={creds_dir},endpoint=client"]


def test_qemu_img_over_tls_with_client_certificate(shared_archive: Path, serve: Callable[..., Served],
                                                   pki: PKI, test_image: Path) -> None:
    s = serve(shared_archive, "web01", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
              "--tls-ca", str(pki.ca))
    out = run(["qemu-img", "compare", *_tls_object(pki.client_dir), "--image-opts", _image_opts(s),
               f"driver=raw,file.driver=file,file.filename={test_image}"]).stdout
    assert "identical" in out
    info = run(["nbdinfo", f"nbds://127.0.0.1:{s.port}/web01?tls-certificates={pki.client_dir}"]).stdout
    assert "with TLS" in info

    # a certificate from another CA, or none at all, is refused
    for creds in (pki.rogue_dir, pki.anonymous_dir):
        proc = run(["qemu-img", "info", *_tls_object(creds), "--image-opts", _image_opts(s)], check=False)
        assert proc.returncode != 0, f"{creds.name} was let in"
    assert s.proc.poll() is None


def test_client_without_tls_is_refused(shared_archive: Path, serve: Callable[..., Served], pki: PKI,
                                       test_image: Path) -> None:
    s = serve(shared_archive, "web01", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
              "--tls-ca", str(pki.ca))
    proc = run(["nbdinfo", s.url], check=False)
    assert proc.returncode != 0
    proc = run(["qemu-img", "info", "-f", "raw", s.url], check=False)
    assert proc.returncode != 0

    with RawClient(s.host, s.port) as c:
        c.greet()
        for option, data in ((P.OPT_LIST, b""), (P.OPT_STRUCTURED_REPLY, b""), (P.OPT_INFO, c.info_data("web01")),
                             (P.OPT_GO, c.info_data("web01")), (99, b"x"),
                             (P.OPT_SET_META_CONTEXT, c.meta_data("web01", ["base:allocation"]))):
            [r] = c.option_replies(option, data)
            assert r.reply == P.REP_ERR_TLS_REQD, (option, r)
        # now upgrade, with the client certificate, and everything works
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.load_cert_chain(pki.client_dir / "client-cert.pem", pki.client_dir / "client-key.pem")
        c.starttls(ctx)
        [r] = c.option_replies(P.OPT_STARTTLS)
        assert r.reply == P.REP_ERR_INVALID  # already active
        replies = c.option_replies(P.OPT_LIST)
        assert replies[-1].reply == P.REP_ACK
        c.go("web01")
        assert assemble(c.read(0, 65536), 0, 65536) == test_image.read_bytes()[:65536]

    with RawClient(s.host, s.port) as c:  # NBD_OPT_EXPORT_NAME cannot be refused: disconnect
        c.greet()
        c.option(P.OPT_EXPORT_NAME, b"web01")
        assert c.closed_by_server()

    with RawClient(s.host, s.port) as c:  # TLS without a client certificate fails the handshake
        c.greet()
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            c.starttls(ctx)
            c.option_replies(P.OPT_LIST)


def test_tls_without_client_certificates(shared_archive: Path, serve: Callable[..., Served], pki: PKI) -> None:
    """Without --tls-ca the channel is encrypted and any client may connect."""
    s = serve(shared_archive, "web01", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    run(["qemu-img", "info", *_tls_object(pki.anonymous_dir), "--image-opts", _image_opts(s)])


def test_tls_options_are_checked(shared_archive: Path, serve: Callable[..., Served], pki: PKI) -> None:
    import subprocess

    from tests.nbdserver.conftest import REPO

    for args in (["--tls-cert", str(pki.server_cert)], ["--tls-ca", str(pki.ca)],
                 ["--tls-cert", str(pki.server_cert), "--tls-key", "/nonexistent.key"]):
        proc = subprocess.run([*LIFEBOAT, "--archive", str(shared_archive), "serve",
                               "web01", "--listen", "127.0.0.1:0", *args], capture_output=True, text=True,
                              timeout=30, cwd=REPO)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stdout == ""
        assert "tls" in proc.stderr.lower()
