"""NBD URLs: what ``lifeboat serve`` prints is what the target drivers parse, in both directions."""

from __future__ import annotations

import pytest

from lifeboat.plumbing.errors import UsageError
from lifeboat.plumbing.nbd import DEFAULT_PORT, NbdUrl


@pytest.mark.parametrize(
    ("url", "text"),
    [
        (NbdUrl("127.0.0.1", 10809, "web01"), "nbd://127.0.0.1:10809/web01"),
        (NbdUrl("::1", 5, "a b/c"), "nbd://[::1]:5/a%20b%2Fc"),
        (NbdUrl("host.example", 1, "", tls=True), "nbds://host.example:1/"),
        (NbdUrl("10.0.0.1", 65535, "lifeboat-0123abcd@x"), "nbd://10.0.0.1:65535/lifeboat-0123abcd%40x"),
    ],
)
def test_build_and_parse_round_trip(url: NbdUrl, text: str) -> None:
    assert str(url) == text
    assert NbdUrl.parse(text) == url


def test_parse_defaults_and_tolerance() -> None:
    assert NbdUrl.parse("nbd://host") == NbdUrl("host", DEFAULT_PORT, "")
    assert NbdUrl.parse("nbd://[::1]/disk") == NbdUrl("::1", DEFAULT_PORT, "disk")
    assert NbdUrl.parse("nbd://h:1/a%2Fb\n") == NbdUrl("h", 1, "a/b")
    # libnbd's query parameters are the client's business
    assert NbdUrl.parse("nbds://h:2/x?tls-certificates=/etc/pki") == NbdUrl("h", 2, "x", tls=True)


@pytest.mark.parametrize(
    "text",
    ["http://h:1/x", "h:1/x", "nbd://", "nbd://:1/x", "nbd://h:port/x", "nbd://h:0/x", "nbd://h:70000/x",
     "nbd://::1:5/x", "nbd://[::1/x", "nbd://[::1]5/x"],
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(UsageError, match=r"NBD URL|IPv6|TCP port|no host"):
        NbdUrl.parse(text)
