"""Certificates for TLS tests, made in-process (no openssl command): a CA, a server certificate
for 127.0.0.1 and a client certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: Issuer | None, *, ca: bool = False,
          ip: str | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer[0].subject if issuer else name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


def make_pki(folder: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in ``folder``:
    keys ca, cert, key, client_cert, client_key."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("lifeboat test CA", ca_key, None, ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    cli_key = ec.generate_private_key(ec.SECP256R1())
    ca_crt, _ = _write(folder / "ca", ca, ca_key)
    srv_crt, srv_key_path = _write(folder / "server", _cert("127.0.0.1", srv_key, (ca, ca_key), ip="127.0.0.1"),
                                   srv_key)
    cli_crt, cli_key_path = _write(folder / "client", _cert("agent", cli_key, (ca, ca_key)), cli_key)
    return {"ca": ca_crt, "cert": srv_crt, "key": srv_key_path, "client_cert": cli_crt, "client_key": cli_key_path}
