"""Fuzz the NBD server's handshake: client flags and the option haggling phase.

Why: ``lifeboat serve`` listens on the recovery network, and the handshake is what any client
reaches before it has proven anything (with TLS required, before STARTTLS): option lengths,
export names, NBD_OPT_INFO/GO information requests and meta context queries are all parsed from
the client's bytes. Every input must end in replies and a clean close, never an internal error,
a hang or memory the server keeps charged (oracles in ``fuzz/nbd_harness.py``).

An input is the whole stream a client sends after reading the greeting: 4 bytes of client flags,
then options (IHAVEOPT magic, option, length, data), possibly followed by transmission requests.
"""

from __future__ import annotations

from fuzz.nbd_harness import serve_stream
from lifeboat.plumbing import nbd as P


def test_one_input(data: bytes) -> None:
    session = serve_stream(data)
    assert session.out[:16] == P.SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE
                                                      | P.FLAG_NO_ZEROES)[:16], "no greeting first"
