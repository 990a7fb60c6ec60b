"""The handshake and transmission rules of doc/proto.md, checked byte by byte over raw sockets,
and clients that misbehave while a real client copies the export next to them."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lifeboat.plumbing import nbd as P
from tests.nbdserver.conftest import Served, archive_digest, run
from tests.nbdserver.rawclient import RawClient, assemble


def test_fixed_newstyle_greeting_and_unsupported_options(shared_archive: Path, serve: Callable[..., Served]) -> None:
    s = serve(shared_archive, "web01")
    with RawClient(s.host, s.port) as c:
        hflags = c.greet()
        assert hflags == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
        for unknown in (P.OPT_PEEK_EXPORT, P.OPT_EXTENDED_HEADERS, 99, 0x7FFFFFFF):
            [r] = c.option_replies(unknown, b"some data the server must skip")
            assert r.reply == P.REP_ERR_UNSUP and r.message
        # the next option is still parsed correctly
        [r] = c.option_replies(P.OPT_STRUCTURED_REPLY)
        assert r.reply == P.REP_ACK
        [r] = c.option_replies(P.OPT_STRUCTURED_REPLY, b"x")
        assert r.reply == P.REP_ERR_INVALID
        [r] = c.option_replies(P.OPT_ABORT)
        assert r.reply == P.REP_ACK
        assert c.closed_by_server()


def test_list_info_and_unknown_export(shared_archive: Path, serve: Callable[..., Served]) -> None:
    s = serve(shared_archive, "web01")
    with RawClient(s.host, s.port) as c:
        c.greet()
        replies = c.option_replies(P.OPT_LIST)
        assert [r.reply for r in replies] == [P.REP_SERVER, P.REP_ACK]
        nlen = P.U32.unpack_from(replies[0].data)[0]
        assert replies[0].data[4 : 4 + nlen] == b"web01"
        [r] = c.option_replies(P.OPT_LIST, b"junk")
        assert r.reply == P.REP_ERR_INVALID

        [r] = c.option_replies(P.OPT_INFO, c.info_data("nosuch"))
        assert r.reply == P.REP_ERR_UNKNOWN
        assert "nosuch" in r.message and "web01" in r.message  # a message naming what exists
        [r] = c.option_replies(P.OPT_GO, c.info_data("nosuch"))
        assert r.reply == P.REP_ERR_UNKNOWN and r.message

        replies = c.option_replies(P.OPT_INFO, c.info_data("", (P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE)))
        assert replies[-1].reply == P.REP_ACK
        infos = {P.U16.unpack_from(r.data)[0]: r.data[2:] for r in replies[:-1]}
        assert infos[P.INFO_NAME] == b"web01"  # the empty name is the default export
        assert b"web01@" in infos[P.INFO_DESCRIPTION]
        minimum, preferred, maximum = P.INFO_BLOCK_SIZE_PAYLOAD.unpack(P.U16.pack(P.INFO_BLOCK_SIZE)
                                                                        + infos[P.INFO_BLOCK_SIZE])[1:]
        assert minimum == 1 and preferred >= 512 and maximum >= 1 << 20
        size, flags = P.INFO_EXPORT_PAYLOAD.unpack(P.U16.pack(P.INFO_EXPORT) + infos[P.INFO_EXPORT])[1:]
        assert flags & P.TFLAG_HAS_FLAGS and flags & P.TFLAG_READ_ONLY and flags & P.TFLAG_CAN_MULTI_CONN
        # malformed INFO data
        [r] = c.option_replies(P.OPT_INFO, P.U32.pack(100) + b"web01" + P.U16.pack(0))
        assert r.reply == P.REP_ERR_INVALID
        size2, _ = c.go("web01", structured=False)
        assert size2 == size
        r2 = c.read(0, 4096)
        assert r2.error == 0 and len(r2.data[-1]) == 4096


def test_export_name_for_old_clients(shared_archive: Path, serve: Callable[..., Served],
                                     test_image: Path) -> None:
    s = serve(shared_archive, "web01")
    for no_zeroes in (True, False):
        with RawClient(s.host, s.port) as c:
            c.greet(P.FLAG_C_FIXED_NEWSTYLE | (P.FLAG_C_NO_ZEROES if no_zeroes else 0))
            c.option(P.OPT_EXPORT_NAME, b"web01")
            size, flags = P.EXPORT_NAME_REPLY.unpack(c.recv_exact(P.EXPORT_NAME_REPLY.size))
            assert size == test_image.stat().st_size and flags & P.TFLAG_READ_ONLY
            if not no_zeroes:
                assert c.recv_exact(124) == bytes(124)
            r = c.read(4096, 512)
            assert r.data[-1] == test_image.read_bytes()[4096:4608]
            c.disconnect()
            assert c.closed_by_server()
    with RawClient(s.host, s.port) as c:  # an unknown name cannot be refused politely: disconnect
        c.greet()
        c.option(P.OPT_EXPORT_NAME, b"nosuch")
        assert c.closed_by_server()


def test_structured_reads_block_status_and_errors(shared_archive: Path, serve: Callable[..., Served],
                                                  test_image: Path) -> None:
    s = serve(shared_archive, "web01")
    image = test_image.read_bytes()
    with RawClient(s.host, s.port) as c:
        c.greet()
        lists = c.option_replies(P.OPT_LIST_META_CONTEXT, c.meta_data("web01", []))
        assert [r.reply for r in lists] == [P.REP_META_CONTEXT, P.REP_ACK]
        assert lists[0].data[4:] == b"base:allocation"
        lists = c.option_replies(P.OPT_LIST_META_CONTEXT, c.meta_data("web01", ["base:"]))
        assert lists[0].data[4:] == b"base:allocation"
        lists = c.option_replies(P.OPT_LIST_META_CONTEXT, c.meta_data("web01", ["qemu:dirty-bitmap:x"]))
        assert [r.reply for r in lists] == [P.REP_ACK]
        # SET_META_CONTEXT before structured replies is invalid
        [r] = c.option_replies(P.OPT_SET_META_CONTEXT, c.meta_data("web01", ["base:allocation"]))
        assert r.reply == P.REP_ERR_INVALID
        size, flags = c.go("web01")
        assert flags & P.TFLAG_SEND_DF

        for off, n in ((0, 4096), (123, 70000), (size - 5000, 5000), (16 * 1024 * 1024 + 5, 3 * 1024 * 1024)):
            res = c.read(off, n, flags=P.CMD_FLAG_DF)
            assert res.error == 0 and res.chunks == 1, (off, n)
            assert assemble(res, off, n) == image[off : off + n]
        res = c.read(17 * 1024 * 1024, 65536)  # inside an all-zero chunk: one hole chunk
        assert res.holes == [(17 * 1024 * 1024, 65536)] and not res.data

        c.request(P.CMD_BLOCK_STATUS, 0, size, cookie=7)
        res = c.reply()
        assert res.cookie == 7 and res.error == 0 and res.extents
        assert sum(n for n, _ in res.extents) == size
        assert any(f == P.STATE_HOLE | P.STATE_ZERO for _, f in res.extents)
        c.request(P.CMD_BLOCK_STATUS, 0, size, flags=P.CMD_FLAG_REQ_ONE, cookie=8)
        res = c.reply()
        assert len(res.extents) == 1 and res.extents[0][0] <= size
        c.request(P.CMD_BLOCK_STATUS, 17 * 1024 * 1024 + 512, 1024, flags=P.CMD_FLAG_REQ_ONE, cookie=9)
        res = c.reply()
        assert res.extents == [(1024, P.STATE_HOLE | P.STATE_ZERO)]

        # errors come back as structured error chunks with a message; the connection goes on
        res = c.read(size - 10, 20, cookie=10)
        assert res.cookie == 10 and res.error == P.EINVAL and "beyond the end" in res.message
        c.request(P.CMD_WRITE, 0, 4, payload=b"abcd", cookie=11)
        res = c.reply()
        assert res.error == P.EPERM
        c.request(P.CMD_TRIM, 0, 4096, cookie=12)
        assert c.reply().error == P.EPERM
        c.request(42, 0, 0, cookie=13)
        assert c.reply().error == P.EINVAL
        c.request(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_REQ_ONE, cookie=14)
        assert c.reply().error == P.EINVAL
        res = c.read(0, 64 * 1024 * 1024, cookie=15)
        assert res.error in (P.EOVERFLOW, P.EINVAL)
        c.request(P.CMD_FLUSH, cookie=16)
        assert c.reply().error == 0
        c.request(P.CMD_CACHE, 0, 1 << 20, cookie=17)
        assert c.reply().error == 0
        res = c.read(0, 512, cookie=18)
        assert assemble(res, 0, 512) == image[:512]
        c.disconnect()
        assert c.closed_by_server()


def test_pipelined_requests_all_answered(shared_archive: Path, serve: Callable[..., Served],
                                         test_image: Path) -> None:
    s = serve(shared_archive, "web01")
    image = test_image.read_bytes()
    with RawClient(s.host, s.port) as c:
        c.greet()
        c.go("web01", structured=False)
        wanted = {}
        batch = b""
        for k in range(300):
            off = (k * 1_234_567) % (len(image) - 8192)
            wanted[k + 1] = (off, 4096 + k)
            batch += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, k + 1, off, 4096 + k)
        c.send(batch)
        seen = set()
        for _ in range(300):
            magic, error, cookie = P.SIMPLE_REPLY.unpack(c.recv_exact(16))
            assert magic == P.SIMPLE_REPLY_MAGIC and error == 0 and cookie not in seen
            seen.add(cookie)
            off, n = wanted[cookie]
            assert c.recv_exact(n) == image[off : off + n]


def test_misbehaving_clients_do_not_affect_others(shared_archive: Path, serve: Callable[..., Served],
                                                  tmp_path: Path, test_image: Path) -> None:
    before = archive_digest(shared_archive)
    s = serve(shared_archive, "web01")
    stop = threading.Event()
    copies: list[subprocess.CompletedProcess[str]] = []

    def good_client() -> None:
        k = 0
        while not stop.is_set():
            copies.append(subprocess.run(["nbdcopy", s.url, str(tmp_path / f"good{k % 2}.img")],
                                         capture_output=True, text=True, timeout=120))
            k += 1

    good = threading.Thread(target=good_client)
    good.start()
    try:
        # garbage instead of client flags
        with RawClient(s.host, s.port) as c:
            c.recv_exact(P.SERVER_GREETING.size)
            c.send(b"\xde\xad\xbe\xef" * 64)
            assert c.closed_by_server()
        # a plain HTTP request
        with socket.create_connection((s.host, s.port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            raw.settimeout(10)
            data = raw.recv(4096)
            while data:
                data = raw.recv(4096)
        # garbage after the handshake: bad request magic
        with RawClient(s.host, s.port) as c:
            c.greet()
            c.go("web01")
            c.send(b"\x00" * 28 + b"garbage" * 100)
            assert c.closed_by_server()
        # option with an absurd length
        with RawClient(s.host, s.port) as c:
            c.greet()
            c.send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 0xFFFFFFF0))
            assert c.closed_by_server()
        # requests beyond the export, of every kind: errors, and the connection stays usable
        with RawClient(s.host, s.port) as c:
            c.greet()
            size, _ = c.go("web01")
            for cmd in (P.CMD_READ, P.CMD_BLOCK_STATUS, P.CMD_CACHE):
                c.request(cmd, size + (1 << 40), 4096, cookie=cmd + 100)
                r = c.reply()
                assert r.error == P.EINVAL and r.cookie == cmd + 100
            c.request(P.CMD_READ, (1 << 64) - 4096, 4096, cookie=5)
            assert c.reply().error == P.EINVAL
            assert assemble(c.read(0, 4096), 0, 4096) == test_image.read_bytes()[:4096]
        # disconnect mid-request: a write header with half its payload, then hang up
        with RawClient(s.host, s.port) as c:
            c.greet()
            c.go("web01")
            c.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 1 << 20) + b"x" * 1000)
        # disconnect with many reads in flight, without reading a single reply
        with RawClient(s.host, s.port) as c:
            c.greet()
            c.go("web01")
            c.send(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, k, (k * 65536) % (16 << 20), 1 << 20)
                            for k in range(200)))
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        # a client that connects and goes silent must not block anyone
        idle = socket.create_connection((s.host, s.port), timeout=10)
        # half a handshake, then gone
        with RawClient(s.host, s.port) as c:
            c.greet()
            c.send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 100)[:10])
        time.sleep(0.5)
        run(["nbdinfo", s.url])
        idle.close()
    finally:
        stop.set()
        good.join()
    assert copies and all(c.returncode == 0 for c in copies), [c.stderr for c in copies]
    want = test_image.read_bytes()
    assert (tmp_path / "good0.img").read_bytes() == want
    assert s.proc.poll() is None, "the server must survive misbehaving clients"
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", s.url, str(test_image)])
    assert archive_digest(shared_archive) == before


def test_write_commands_on_a_writable_export(fresh_archive: Path, serve: Callable[..., Served],
                                             test_image: Path) -> None:
    before = archive_digest(fresh_archive)
    s = serve(fresh_archive, "web01", "--writable")
    image = bytearray(test_image.read_bytes())
    with RawClient(s.host, s.port) as c:
        c.greet()
        size, flags = c.go("web01")
        want = (P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES
                | P.TFLAG_SEND_FAST_ZERO | P.TFLAG_CAN_MULTI_CONN)
        assert flags & want == want and not flags & P.TFLAG_READ_ONLY
        c.request(P.CMD_WRITE, 777, 5000, flags=P.CMD_FLAG_FUA, payload=b"\x42" * 5000, cookie=1)
        assert c.reply().error == 0
        image[777:5777] = b"\x42" * 5000
        c.request(P.CMD_WRITE_ZEROES, 20 * 1024 * 1024 + 100, 300_000, flags=P.CMD_FLAG_NO_HOLE, cookie=2)
        assert c.reply().error == 0
        image[20 * 1024 * 1024 + 100 : 20 * 1024 * 1024 + 300_100] = bytes(300_000)
        c.request(P.CMD_WRITE_ZEROES, 22 * 1024 * 1024, 1024 * 1024, flags=P.CMD_FLAG_FAST_ZERO | P.CMD_FLAG_FUA,
                  cookie=3)
        assert c.reply().error == 0
        image[22 * 1024 * 1024 : 23 * 1024 * 1024] = bytes(1024 * 1024)
        c.request(P.CMD_TRIM, 24 * 1024 * 1024, 1024 * 1024, cookie=4)
        assert c.reply().error == 0
        image[24 * 1024 * 1024 : 25 * 1024 * 1024] = bytes(1024 * 1024)
        c.request(P.CMD_FLUSH, cookie=5)
        assert c.reply().error == 0
        c.request(P.CMD_BLOCK_STATUS, 22 * 1024 * 1024, 1024 * 1024, flags=P.CMD_FLAG_REQ_ONE, cookie=6)
        r = c.reply()
        assert r.extents == [(1024 * 1024, P.STATE_HOLE | P.STATE_ZERO)]
        c.request(P.CMD_WRITE, size - 2, 4, payload=b"abcd", cookie=7)
        assert c.reply().error == P.ENOSPC
        c.request(P.CMD_WRITE_ZEROES, size, 4096, cookie=8)
        assert c.reply().error == P.ENOSPC
        c.request(P.CMD_WRITE_ZEROES, 0, 4096, flags=P.CMD_FLAG_DF, cookie=9)
        assert c.reply().error == P.EINVAL
        for off, n in ((0, 8192), (20 * 1024 * 1024, 400_000), (22 * 1024 * 1024 - 10, 2 * 1024 * 1024 + 20)):
            assert assemble(c.read(off, n), off, n) == image[off : off + n]
        c.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 10, 0, 64 * 1024 * 1024))  # payload too big
        assert c.closed_by_server()
    with RawClient(s.host, s.port) as c:
        c.greet()
        c.go("web01")
        assert assemble(c.read(0, 8192), 0, 8192) == image[:8192]
    assert archive_digest(fresh_archive) == before
