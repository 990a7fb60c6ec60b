"""A small NBD client: reads and block status (dirty bitmaps, allocation) from QEMU's NBD server.

Why our own: the only Python binding of libnbd is a Debian package (``python3-libnbd``) that a
virtual environment does not see, and parsing ``nbdinfo --map`` output would leave reads to
another process. The protocol subset needed here is small (NetworkBlockDevice/nbd
``doc/proto.md``): fixed newstyle handshake, ``NBD_OPT_STRUCTURED_REPLY``,
``NBD_OPT_SET_META_CONTEXT``, ``NBD_OPT_GO``, then ``NBD_CMD_READ`` and
``NBD_CMD_BLOCK_STATUS``. One connection is not thread-safe; ``NbdReader`` keeps one per thread.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

from lifeboat.plumbing import nbd as P
from lifeboat.plumbing.errors import LifeboatError

MAX_REQUEST = 32 * 1024 * 1024  # QEMU's maximum block size
MAX_STATUS = 1 << 30  # block status asked in 1 GiB steps (the length field is 32 bits)
# a reply is read in two steps: its magic first, which says which of these follows
_SIMPLE_REST = struct.Struct(">IQ")  # error, cookie: P.SIMPLE_REPLY after its magic
_STRUCTURED_REST = struct.Struct(">HHQI")  # flags, type, cookie, length: P.STRUCTURED_REPLY after its magic


class NbdError(LifeboatError):
    """The NBD server refused something or the connection broke."""


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket (data lands where it belongs: no copies)."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise NbdError("the NBD server closed the connection")
        got += k


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


class NbdConnection:
    """One NBD connection to one export, with optional metadata contexts."""

    def __init__(self, address: str | tuple[str, int], export: str, contexts: tuple[str, ...] = (),
                 timeout: float = 120.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._cookie = 0
        self.contexts: dict[str, int] = {}
        try:
            self.sock.connect(address)
            self._handshake(export, contexts)
        except OSError as e:
            self.sock.close()
            raise NbdError(f"cannot connect to NBD export {export!r} at {address}: {e}") from None
        except NbdError:
            self.sock.close()
            raise

    # -- handshake ---------------------------------------------------------------------------
    def _handshake(self, export: str, contexts: tuple[str, ...]) -> None:
        magic, opt, flags = P.SERVER_GREETING.unpack(_recv_exact(self.sock, P.SERVER_GREETING.size))
        if magic != P.NBDMAGIC or opt != P.IHAVEOPT:
            raise NbdError("not an NBD newstyle server")
        if not flags & P.FLAG_FIXED_NEWSTYLE:
            raise NbdError("the NBD server does not speak fixed newstyle")
        no_zeroes = P.FLAG_C_NO_ZEROES if flags & P.FLAG_NO_ZEROES else 0
        self.sock.sendall(P.CLIENT_FLAGS.pack(P.FLAG_C_FIXED_NEWSTYLE | no_zeroes))
        self._option(P.OPT_STRUCTURED_REPLY, b"")
        self._expect_ack(P.OPT_STRUCTURED_REPLY)
        name = export.encode()
        if contexts:
            body = P.U32.pack(len(name)) + name + P.U32.pack(len(contexts))
            for c in contexts:
                body += P.U32.pack(len(c.encode())) + c.encode()
            self._option(P.OPT_SET_META_CONTEXT, body)
            while True:
                rtype, data = self._reply(P.OPT_SET_META_CONTEXT)
                if rtype == P.REP_ACK:
                    break
                if rtype == P.REP_META_CONTEXT:
                    (cid,) = P.U32.unpack_from(data)
                    self.contexts[data[4:].decode()] = cid
            missing = [c for c in contexts if c not in self.contexts]
            if missing:
                raise NbdError(f"the NBD export {export!r} does not offer {', '.join(missing)}")
        self._option(P.OPT_GO, P.U32.pack(len(name)) + name + P.U16.pack(0))
        self.size = -1
        while True:
            rtype, data = self._reply(P.OPT_GO)
            if rtype == P.REP_ACK:
                break
            if rtype == P.REP_INFO and len(data) >= P.INFO_EXPORT_PAYLOAD.size:
                info, size, flags = P.INFO_EXPORT_PAYLOAD.unpack_from(data)
                if info == P.INFO_EXPORT:
                    self.size, self.flags = size, flags
        if self.size < 0:
            raise NbdError(f"the NBD server sent no size for export {export!r}")

    def _option(self, opt: int, data: bytes) -> None:
        self.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)

    def _reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = P.OPTION_REPLY.unpack(_recv_exact(self.sock, P.OPTION_REPLY.size))
        data = _recv_exact(self.sock, length) if length else b""
        if magic != P.REPLY_MAGIC or ropt != opt:
            raise NbdError("malformed NBD option reply")
        if rtype & P.REP_ERR_BIT:
            raise NbdError(f"the NBD server refused option {opt}: {data.decode(errors='replace') or hex(rtype)}")
        return rtype, data

    def _expect_ack(self, opt: int) -> None:
        rtype, _ = self._reply(opt)
        if rtype != P.REP_ACK:
            raise NbdError(f"unexpected reply {rtype} to option {opt}")

    # -- transmission --------------------------------------------------------------------------
    def _request(self, cmd: int, offset: int, length: int) -> int:
        self._cookie += 1
        self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, cmd, self._cookie, offset, length))
        return self._cookie

    def _chunks(self, cookie: int) -> Iterator[tuple[int, bytes]]:
        """The (type, payload) of each structured reply chunk to a request, until DONE."""
        while True:
            head = _recv_exact(self.sock, 4)
            (magic,) = P.U32.unpack(head)
            if magic == P.SIMPLE_REPLY_MAGIC:
                error, handle = _SIMPLE_REST.unpack(_recv_exact(self.sock, _SIMPLE_REST.size))
                if handle != cookie:
                    raise NbdError("NBD reply to an unknown request")
                if error:
                    raise NbdError(f"NBD request failed with error {error}")
                return
            if magic != P.STRUCTURED_REPLY_MAGIC:
                raise NbdError(f"bad NBD reply magic {magic:#x}")
            flags, rtype, handle, length = _STRUCTURED_REST.unpack(_recv_exact(self.sock, _STRUCTURED_REST.size))
            if handle != cookie:
                raise NbdError("NBD reply to an unknown request")
            payload = _recv_exact(self.sock, length) if length else b""
            if rtype in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
                error, mlen = P.ERROR_HEADER.unpack_from(payload)
                msg = payload[6:6 + mlen].decode(errors="replace")
                raise NbdError(f"NBD request failed with error {error}: {msg}")
            yield rtype, payload
            if flags & P.REPLY_FLAG_DONE:
                return

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (split into requests QEMU accepts)."""
        out = bytearray(length)
        pos = 0
        while pos < length:
            n = min(MAX_REQUEST, length - pos)
            cookie = self._request(P.CMD_READ, offset + pos, n)
            for rtype, payload in self._chunks(cookie):
                if rtype == P.REPLY_TYPE_OFFSET_DATA:
                    (at,) = P.OFFSET_HEADER.unpack_from(payload)
                    rel = at - offset
                    out[rel:rel + len(payload) - 8] = payload[8:]
                elif rtype == P.REPLY_TYPE_OFFSET_HOLE:
                    at, hole = P.HOLE_PAYLOAD.unpack_from(payload)
                    rel = at - offset
                    out[rel:rel + hole] = bytes(hole)
            pos += n
        return bytes(out)

    def read_many(self, reads: Iterator[tuple[int, int]], depth: int = 16,
                  may_send: Callable[[], bool] | None = None) -> Iterator[tuple[int, bytearray]]:
        """Pipelined reads: up to ``depth`` requests in flight (QEMU serves them in parallel, which is
        what random reads of a cold disk need); yields (offset, data) as replies complete. With
        requests in flight, the next one is sent only when ``may_send()`` allows: ``reads`` may
        then block (for memory) without stopping the replies it waits for from being received."""
        pending: dict[int, tuple[int, bytearray]] = {}
        more = True
        while True:
            while more and len(pending) < depth and (not pending or may_send is None or may_send()):
                try:
                    off, n = next(reads)
                except StopIteration:
                    more = False
                    break
                pending[self._request(P.CMD_READ, off, n)] = (off, bytearray(n))
            if not pending:
                return
            (magic,) = P.U32.unpack(_recv_exact(self.sock, 4))
            if magic == P.SIMPLE_REPLY_MAGIC:
                error, handle = _SIMPLE_REST.unpack(_recv_exact(self.sock, _SIMPLE_REST.size))
                if error or handle not in pending:
                    raise NbdError(f"NBD read failed with error {error}")
                off, buf = pending.pop(handle)
                _recv_into(self.sock, memoryview(buf))
                yield off, buf
                continue
            if magic != P.STRUCTURED_REPLY_MAGIC:
                raise NbdError(f"bad NBD reply magic {magic:#x}")
            flags, rtype, handle, length = _STRUCTURED_REST.unpack(_recv_exact(self.sock, _STRUCTURED_REST.size))
            if handle not in pending:
                raise NbdError("NBD reply to an unknown request")
            off, buf = pending[handle]
            if rtype == P.REPLY_TYPE_OFFSET_DATA and length < 8:
                raise NbdError("NBD data reply shorter than its offset")
            # data goes straight into the request's buffer: only its 8-byte offset is read here
            payload = _recv_exact(self.sock, 8 if rtype == P.REPLY_TYPE_OFFSET_DATA else length) if length else b""
            if rtype in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
                error, mlen = P.ERROR_HEADER.unpack_from(payload)
                raise NbdError(f"NBD read failed with error {error}: {payload[6:6 + mlen].decode(errors='replace')}")
            if rtype == P.REPLY_TYPE_OFFSET_DATA:
                (at,) = P.OFFSET_HEADER.unpack(payload)
                if not off <= at <= at + length - 8 <= off + len(buf):
                    raise NbdError(f"NBD reply data at {at} lies outside the request at {off}")
                _recv_into(self.sock, memoryview(buf)[at - off:at - off + length - 8])
            elif rtype == P.REPLY_TYPE_OFFSET_HOLE:
                at, hole = P.HOLE_PAYLOAD.unpack_from(payload)
                buf[at - off:at - off + hole] = bytes(hole)
            if flags & P.REPLY_FLAG_DONE:
                del pending[handle]
                yield off, buf

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (benchmarks and tests apply changes through QEMU this way)."""
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            piece = view[pos:pos + MAX_REQUEST]
            cookie = self._request(P.CMD_WRITE, offset + pos, len(piece))
            self.sock.sendall(piece)
            for _ in self._chunks(cookie):
                pass
            pos += len(piece)

    def flush(self) -> None:
        """Make every write durable."""
        for _ in self._chunks(self._request(P.CMD_FLUSH, 0, 0)):
            pass

    def block_status(self, context: str, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(offset, length, flags) extents of ``context`` covering ``[offset, offset+length)``."""
        cid = self.contexts[context]
        pos, end = offset, offset + length
        while pos < end:
            n = min(MAX_STATUS, end - pos)
            cookie = self._request(P.CMD_BLOCK_STATUS, pos, n)
            advanced = pos
            for rtype, payload in self._chunks(cookie):
                if rtype != P.REPLY_TYPE_BLOCK_STATUS or P.U32.unpack_from(payload)[0] != cid:
                    continue
                at = pos
                for i in range(4, len(payload), 8):
                    elen, eflags = P.EXTENT.unpack_from(payload, i)
                    elen = min(elen, end - at)
                    if elen <= 0:
                        break
                    yield at, elen, eflags
                    at += elen
                advanced = max(advanced, at)
            if advanced == pos:
                raise NbdError(f"the NBD server returned no block status at offset {pos}")
            pos = advanced

    def close(self) -> None:
        """Say goodbye and close."""
        try:
            self._request(P.CMD_DISC, 0, 0)
        except OSError:
            pass
        self.sock.close()


class NbdReader:
    """Thread-safe reads of one export: one connection per thread (QEMU allows many)."""

    def __init__(self, address: str | tuple[str, int], export: str) -> None:
        self.address = address
        self.export = export
        self._local = threading.local()
        self._all: list[NbdConnection] = []
        self._lock = threading.Lock()

    def _conn(self) -> NbdConnection:
        conn: NbdConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = NbdConnection(self.address, self.export)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        try:
            return self._conn().read(offset, length)
        except OSError as e:
            raise NbdError(f"NBD read at offset {offset} failed: {e}") from None

    def close(self) -> None:
        """Close every connection."""
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            c.close()
        self._local = threading.local()


class Prefetcher:
    """Reads a planned sequence of ranges ahead of the consumer on a pipelined connection.

    ``get`` returns a prefetched range, waiting for it if it is on its way, or None (read it
    directly) when it is not planned, not yet requested while the buffer is full, or the prefetch
    failed: a wrong guess costs a direct read, never a wrong byte.
    """

    def __init__(self, address: str | tuple[str, int], export: str, reads: list[tuple[int, int]],
                 max_bytes: int = 128 * 1024 * 1024, depth: int = 64) -> None:
        self.planned = dict(reads)
        self.reads = reads
        self.max_bytes = max_bytes
        self.cache: dict[int, bytearray] = {}
        self.cached = 0
        self.requested: set[int] = set()
        self.sent = 0
        self.done = False
        self.cond = threading.Condition()
        self.conn = NbdConnection(address, export)
        self.depth = depth
        self.thread = threading.Thread(target=self._run, name="nbd-prefetch", daemon=True)
        self.thread.start()

    def _may_send(self) -> bool:
        with self.cond:
            return self.sent < len(self.reads) and self.cached + self.reads[self.sent][1] <= self.max_bytes

    def _gated(self) -> Iterator[tuple[int, int]]:
        for off, n in self.reads:
            with self.cond:
                while self.cached + n > self.max_bytes and self.cache and not self.done:
                    self.cond.wait(0.5)
                if self.done:
                    return
                self.requested.add(off)
                self.sent += 1
                self.cached += n  # reserved until consumed
                self.cond.notify_all()
            yield off, n

    def _run(self) -> None:
        try:
            for off, data in self.conn.read_many(self._gated(), self.depth, self._may_send):
                with self.cond:
                    self.cache[off] = data
                    self.cond.notify_all()
        except (NbdError, OSError):
            pass
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def get(self, offset: int, length: int) -> bytearray | None:
        """The prefetched bytes of this exact range, or None."""
        if self.planned.get(offset) != length:
            return None
        with self.cond:
            while offset not in self.cache:
                if self.done:
                    return None
                if offset not in self.requested and self.cached + length > self.max_bytes:
                    return None  # the buffer is full of ranges read ahead of this one: read it directly
                self.cond.wait(0.5)
            data = self.cache.pop(offset)
            self.cached -= len(data)
            self.cond.notify_all()
            return data

    def close(self) -> None:
        """Stop prefetching and close the connection."""
        with self.cond:
            self.done = True
            self.cond.notify_all()
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv
        except OSError:
            pass
        self.thread.join(timeout=10)
        self.conn.sock.close()
        self.cache.clear()


class FrozenView:
    """The point-in-time export a capture reads: the planned ranges arrive through the read-ahead,
    anything else is read directly. Errors are ``NbdError``; each source words its own."""

    def __init__(self, address: str | tuple[str, int], export: str, reads: list[tuple[int, int]]) -> None:
        self.reader = NbdReader(address, export)
        self.prefetch = Prefetcher(address, export, reads)

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """``length`` bytes at ``offset``."""
        data = self.prefetch.get(offset, length)
        return data if data is not None else self.reader.read(offset, length)

    def close(self) -> None:
        """Stop the read-ahead and close every connection."""
        self.prefetch.close()
        self.reader.close()


def merge_extents(extents: Iterator[tuple[int, int, int]], want: int) -> list[tuple[int, int]]:
    """Adjacent extents whose flags have every bit of ``want`` set, as merged (offset, length)."""
    out: list[tuple[int, int]] = []
    for off, length, flags in extents:
        if flags & want != want:
            continue
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out
