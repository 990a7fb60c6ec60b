"""The NBD protocol's wire format and URLs, in one place: magic numbers, flags, byte layouts, and
``nbd://HOST:PORT/EXPORT`` built and parsed.

Names and values follow NetworkBlockDevice ``doc/proto.md`` (the ``NBD_`` prefix dropped); URLs
follow its ``doc/uri.md``. All integers on the wire are big-endian. Nothing here does I/O, so the
server (``nbdserver``), the capture client (``agent.nbd``), the target drivers and the tests' raw
client share these definitions.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from urllib.parse import quote, unquote

from lifeboat.plumbing.errors import UsageError

# -- handshake ----------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9  # option replies

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31  # set in every error reply
REP_ERR_UNSUP = REP_ERR_BIT + 1
REP_ERR_POLICY = REP_ERR_BIT + 2
REP_ERR_INVALID = REP_ERR_BIT + 3
REP_ERR_PLATFORM = REP_ERR_BIT + 4
REP_ERR_TLS_REQD = REP_ERR_BIT + 5
REP_ERR_UNKNOWN = REP_ERR_BIT + 6
REP_ERR_SHUTDOWN = REP_ERR_BIT + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR_BIT + 8
REP_ERR_TOO_BIG = REP_ERR_BIT + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission flags (sent with the export size) ----------------------------------------
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_RESIZE = 1 << 9
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# -- requests ------------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

STATE_HOLE = 1 << 0  # base:allocation
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:NAME (QEMU's docs/interop/nbd.txt)

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

META_BASE_ALLOCATION = "base:allocation"
DEFAULT_PORT = 10809  # IANA's port for NBD, and the port of a URL that names none
MAX_STRING = 4096  # longest name, description or message the spec allows

# -- layouts -------------------------------------------------------------------------------
SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # REPLY_MAGIC, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes unless NO_ZEROES)
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
OFFSET_HEADER = struct.Struct(">Q")
HOLE_PAYLOAD = struct.Struct(">QI")
ERROR_HEADER = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, flags
U32 = struct.Struct(">I")
U16 = struct.Struct(">H")

OPTION_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME",
    OPT_ABORT: "ABORT",
    OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT",
    OPT_STARTTLS: "STARTTLS",
    OPT_INFO: "INFO",
    OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}
COMMAND_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    """One fixed-newstyle option reply."""
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply, len(payload)) + payload


def error_message(text: str) -> bytes:
    """A human-readable message for an error reply, cut to the spec's string limit."""
    data = text.encode("utf-8", errors="replace")
    if len(data) > MAX_STRING:
        data = data[: MAX_STRING - 3].decode("utf-8", errors="ignore").encode() + b"..."
    return data


def structured_header(flags: int, rtype: int, cookie: int, length: int) -> bytes:
    """The 20-byte header of one structured reply chunk."""
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)


def structured_error(cookie: int, error: int, message: str) -> bytes:
    """A final ``REPLY_TYPE_ERROR`` chunk carrying ``message``."""
    msg = error_message(message)
    payload = ERROR_HEADER.pack(error, len(msg)) + msg
    return structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(payload)) + payload


# -- URLs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NbdUrl:
    """Where an export is served: ``nbd://HOST:PORT/EXPORT``, or ``nbds://`` when the client must
    use TLS. ``lifeboat serve`` prints one, and the target drivers boot from what they parse, so
    both sides agree on IPv6 brackets and on the export name's percent-encoding."""

    host: str
    port: int = DEFAULT_PORT
    export: str = ""
    tls: bool = False

    @classmethod
    def parse(cls, text: str) -> NbdUrl:
        """The URL's parts; an IPv6 host loses its brackets, the export name its percent-encoding.
        Query parameters (``?tls-certificates=...`` of libnbd) are a client's business: ignored."""
        scheme, sep, rest = text.strip().partition("://")
        if not sep or scheme not in ("nbd", "nbds"):
            raise UsageError(f"{text!r}: not an NBD URL (expected nbd://HOST:PORT/EXPORT)")
        netloc, _, path = rest.partition("/")
        path = path.partition("?")[0].partition("#")[0]
        if netloc.startswith("["):
            host, close, port = netloc[1:].partition("]")
            if not close or (port and not port.startswith(":")):
                raise UsageError(f"{text!r}: an IPv6 host goes in brackets, e.g. nbd://[::1]:10809/EXPORT")
            port = port[1:]
        else:
            host, _, port = netloc.partition(":")
            if ":" in port:
                raise UsageError(f"{text!r}: an IPv6 host goes in brackets, e.g. nbd://[::1]:10809/EXPORT")
        if not host:
            raise UsageError(f"{text!r}: the NBD URL names no host")
        if port and not (port.isdigit() and 0 < int(port) <= 65535):
            raise UsageError(f"{text!r}: {port!r} is not a TCP port")
        return cls(host, int(port) if port else DEFAULT_PORT, unquote(path), scheme == "nbds")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'nbds' if self.tls else 'nbd'}://{host}:{self.port}/{quote(self.export, safe='')}"
