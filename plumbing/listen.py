"""Where a server listens: the one ``HOST:PORT`` grammar of every ``--listen``-like option.

Accepted: ``HOST:PORT``; ``[IPV6]:PORT``; ``:PORT`` or ``0:PORT`` (every IPv4 address,
``0.0.0.0``); an IPv6 address without brackets (``::1:9100``: the last colon starts the port, kept
because ``archive serve`` took it). Port 0 lets the system pick a free port. A port alone or a host
alone is refused: which one was meant is a guess.
"""

from __future__ import annotations

import ipaddress

from lifeboat.plumbing.errors import UsageError

ANY_HOST = "0.0.0.0"


def parse_listen(text: str, option: str) -> tuple[str, int]:
    """(host, port) of ``text``; a ``UsageError`` naming ``option`` and the expected form otherwise."""
    value = text.strip()
    expected = f"{option} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:10809 or [::1]:10809"
    if value.startswith("["):
        host, close, rest = value[1:].partition("]")
        if not close or not rest.startswith(":") or not _is_ipv6(host):
            raise UsageError(expected)
        port = rest[1:]
    else:
        host, sep, port = value.rpartition(":")
        if not sep or (":" in host and not _is_ipv6(host)):
            raise UsageError(expected)
    if not port.isdigit():
        raise UsageError(expected)
    if int(port) > 65535:
        raise UsageError(f"{option} {text!r}: port {port} is out of range (0-65535)")
    if host in ("", "0"):
        host = ANY_HOST
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) only reaches this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True
