"""The one listen-address grammar: every form a ``--listen`` option took before, and clear refusals."""

from __future__ import annotations

import pytest

from lifeboat.plumbing.errors import UsageError
from lifeboat.plumbing.listen import parse_listen


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:10809", ("127.0.0.1", 10809)),
        ("localhost:0", ("localhost", 0)),
        (" host.example:65535 ", ("host.example", 65535)),
        ("0:0", ("0.0.0.0", 0)),
        (":10809", ("0.0.0.0", 10809)),
        ("[::1]:5000", ("::1", 5000)),
        ("[::]:5000", ("::", 5000)),
        ("::1:9100", ("::1", 9100)),  # unbracketed IPv6, as archive serve took it
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
    ],
)
def test_accepted_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text, "--listen") == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("localhost", "expected HOST:PORT"),
        ("10809", "expected HOST:PORT"),
        ("host:port", "expected HOST:PORT"),
        ("host:", "expected HOST:PORT"),
        ("[::1]", "expected HOST:PORT"),
        ("[::1]5000", "expected HOST:PORT"),
        ("[not-v6]:5000", "expected HOST:PORT"),
        ("a:b:5000", "expected HOST:PORT"),
        ("127.0.0.1:-1", "expected HOST:PORT"),
        ("127.0.0.1:99999", "out of range"),
    ],
)
def test_refusals_name_the_option(text: str, words: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_listen(text, "--metrics-listen")
    assert str(e.value).startswith(f"--metrics-listen {text!r}: ") and words in str(e.value)
    assert e.value.exit_code == 2
