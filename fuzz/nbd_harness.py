"""The NBD server in-process for the fuzz targets ``fuzz_nbd_options`` and ``fuzz_nbd_requests``.

A real ``Connection`` of ``lifeboat.nbdserver.server`` over a transport that only records what
the server writes, on one private event loop: no sockets, so an input costs microseconds and
every byte reaches the parser exactly as the fuzzer made it. The server catches every exception
a request or an option raises (a bug must not take it down) and logs it, so the oracle is the
log: an "internal error" or a request that "failed" on the in-memory volume (which fails only
with ``VolumeError``, answered without logging) is a finding. So is memory accounting that does
not return to zero once the client has gone (the server's bound would creep), and a connection
that neither finishes nor waits for more input.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from lifeboat.nbdserver.server import Connection, Export, NBDServer
from lifeboat.nbdserver.volume import Extents, Volume, VolumeError
from lifeboat.plumbing import nbd as P

SIZE = 256 * 1024
MAX_PAYLOAD = 64 * 1024  # small, so a fuzzed length cannot make an input costly
HIGH_WATER = 64 * 1024  # the stalled transport's "pause_writing" mark, as asyncio's default
ROUNDS = 8  # drain-and-resume rounds of a stalled client before it hangs up


class MemoryVolume(Volume):
    """256 KiB in memory; reads at multiples of 3 KiB take the slow (thread pool) path."""

    max_payload = MAX_PAYLOAD
    description = "fuzz"

    def __init__(self, writable: bool) -> None:
        self.data = bytearray(SIZE)
        self.data[: SIZE // 2] = bytes(range(256)) * (SIZE // 512)
        self.size = SIZE
        self.writable = writable

    def can_write(self) -> bool:
        return self.writable

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def read_fast(self, offset: int, length: int) -> bytes | None:
        return None if offset % 3072 == 0 else self.read(offset, length)

    def reads_zero(self, offset: int, length: int) -> bool:
        return offset >= SIZE // 2 and not any(self.data[offset : offset + length])

    def extents(self, offset: int, length: int) -> Extents:
        return [(SIZE // 2 - offset, 0), (SIZE // 2, P.STATE_HOLE)] if offset < SIZE // 2 else [(SIZE - offset, 0)]

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.data[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool) -> None:
        if fast:
            raise VolumeError(P.ENOTSUP, "no fast zeroing here")
        self.data[offset : offset + length] = bytes(length)

    def trim(self, offset: int, length: int, *, fua: bool) -> None:
        self.zero(offset, length, fua=fua, may_trim=True, fast=False)


class RecordingTransport(asyncio.Transport):
    """Keeps what the server writes; ``stalled``: a client that does not read, so the buffer
    grows and the server is told to pause writing past ``HIGH_WATER``."""

    def __init__(self, protocol: Connection, loop: asyncio.AbstractEventLoop, stalled: bool) -> None:
        super().__init__()
        self.protocol = protocol
        self.loop = loop
        self.stalled = stalled
        self.out = bytearray()
        self.unsent = 0
        self.paused = False
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        self.out += data
        if self.stalled:
            self.unsent += len(data)
            if self.unsent > HIGH_WATER and not self.paused:
                self.paused = True
                self.protocol.pause_writing()

    def drain(self) -> None:
        """The client reads everything sent so far."""
        self.unsent = 0
        if self.paused:
            self.paused = False
            self.protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("fuzz", 0) if name == "peername" else default


@dataclass
class Session:
    """What one client stream did: the server's bytes and its log."""

    out: bytes
    log: list[str] = field(default_factory=list)


_LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(_LOOP)
_LOG: list[str] = []
_SERVER = NBDServer([], log=_LOG.append, workers=2)
_SERVER.loop = _LOOP


async def _settle(conn: Connection) -> None:
    """Let the loop run until the connection waits for input (or has gone) with no request left
    on the thread pool; a connection still busy after 10 s is a finding (TimeoutError)."""
    for _ in range(4):
        await asyncio.sleep(0)
    async with asyncio.timeout(10):
        while conn._inflight:
            await asyncio.sleep(0.0005)
    for _ in range(4):
        await asyncio.sleep(0)


def serve_stream(data: bytes, *, writable: bool = False, stalled: bool = False, piece: int = 0) -> Session:
    """Feed ``data`` as everything one client sends (in pieces of ``piece`` bytes, 0: at once),
    then end of file; raise AssertionError on a finding."""
    _LOG.clear()
    _SERVER.held = 0  # a finding of the previous input must not fail this one
    _SERVER.waiting.clear()
    _SERVER.connections.clear()
    _SERVER.exports = {"fuzz": Export("fuzz", MemoryVolume(writable))}
    _SERVER.default = _SERVER.exports["fuzz"]
    conn = Connection(_SERVER)
    transport = RecordingTransport(conn, _LOOP, stalled)
    conn.connection_made(transport)
    step = piece or max(len(data), 1)
    for pos in range(0, len(data), step):
        if transport.closed:
            break
        conn.data_received(data[pos : pos + step])
        _LOOP.run_until_complete(_settle(conn))
    if not transport.closed:
        conn.eof_received()
    for _ in range(ROUNDS):
        _LOOP.run_until_complete(_settle(conn))
        if transport.closed or not transport.paused:
            break
        transport.drain()
    task = conn.handshake_task
    assert task is not None
    if not task.done():
        _LOOP.run_until_complete(asyncio.wait_for(task, 10))
    transport.close()  # the client hangs up, whatever is left
    _LOOP.run_until_complete(_settle(conn))
    session = Session(bytes(transport.out), list(_LOG))
    bad = [m for m in session.log if "internal error" in m or " failed: " in m]
    assert not bad, f"the server logged an internal failure: {bad}"
    assert _SERVER.held == 0 and not _SERVER.waiting, \
        f"{_SERVER.held} bytes still charged after the client left (waiting: {len(_SERVER.waiting)})"
    assert not _SERVER.connections, "a connection outlived its transport"
    return session
