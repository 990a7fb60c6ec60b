"""A manifest header that is JSON but not a header a point can have is a ``FormatError``, whatever
it holds (both cases were found by fuzzing, ``fuzz/fuzz_manifest.py``)."""

from __future__ import annotations

import hashlib

import pytest

from lifeboat.archive.errors import FormatError
from lifeboat.archive.formats import POINT_HEADER, POINT_MAGIC, parse_point, parse_point_header


def _manifest(header: bytes) -> bytes:
    body = POINT_HEADER.pack(POINT_MAGIC, len(header)) + header
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("header", [
    b'{"size": Infinity, "chunk_size": 4096}',  # int(inf): OverflowError
    b'{"size": 4096, "chunk_size": -Infinity}',
    b"[" * 3000 + b"]" * 3000,  # json's recursion: RecursionError
])
def test_odd_headers_are_format_errors(header: bytes) -> None:
    with pytest.raises(FormatError):
        parse_point("p", _manifest(header))
    if header.startswith(b"["):
        with pytest.raises(FormatError):
            parse_point_header("p", _manifest(header))
