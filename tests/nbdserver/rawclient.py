"""A minimal NBD client over a raw socket, to test what real clients never send.

It speaks exactly the bytes of ``doc/proto.md`` (through ``plumbing.nbd``'s layouts) and
checks the server's framing strictly, so a malformed reply fails the test.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field

from lifeboat.plumbing import nbd as P


@dataclass
class OptionReply:
    """One reply to an option."""

    option: int
    reply: int
    data: bytes

    @property
    def message(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass
class Reply:
    """A whole reply to a request: error, read data, holes, block status extents."""

    cookie: int
    error: int = 0
    message: str = ""
    data: dict[int, bytes] = field(default_factory=dict)
    holes: list[tuple[int, int]] = field(default_factory=list)
    extents: list[tuple[int, int]] = field(default_factory=list)
    chunks: int = 0


class RawClient:
    """Handshake helpers plus request/reply framing; every method reads exactly what it expects."""

    def __init__(self, host: str, port: int, *, timeout: float = 10) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection((host, port), timeout=timeout)
        self.structured = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes -------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise ConnectionError(f"server closed the connection after {len(buf)} of {n} bytes")
            buf += part
        return bytes(buf)

    def closed_by_server(self) -> bool:
        """Whether the server has closed the connection (EOF or reset)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    # -- handshake ---------------------------------------------------------------------------
    def greet(self, flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> int:
        """Read the greeting, send client flags; the server's handshake flags."""
        magic, opt_magic, hflags = P.SERVER_GREETING.unpack(self.recv_exact(P.SERVER_GREETING.size))
        assert magic == P.NBDMAGIC and opt_magic == P.IHAVEOPT
        self.send(P.CLIENT_FLAGS.pack(flags))
        return int(hflags)

    def option(self, option: int, data: bytes = b"") -> None:
        self.send(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> OptionReply:
        magic, option, reply, length = P.OPTION_REPLY.unpack(self.recv_exact(P.OPTION_REPLY.size))
        assert magic == P.REPLY_MAGIC, hex(magic)
        return OptionReply(option, reply, self.recv_exact(length))

    def option_replies(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option; its replies up to the final ACK or error."""
        self.option(option, data)
        out = []
        while True:
            r = self.option_reply()
            assert r.option == option
            out.append(r)
            if r.reply == P.REP_ACK or r.reply & (1 << 31):
                return out

    @staticmethod
    def info_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return P.U32.pack(len(raw)) + raw + P.U16.pack(len(infos)) + b"".join(P.U16.pack(i) for i in infos)

    @staticmethod
    def meta_data(name: str, queries: list[str]) -> bytes:
        raw = name.encode()
        out = P.U32.pack(len(raw)) + raw + P.U32.pack(len(queries))
        for q in queries:
            out += P.U32.pack(len(q.encode())) + q.encode()
        return out

    def starttls(self, ctx: ssl.SSLContext, hostname: str = "localhost") -> None:
        [r] = self.option_replies(P.OPT_STARTTLS)
        assert r.reply == P.REP_ACK, r
        assert isinstance(self.sock, socket.socket)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)

    def go(self, name: str, *, structured: bool = True, meta: bool = True) -> tuple[int, int]:
        """Negotiate and enter transmission; (size, transmission flags)."""
        if structured:
            [r] = self.option_replies(P.OPT_STRUCTURED_REPLY)
            assert r.reply == P.REP_ACK
            self.structured = True
            if meta:
                replies = self.option_replies(P.OPT_SET_META_CONTEXT, self.meta_data(name, [P.META_BASE_ALLOCATION]))
                assert replies[-1].reply == P.REP_ACK
        replies = self.option_replies(P.OPT_GO, self.info_data(name, (P.INFO_BLOCK_SIZE,)))
        assert replies[-1].reply == P.REP_ACK, replies[-1]
        for r in replies:
            if r.reply == P.REP_INFO and P.U16.unpack_from(r.data)[0] == P.INFO_EXPORT:
                _, size, flags = P.INFO_EXPORT_PAYLOAD.unpack(r.data)
                return size, flags
        raise AssertionError("no NBD_INFO_EXPORT before NBD_REP_ACK")

    # -- transmission ------------------------------------------------------------------------
    def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1,
                payload: bytes = b"") -> None:
        self.send(P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload)

    def reply(self, read_length: int = 0) -> Reply:
        """One whole reply; ``read_length`` is the data length of a READ under simple replies."""
        magic = P.U32.unpack(self.recv_exact(4))[0]
        if magic == P.SIMPLE_REPLY_MAGIC:
            error, cookie = P.SIMPLE_REPLY.unpack(P.U32.pack(magic) + self.recv_exact(12))[1:]
            r = Reply(cookie, error)
            if read_length and not error:
                r.data[-1] = self.recv_exact(read_length)
            return r
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        r = Reply(0)
        while True:
            if r.chunks:
                assert P.U32.unpack(self.recv_exact(4))[0] == P.STRUCTURED_REPLY_MAGIC
            _, flags, rtype, cookie, length = P.STRUCTURED_REPLY.unpack(P.U32.pack(P.STRUCTURED_REPLY_MAGIC)
                                                                         + self.recv_exact(16))
            r.cookie = cookie
            r.chunks += 1
            payload = self.recv_exact(length)
            if rtype == P.REPLY_TYPE_OFFSET_DATA:
                r.data[P.OFFSET_HEADER.unpack_from(payload)[0]] = payload[8:]
            elif rtype == P.REPLY_TYPE_OFFSET_HOLE:
                r.holes.append(P.HOLE_PAYLOAD.unpack(payload))
            elif rtype == P.REPLY_TYPE_BLOCK_STATUS:
                assert (length - 4) % 8 == 0 and length > 4
                r.extents = [P.EXTENT.unpack_from(payload, 4 + 8 * k) for k in range((length - 4) // 8)]
            elif rtype in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
                error, mlen = P.ERROR_HEADER.unpack_from(payload)
                r.error = error
                r.message = payload[6 : 6 + mlen].decode("utf-8", errors="replace")
            else:
                assert rtype == P.REPLY_TYPE_NONE, rtype
            if flags & P.REPLY_FLAG_DONE:
                return r

    def read(self, offset: int, length: int, *, cookie: int = 1, flags: int = 0) -> Reply:
        self.request(P.CMD_READ, offset, length, cookie=cookie, flags=flags)
        return self.reply(read_length=length)

    def disconnect(self) -> None:
        self.request(P.CMD_DISC)


def assemble(reply: Reply, offset: int, length: int) -> bytes:
    """The bytes a structured READ reply describes (holes as zeros); checks full coverage."""
    out = bytearray(length)
    covered = 0
    for off, data in reply.data.items():
        base = 0 if off == -1 else off - offset
        out[base : base + len(data)] = data
        covered += len(data)
    for _, n in reply.holes:
        covered += n
    assert covered == length, f"reply covers {covered} of {length} bytes"
    return bytes(out)
