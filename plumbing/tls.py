"""TLS contexts for lifeboat's servers (``serve``, ``archive serve``) and their clients, made one way.

Both sides require TLS 1.2 or newer. On a server, the optional CA means one thing everywhere:
*client certificate verification*. Given a CA, a client must present a certificate that CA
signed, or the handshake fails (mutual TLS: the certificate is the client's credential). Without
one, any client may complete the handshake, and the server authenticates it some other way (a
bearer token) or not at all. On a client, the CA is the one the server's certificate is checked
against (the system's trust store without one), and a certificate and key, if given, are
presented to a server that asks for them.
"""

from __future__ import annotations

import ssl

from lifeboat.plumbing.errors import UsageError


class TlsError(UsageError):
    """A certificate, key or CA file cannot be loaded: nothing was started (exit status 2)."""


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A server context presenting ``cert``; with ``client_ca``, clients must present a
    certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if client_ca:
            ctx.load_verify_locations(cafile=client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"TLS certificate, key or CA cannot be loaded: {e}") from None
    return ctx


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client context checking the server against ``ca`` (else the system's trust store) and
    host name, presenting ``cert`` and ``key`` when given."""
    try:
        ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert:
            ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"TLS certificate, key or CA cannot be loaded: {e}") from None
    return ctx
