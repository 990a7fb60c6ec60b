"""The NBD protocol server: fixed newstyle handshake, TLS, structured replies, block status.

One asyncio event loop serves every connection. Each connection is an ``asyncio.Protocol``:
the handshake runs as a coroutine (readable, linear), the transmission phase is parsed directly
in ``data_received`` so a request whose data is at hand (decoded chunk in memory, local file)
is answered without a task, a future or a thread hop. Anything that may block (archive fetch,
copy-up, fsync) runs on a thread pool and replies when done; replies may come out of order,
as the protocol allows.

Memory is bounded by the server, not by its clients. Every READ (its length: a 32 MiB read
counts 32 MiB from the moment it is accepted) and WRITE (its payload, from its header on) is
charged while its data is in the server's hands, and so are replies the client has not read yet
(the transport's write buffer, once it passes the high-water mark). A connection stops reading
requests while its next one would take it past ``client_memory`` (default 64 MiB) or the whole
server past ``memory`` (default 256 MiB); it resumes when its replies drain, its requests finish
or another connection gives memory back. A connection holding nothing may always take one
request, so one maximum-size request is always served; the bound is therefore
``max(memory, 32 MiB)`` of request and reply data, plus transients (one reply being copied into
a transport buffer, one socket read of input per connection) and the decoded-chunk cache sized
by ``--cache-size``. While clients that never read their replies hold the whole server budget,
other clients' requests wait until they leave: the price of a hard bound. When a connection
goes, its buffers are dropped and the C allocator is asked to return free memory to the system
(``NBDServer.give_back``). Figures: ``bench/nbd_flood_bench.py``.

A client that breaks the protocol (bad magic, unknown client flags, an oversized payload) is
disconnected; a request that is merely wrong (beyond the export, bad flags) gets an error
reply with a message. Neither touches any other connection or the archive.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import socket
import ssl
import struct
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lifeboat.nbdserver.volume import Volume, VolumeError
from lifeboat.plumbing import nbd as P

HANDSHAKE_TIMEOUT = 60.0
MAX_OPTION_LENGTH = 64 * 1024
MAX_OPTIONS = 1024
MAX_INFLIGHT = 128
READ_BUFFER_LIMIT = 64 * 1024 * 1024
MiB = 1024 * 1024
SERVER_MEMORY = 256 * MiB  # request and reply data held for all clients
CLIENT_MEMORY = 64 * MiB  # ... and for any one connection (two maximum-size reads)
TRIM_AFTER = 4 * MiB  # a connection that held this much calls malloc_trim when it goes
META_CONTEXT_ID = 1
CLOSE_GRACE = 5.0
BATCH_PIECE = 64 * 1024
BATCH_FLUSH = 256 * 1024


@dataclass
class Export:
    """A named volume as clients see it."""

    name: str
    volume: Volume
    description: str = ""


def _default_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Hangup(Exception):
    """The handshake ends without a transmission phase (client left, or must be dropped)."""


@dataclass
class _Request:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int
    payload: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)
    cost: int = 0  # bytes charged to the memory bounds while the request runs


class Connection(asyncio.Protocol):
    """One client: handshake coroutine, then request parsing in ``data_received``."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._buf = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._phase = "handshake"
        self._paused: set[str] = set()
        self._reading_paused = False
        self._inflight = 0
        self._disconnecting = False
        self._closed = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._batching = False
        self._out: list[bytes] = []
        self._out_size = 0
        # memory accounting (see the module docstring)
        self._charged = 0  # requests in progress: reads' lengths, writes' payloads
        self._queued = 0  # unsent replies in the transport's buffer, while it is over high water
        self._write_blocked = False
        self._reserved = 0  # the WRITE whose payload is arriving
        self._held_much = False  # ever held TRIM_AFTER bytes: give memory back when it goes
        # negotiated state
        self.tls = False
        self.no_zeroes = False
        self.structured = False
        self.meta_export: str | None = None
        self.export: Export | None = None
        self.volume: Volume | None = None
        self.tflags = 0
        self.handshake_task: asyncio.Task[None] | None = None

    # -- transport callbacks -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        self.handshake_task = self.loop.create_task(self._handshake_guarded())

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._phase == "transmission":
            self._process()
        else:
            if len(self._buf) > MAX_OPTION_LENGTH * 2:
                self._pause("buffer")
            self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        if self._phase == "transmission":
            self._maybe_close()
            # half-open: requests already received are still answered (TLS cannot half-close)
            return None if self.tls else True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._eof = True
        self._wake()
        self.server.connections.discard(self)
        self.server.waiting.pop(self, None)
        self._drained.set()
        self._buf = bytearray()
        self._out = []
        self._out_size = 0
        self._set_queued(0)
        if self._reserved:
            self._account(-self._reserved)
            self._reserved = 0
        if self._held_much:
            self.server.give_back()

    def pause_writing(self) -> None:
        self._write_blocked = True
        if self.transport is not None:
            self._set_queued(self.transport.get_write_buffer_size())
        self._pause("write")

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._set_queued(0)
        self._resume("write")
        self._retry_memory()

    # -- memory bounds -----------------------------------------------------------------------
    def _account(self, delta: int) -> None:
        server = self.server
        server.held += delta
        if delta < 0 and server.waiting:
            server.wake_waiting()

    def _set_queued(self, n: int) -> None:
        if n != self._queued:
            self._account(n - self._queued)
            self._queued = n
            if n >= TRIM_AFTER:
                self._held_much = True

    def _charge(self, n: int) -> None:
        self._charged += n
        self._account(n)
        if n >= TRIM_AFTER:
            self._held_much = True

    def _release(self, n: int) -> None:
        self._charged -= n
        self._account(-n)

    def _fits(self, n: int) -> bool:
        """Whether a request costing ``n`` bytes may start now; if not, stop reading until memory
        is given back (by this connection, or by any when the server's bound is what stops it)."""
        server = self.server
        mine = self._charged + self._queued
        if mine and mine + n > server.client_memory:
            self._pause("memory")
            return False
        if server.held and server.held + n > server.memory:
            self._pause("memory")
            server.waiting[self] = None
            return False
        return True

    def _retry_memory(self) -> None:
        if "memory" in self._paused and not self._closed:
            self._resume("memory")

    # -- plumbing ----------------------------------------------------------------------------
    def _pause(self, why: str) -> None:
        self._paused.add(why)
        if not self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = True
            with contextlib.suppress(Exception):
                self.transport.pause_reading()

    def _resume(self, why: str) -> None:
        self._paused.discard(why)
        if not self._paused and self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = False
            with contextlib.suppress(Exception):
                self.transport.resume_reading()
        if not self._paused and self._phase == "transmission":
            if self._buf:
                self._process()
            elif self._eof:
                self._maybe_close()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _write(self, data: bytes) -> None:
        """Send, or while parsing a batch of requests, queue small pieces so that the replies
        to pipelined requests leave in one send() (a syscall per reply halves small-read IOPS);
        large pieces are sent as they are, never copied into a batch."""
        if self._closed or self.transport is None:
            return
        if self._batching and len(data) <= BATCH_PIECE:
            self._out.append(data)
            self._out_size += len(data)
            if self._out_size >= BATCH_FLUSH:
                self._flush_out()
            return
        if self._out:
            self._flush_out()
        self.transport.write(data)
        if self._write_blocked:
            self._set_queued(self.transport.get_write_buffer_size())

    def _flush_out(self) -> None:
        out = self._out
        if out and not self._closed and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        self._out = []
        self._out_size = 0

    def _close(self) -> None:
        """Close after sending every reply written or batched so far."""
        if not self._closed and self.transport is not None:
            self._flush_out()
            self._closed = True
            self.transport.close()

    def _maybe_close(self) -> None:
        """Close once the client has disconnected (NBD_CMD_DISC, or EOF) and every request it
        sent before is answered (doc/proto.md: the server MUST handle all outstanding requests)."""
        if self._inflight or self._closed:
            return
        if self._disconnecting or (self._eof and not (self._paused and self._buf)):
            self._close()

    def abort(self) -> None:
        """Drop the connection now (server shutdown, protocol violation)."""
        if self.transport is not None:
            self._closed = True
            self.transport.abort()

    def _log(self, message: str) -> None:
        self.server.log(f"nbd: client {self.peer}: {message}")

    # -- handshake ---------------------------------------------------------------------------
    async def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self._eof or self._closed:
                raise _Hangup()
            self._waiter = self.loop.create_future()
            await self._waiter
            self._waiter = None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        if len(self._buf) <= MAX_OPTION_LENGTH:
            self._resume("buffer")
        return data

    async def _handshake_guarded(self) -> None:
        try:
            await asyncio.wait_for(self._handshake(), HANDSHAKE_TIMEOUT)
        except _Hangup:
            self._close()
        except TimeoutError:
            self._log("handshake took too long; disconnected")
            self.abort()
        except (ConnectionError, ssl.SSLError, OSError) as e:
            self._log(f"handshake failed ({e}); disconnected")
            self.abort()
        except Exception as e:  # noqa: BLE001 - a bug must not take the server down
            self._log(f"internal error during handshake ({e!r}); disconnected")
            self.abort()

    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._write(P.option_reply(option, reply, payload))

    def _error(self, option: int, reply: int, message: str) -> None:
        self._reply(option, reply, P.error_message(message))

    async def _handshake(self) -> None:
        self._write(P.SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        (cflags,) = P.CLIENT_FLAGS.unpack(await self._read(4))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            self._log(f"unknown client flags {cflags:#x}; disconnected")
            raise _Hangup()
        self.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        tls_required = self.server.tls is not None
        for _ in range(MAX_OPTIONS):
            magic, option, length = P.OPTION_HEADER.unpack(await self._read(P.OPTION_HEADER.size))
            if magic != P.IHAVEOPT:
                self._log("bad option magic; disconnected")
                raise _Hangup()
            if length > MAX_OPTION_LENGTH:
                self._log(f"option {option} with {length} bytes of data; disconnected")
                raise _Hangup()
            data = await self._read(length)
            if self.server.closing:
                if option == P.OPT_ABORT:
                    self._reply(option, P.REP_ACK)
                    raise _Hangup()
                self._error(option, P.REP_ERR_SHUTDOWN, "the server is shutting down")
                continue
            if tls_required and not self.tls and option not in (P.OPT_STARTTLS, P.OPT_ABORT):
                if option == P.OPT_EXPORT_NAME:
                    self._log("NBD_OPT_EXPORT_NAME without TLS; disconnected")
                    raise _Hangup()
                self._error(option, P.REP_ERR_TLS_REQD, "this server requires TLS: use NBD_OPT_STARTTLS first")
                continue
            if await self._option(option, data):
                self._enter_transmission()
                return
        self._log("too many options; disconnected")
        raise _Hangup()

    async def _option(self, option: int, data: bytes) -> bool:
        """Handle one option; True when the transmission phase begins."""
        if option == P.OPT_EXPORT_NAME:
            export = self.server.lookup(data.decode("utf-8", errors="replace"))
            if export is None:
                self._log(f"NBD_OPT_EXPORT_NAME for unknown export {data[:100]!r}; disconnected")
                raise _Hangup()
            self._select(export)
            assert self.volume is not None
            reply = P.EXPORT_NAME_REPLY.pack(self.volume.size, self.tflags)
            self._write(reply if self.no_zeroes else reply + bytes(124))
            return True
        if option == P.OPT_ABORT:
            self._reply(option, P.REP_ACK)
            raise _Hangup()
        if option == P.OPT_LIST:
            if data:
                self._error(option, P.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return False
            for export in self.server.exports.values():
                raw = export.name.encode()
                self._reply(option, P.REP_SERVER, P.U32.pack(len(raw)) + raw + export.description.encode()[:1024])
            self._reply(option, P.REP_ACK)
            return False
        if option == P.OPT_STARTTLS:
            await self._starttls(data)
            return False
        if option in (P.OPT_INFO, P.OPT_GO):
            return self._info(option, data)
        if option == P.OPT_STRUCTURED_REPLY:
            if data:
                self._error(option, P.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.structured:
                self._error(option, P.REP_ERR_INVALID, "structured replies are already negotiated")
            else:
                self.structured = True
                self._reply(option, P.REP_ACK)
            return False
        if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
            return False
        self._error(option, P.REP_ERR_UNSUP,
                    f"option {P.OPTION_NAMES.get(option, str(option))} is not supported by this server")
        return False

    async def _starttls(self, data: bytes) -> None:
        option = P.OPT_STARTTLS
        if self.server.tls is None:
            self._error(option, P.REP_ERR_POLICY, "TLS is not configured on this server")
            return
        if data:
            self._error(option, P.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return
        if self.tls:
            self._error(option, P.REP_ERR_INVALID, "TLS is already active")
            return
        if self._buf:
            self._log("data sent before the TLS handshake; disconnected")
            raise _Hangup()
        self._reply(option, P.REP_ACK)
        assert self.transport is not None
        self.transport.pause_reading()
        new = await self.loop.start_tls(self.transport, self, self.server.tls, server_side=True,
                                        ssl_handshake_timeout=30)
        if new is None:
            raise _Hangup()
        self.transport = new
        self._reading_paused = False
        self._paused.clear()
        self.tls = True
        self.structured = False  # the spec: nothing negotiated before STARTTLS survives it
        self.meta_export = None

    def _select(self, export: Export) -> None:
        self.export = export
        self.volume = vol = export.volume
        f = P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_CACHE
        if vol.can_multi_conn():
            f |= P.TFLAG_CAN_MULTI_CONN
        if vol.can_write():
            f |= P.TFLAG_SEND_FUA | P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES | P.TFLAG_SEND_FAST_ZERO
        else:
            f |= P.TFLAG_READ_ONLY
        if self.structured:
            f |= P.TFLAG_SEND_DF
        self.tflags = f

    def _info(self, option: int, data: bytes) -> bool:
        if len(data) < 6:
            self._error(option, P.REP_ERR_INVALID, "option data too short")
            return False
        (nlen,) = P.U32.unpack_from(data)
        if nlen > len(data) - 6:
            self._error(option, P.REP_ERR_INVALID, "export name length exceeds the option data")
            return False
        raw_name = data[4 : 4 + nlen]
        (ninfo,) = P.U16.unpack_from(data, 4 + nlen)
        if len(data) != 6 + nlen + 2 * ninfo:
            self._error(option, P.REP_ERR_INVALID, "number of information requests does not match the data")
            return False
        requests = {P.U16.unpack_from(data, 6 + nlen + 2 * k)[0] for k in range(ninfo)}
        name = raw_name.decode("utf-8", errors="replace")
        export = self.server.lookup(name)
        if export is None:
            known = ", ".join(repr(n) for n in self.server.exports) or "none"
            self._error(option, P.REP_ERR_UNKNOWN, f"no export named {name!r} on this server (exports: {known})")
            return False
        self._select(export)
        vol = export.volume
        self._reply(option, P.REP_INFO, P.INFO_EXPORT_PAYLOAD.pack(P.INFO_EXPORT, vol.size, self.tflags))
        if P.INFO_NAME in requests or name != export.name:
            self._reply(option, P.REP_INFO, P.U16.pack(P.INFO_NAME) + export.name.encode())
        if P.INFO_DESCRIPTION in requests and export.description:
            self._reply(option, P.REP_INFO, P.U16.pack(P.INFO_DESCRIPTION) + P.error_message(export.description))
        self._reply(option, P.REP_INFO, P.INFO_BLOCK_SIZE_PAYLOAD.pack(
            P.INFO_BLOCK_SIZE, vol.minimum_block, vol.preferred_block, vol.max_payload))
        self._reply(option, P.REP_ACK)
        if option == P.OPT_GO:
            if self.meta_export is not None and self.meta_export != export.name:
                self.meta_export = None
            return True
        return False

    def _meta_context(self, option: int, data: bytes) -> None:
        def invalid(why: str) -> None:
            self._error(option, P.REP_ERR_INVALID, why)

        if option == P.OPT_SET_META_CONTEXT:
            self.meta_export = None  # replaced even when the option fails
            if not self.structured:
                invalid("negotiate NBD_OPT_STRUCTURED_REPLY before NBD_OPT_SET_META_CONTEXT")
                return
        if len(data) < 8:
            invalid("option data too short")
            return
        (nlen,) = P.U32.unpack_from(data)
        if 4 + nlen + 4 > len(data):
            invalid("export name length exceeds the option data")
            return
        name = data[4 : 4 + nlen].decode("utf-8", errors="replace")
        (nq,) = P.U32.unpack_from(data, 4 + nlen)
        pos = 8 + nlen
        queries = []
        for _ in range(nq):
            if pos + 4 > len(data):
                invalid("query list exceeds the option data")
                return
            (qlen,) = P.U32.unpack_from(data, pos)
            if pos + 4 + qlen > len(data) or qlen > P.MAX_STRING:
                invalid("query length exceeds the option data")
                return
            queries.append(data[pos + 4 : pos + 4 + qlen].decode("utf-8", errors="replace"))
            pos += 4 + qlen
        if pos != len(data):
            invalid("trailing bytes after the queries")
            return
        export = self.server.lookup(name)
        if export is None:
            self._error(option, P.REP_ERR_UNKNOWN, f"no export named {name!r} on this server")
            return
        if option == P.OPT_LIST_META_CONTEXT:
            match = not queries or any(q in ("base:", P.META_BASE_ALLOCATION) for q in queries)
        else:
            match = P.META_BASE_ALLOCATION in queries
        if match:
            ctx = P.META_BASE_ALLOCATION.encode()
            ctx_id = 0 if option == P.OPT_LIST_META_CONTEXT else META_CONTEXT_ID
            self._reply(option, P.REP_META_CONTEXT, P.U32.pack(ctx_id) + ctx)
            if option == P.OPT_SET_META_CONTEXT:
                self.meta_export = export.name
        self._reply(option, P.REP_ACK)

    def _enter_transmission(self) -> None:
        self._phase = "transmission"
        self._log_debug("transmission")
        if self._buf:
            self._process()
        if self._eof:
            self._maybe_close()

    def _log_debug(self, message: str) -> None:
        if self.server.debug:
            self._log(message)

    # -- transmission ------------------------------------------------------------------------
    def _process(self) -> None:
        buf = self._buf
        pos = 0
        hdr = P.REQUEST
        n = len(buf)
        vol = self.volume
        assert vol is not None
        size = vol.size
        max_fast = vol.max_payload
        structured = self.structured
        fast_mask = ~P.CMD_FLAG_DF if structured else -1
        self._batching = True
        try:
            while not self._paused and not self._disconnecting and not self._closed and n - pos >= 28:
                magic, flags, cmd, cookie, offset, length = hdr.unpack_from(buf, pos)
                if magic != P.REQUEST_MAGIC:
                    self._log(f"bad request magic {magic:#x}; disconnected")
                    self.abort()
                    return
                if cmd == P.CMD_WRITE:
                    if length > self._max_write():
                        self._log(f"write of {length} bytes exceeds the maximum payload; disconnected")
                        self.abort()
                        return
                    if not self._reserved and length:
                        if not self._fits(length):
                            break
                        self._reserved = length
                        self._charge(length)
                    if n - pos < 28 + length:
                        break
                    payload = bytes(buf[pos + 28 : pos + 28 + length])
                    pos += 28 + length
                    if self._reserved:
                        self._release(self._reserved)  # charged again as the payload, if it runs
                        self._reserved = 0
                    self._request(flags, cmd, cookie, offset, length, payload)
                else:
                    if not self._fits(length if cmd == P.CMD_READ and length <= max_fast else 0):
                        break
                    pos += 28
                    if cmd == P.CMD_READ and not flags & fast_mask and 0 < length <= max_fast \
                            and offset + length <= size:
                        # the hot path: no request object, no task, no thread (on any error, the
                        # general path below runs it again and reports it to the client)
                        try:
                            if structured and vol.reads_zero(offset, length):
                                self._write(_HOLE_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                                             P.REPLY_TYPE_OFFSET_HOLE, cookie, 12, offset, length))
                                continue
                            data = vol.read_fast(offset, length)
                        except Exception:  # noqa: BLE001
                            data = None
                        if data is not None:
                            self._read_reply(cookie, offset, data)
                            continue
                    self._request(flags, cmd, cookie, offset, length, b"")
        finally:
            self._batching = False
            self._flush_out()
            if pos:
                del buf[:pos]
        if len(buf) > READ_BUFFER_LIMIT:
            self._pause("buffer")
        elif "buffer" in self._paused and len(buf) <= READ_BUFFER_LIMIT // 2:
            self._resume("buffer")
        if self._eof or self._disconnecting:
            self._maybe_close()

    def _max_write(self) -> int:
        return self.volume.max_payload if self.volume is not None else 0

    def _simple(self, cookie: int, error: int = 0, data: bytes = b"") -> None:
        self._write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, error, cookie))
        if data:
            self._write(data)

    def _fail(self, req: _Request, error: int, message: str) -> None:
        if self.structured:
            self._write(P.structured_error(req.cookie, error, message))
        else:
            self._simple(req.cookie, error)

    def _read_reply(self, cookie: int, offset: int, data: bytes) -> None:
        if self.structured:
            head = _DATA_HEADER.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA,
                                     cookie, 8 + len(data), offset)
        else:
            head = P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie)
        if len(data) <= BATCH_PIECE:
            self._write(head + data)
        else:
            self._write(head)
            self._write(data)

    def _request(self, flags: int, cmd: int, cookie: int, offset: int, length: int, payload: bytes) -> None:
        vol = self.volume
        assert vol is not None
        req = _Request(flags, cmd, cookie, offset, length, payload)
        if cmd == P.CMD_DISC:
            self._disconnecting = True
            self._maybe_close()
            return
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            self._fail(req, P.EINVAL, f"unknown command {cmd}")
            return
        if self.tflags & P.TFLAG_SEND_FUA:
            allowed |= P.CMD_FLAG_FUA
        if cmd == P.CMD_READ and self.structured:
            allowed |= P.CMD_FLAG_DF
        if flags & ~allowed:
            self._fail(req, P.EINVAL, f"flags {flags:#x} are not valid for NBD_CMD_{P.COMMAND_NAMES[cmd]}")
            return
        writes = cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM)
        if writes and not vol.can_write():
            self._fail(req, P.EPERM, "the export is read-only")
            return
        if cmd != P.CMD_FLUSH and offset + length > vol.size:
            error = P.ENOSPC if cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            self._fail(req, error, f"{length} bytes at offset {offset} lie beyond the end of the export "
                                   f"({vol.size} bytes)")
            return
        try:
            if cmd == P.CMD_READ:
                self._cmd_read(req, vol)
            elif cmd == P.CMD_BLOCK_STATUS:
                self._cmd_block_status(req, vol)
            elif cmd == P.CMD_CACHE:
                if length:
                    vol.cache(offset, length)
                self._simple(cookie)
            elif cmd == P.CMD_FLUSH:
                self._slow(req, vol.flush)
            elif cmd == P.CMD_WRITE:
                self._slow(req, vol.write, offset, payload, bool(flags & P.CMD_FLAG_FUA))
            elif cmd == P.CMD_WRITE_ZEROES:
                self._slow(req, lambda: vol.zero(offset, length, fua=bool(flags & P.CMD_FLAG_FUA),
                                                 may_trim=not flags & P.CMD_FLAG_NO_HOLE,
                                                 fast=bool(flags & P.CMD_FLAG_FAST_ZERO)))
            elif cmd == P.CMD_TRIM:
                self._slow(req, lambda: vol.trim(offset, length, fua=bool(flags & P.CMD_FLAG_FUA)))
        except VolumeError as e:
            self._fail(req, e.error, str(e))
        except Exception as e:  # noqa: BLE001 - reported to the client, logged, server goes on
            self._log(f"NBD_CMD_{P.COMMAND_NAMES.get(cmd, cmd)} at {offset}+{length} failed: {e}")
            self._fail(req, P.EIO, str(e))

    def _cmd_read(self, req: _Request, vol: Volume) -> None:
        offset, length = req.offset, req.length
        if length > vol.max_payload:
            self._fail(req, P.EOVERFLOW if self.structured else P.EINVAL,
                       f"read of {length} bytes exceeds the maximum payload ({vol.max_payload})")
            return
        if length == 0:
            if self.structured:
                self._write(P.structured_header(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, req.cookie, 0))
            else:
                self._simple(req.cookie)
            return
        if self.structured and vol.reads_zero(offset, length):
            self._write(P.structured_header(P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_HOLE, req.cookie, 12)
                        + P.HOLE_PAYLOAD.pack(offset, length))
            return
        try:
            data = vol.read_fast(offset, length)
        except Exception:  # noqa: BLE001 - the blocking read reports the error, if it persists
            data = None
        if data is not None:
            self._read_reply(req.cookie, offset, data)
            return
        self._slow(req, vol.read, offset, length)

    def _cmd_block_status(self, req: _Request, vol: Volume) -> None:
        if not self.structured or self.meta_export is None or self.export is None \
                or self.meta_export != self.export.name:
            self._fail(req, P.EINVAL, "NBD_CMD_BLOCK_STATUS needs the base:allocation meta context")
            return
        if req.length == 0:
            self._fail(req, P.EINVAL, "NBD_CMD_BLOCK_STATUS of zero bytes")
            return
        extents = vol.extents(req.offset, req.length)
        out = []
        left = req.length
        for n, flags in extents:
            if left <= 0:
                break
            n = min(n, left)
            if n <= 0:
                continue
            out.append(P.EXTENT.pack(n, flags))
            left -= n
            if req.flags & P.CMD_FLAG_REQ_ONE or len(out) >= 1 << 20:
                break
        if not out:
            out.append(P.EXTENT.pack(req.length, 0))
        payload = P.U32.pack(META_CONTEXT_ID) + b"".join(out)
        self._write(P.structured_header(P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, req.cookie, len(payload))
                    + payload)

    def _slow(self, req: _Request, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the pool and reply when it completes."""
        self._inflight += 1
        self._drained.clear()
        req.cost = req.length if req.cmd == P.CMD_READ else len(req.payload)
        self._charge(req.cost)
        if self._inflight >= MAX_INFLIGHT:
            self._pause("inflight")
        fut = self.loop.run_in_executor(self.server.pool, fn, *args)
        fut.add_done_callback(lambda f: self._done(req, f))

    def _done(self, req: _Request, fut: asyncio.Future[Any]) -> None:
        self._inflight -= 1
        self._release(req.cost)
        exc = fut.exception()  # retrieved even when the client has gone, or asyncio logs it
        if not self._closed:
            if exc is None:
                if req.cmd == P.CMD_READ:
                    self._read_reply(req.cookie, req.offset, fut.result())
                else:
                    self._simple(req.cookie)
            elif isinstance(exc, VolumeError):
                self._fail(req, exc.error, str(exc))
            else:
                error = P.ENOSPC if isinstance(exc, OSError) and exc.errno in (28, 122, 27) else P.EIO
                self._log(f"NBD_CMD_{P.COMMAND_NAMES.get(req.cmd, req.cmd)} at {req.offset}+{req.length} "
                          f"failed: {exc}")
                self._fail(req, error, str(exc))
        if self._inflight == 0:
            self._drained.set()
            if self._disconnecting or self._eof:
                self._maybe_close()
                if self._closed:
                    return
        if "inflight" in self._paused and self._inflight < MAX_INFLIGHT // 2:
            self._resume("inflight")
        self._retry_memory()

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for requests in flight to finish."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        fn: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        return None
    return fn


_TRIM = _malloc_trim()
_DATA_HEADER = struct.Struct(">IHHQIQ")  # structured reply header + OFFSET_DATA offset
_HOLE_REPLY = struct.Struct(">IHHQIQI")  # structured reply header + OFFSET_HOLE payload
_ALLOWED_FLAGS = {
    P.CMD_READ: 0,
    P.CMD_WRITE: 0,
    P.CMD_FLUSH: 0,
    P.CMD_TRIM: 0,
    P.CMD_CACHE: 0,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_REQ_ONE,
}


class NBDServer:
    """Serves a set of exports on one listening socket until ``close()``.

    Lifecycle: ``await start(host, port)`` (returns the address actually bound, so port 0
    picks a free one), serve, ``await close()`` (stops listening, lets requests in flight
    finish, disconnects clients). Closing the exports' volumes is the caller's job.
    """

    def __init__(self, exports: list[Export], *, tls: ssl.SSLContext | None = None,
                 log: Callable[[str], None] = _default_log, workers: int = 8, debug: bool = False,
                 memory: int = SERVER_MEMORY, client_memory: int = CLIENT_MEMORY) -> None:
        self.exports = {e.name: e for e in exports}
        self.default = exports[0] if exports else None
        self.tls = tls
        self.log = log
        self.debug = debug
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="nbd-io")
        self.connections: set[Connection] = set()
        self.closing = False
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self.memory = memory
        self.client_memory = client_memory
        self.held = 0  # bytes charged by every connection (see the module docstring)
        self.waiting: dict[Connection, None] = {}  # stopped by the server's bound, in order
        self._wake_pending = False

    def wake_waiting(self) -> None:
        """Soon, let the connections stopped by the server's bound try again (memory came back)."""
        if not self._wake_pending:
            self._wake_pending = True
            self.loop.call_soon(self._wake_next)

    def _wake_next(self) -> None:
        """One waiting connection tries again; if it fits, the next one on the loop's next turn.

        One at a time, so that callbacks already queued run in between: a waiting connection
        whose peer has gone learns it only when it sends a reply, and that reply's memory was
        seen to outlive the send until the callbacks queued by the failure (``connection_lost``)
        had run. Waking all 40 waiters of a flood that hung up at once held 1.3 GiB."""
        self._wake_pending = False
        if not self.waiting:
            return
        conn = next(iter(self.waiting))
        del self.waiting[conn]
        conn._retry_memory()
        if conn not in self.waiting and self.waiting:
            self.wake_waiting()

    def give_back(self) -> None:
        """Return freed memory to the system when a connection goes.

        glibc keeps freed heap memory in its arenas (and raises its mmap threshold after a large
        free, so later 32 MiB buffers come from the heap too): without ``malloc_trim`` a server
        that once held a flood's replies stays that large after the clients leave."""
        if _TRIM is not None:
            _TRIM(0)

    def lookup(self, name: str) -> Export | None:
        """The export a client names; the empty name is the default export."""
        if name == "":
            return self.default
        return self.exports.get(name)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; the (host, port) actually bound."""
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(lambda: Connection(self), host, port,
                                                     reuse_address=True, backlog=128)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening, finish requests in flight (bounded), disconnect every client."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        conns = list(self.connections)
        for c in conns:
            if c.handshake_task is not None and not c.handshake_task.done():
                c.handshake_task.cancel()
                c.abort()
        await asyncio.gather(*(c.drain(CLOSE_GRACE) for c in conns))
        for c in conns:
            c._close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self.pool.shutdown(wait=True)
