"""Fuzz the NBD server's transmission phase: request parsing and the replies it leads to.

Why: once a client has negotiated an export, every request header (magic, flags, command,
offset, length) and every write payload comes straight from the network into
``Connection._process``, the hot path that parses pipelined requests in place, answers reads
from memory and sends the rest to threads, under the memory bounds of issue 18. Any bytes must
give error replies or a disconnect, never an internal error, a hang, or memory left charged
after the client goes (oracles in ``fuzz/nbd_harness.py``).

An input's first byte chooses the session: bit 0 structured replies with the base:allocation
meta context, bit 1 a writable export, bit 2 a client that does not read its replies (the server
is told to pause writing), bits 3-5 the size of the pieces the stream arrives in (0: at once,
else 2**n bytes). The rest is what the client sends after a valid NBD_OPT_GO.
"""

from __future__ import annotations

from fuzz.nbd_harness import serve_stream
from lifeboat.plumbing import nbd as P


def handshake(structured: bool) -> bytes:
    """A valid client handshake up to the transmission phase for the export ``fuzz``."""
    out = P.CLIENT_FLAGS.pack(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
    if structured:
        meta = P.U32.pack(4) + b"fuzz" + P.U32.pack(1) + P.U32.pack(len(P.META_BASE_ALLOCATION)) \
            + P.META_BASE_ALLOCATION.encode()
        out += P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_STRUCTURED_REPLY, 0)
        out += P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_SET_META_CONTEXT, len(meta)) + meta
    go = P.U32.pack(4) + b"fuzz" + P.U16.pack(0)
    return out + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(go)) + go


def test_one_input(data: bytes) -> None:
    if not data:
        return
    config = data[0]
    bits = (config >> 3) & 7
    serve_stream(handshake(bool(config & 1)) + data[1:], writable=bool(config & 2), stalled=bool(config & 4),
                 piece=(1 << bits) if bits else 0)
