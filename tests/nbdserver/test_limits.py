"""What a hostile or careless client can make the server do: memory bounded by the server (reads
it never collects), every request answered before NBD_CMD_DISC closes (issue 18, items 1-2).

Memory is read from ``/proc/PID/status`` of a real ``lifeboat serve``: VmHWM is the peak, so the
bound is checked whatever the timing of the flood.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from lifeboat.nbdserver.server import CLIENT_MEMORY, SERVER_MEMORY
from lifeboat.plumbing import nbd as P
from tests.nbdserver.conftest import IMAGE_SIZE, MiB, Served
from tests.nbdserver.rawclient import RawClient, assemble

MAX_READ = 32 * MiB  # the protocol's largest block, and the test image's whole size
TRANSIENT = 2 * MAX_READ  # one reply being assembled and copied into a transport buffer
MARGIN = 48 * MiB  # allocator slack, thread stacks, interpreter growth


def status(s: Served, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` figure of the server process, in bytes."""
    for line in Path(f"/proc/{s.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{s.proc.pid}/status")


def settle(s: Served) -> int:
    """VmRSS once it stops changing (the server has taken all of a flood it will take)."""
    last = -1
    for _ in range(200):
        rss = status(s, "VmRSS")
        if abs(rss - last) < MiB:
            return rss
        last = rss
        time.sleep(0.25)
    return last


def come_down(s: Served, limit: int) -> int:
    """Wait for VmRSS to fall to ``limit`` (memory given back after clients leave); the last figure."""
    rss = status(s, "VmRSS")
    for _ in range(120):
        if rss <= limit:
            break
        time.sleep(0.25)
        rss = status(s, "VmRSS")
    return rss


@contextmanager
def flood(s: Served, connections: int, reads: int) -> Iterator[list[RawClient]]:
    """Clients that send ``reads`` pipelined 32 MiB reads each and never read a reply; hung up
    (with a reset, so no reply is ever collected) when the block ends."""
    with ExitStack() as stack:
        clients = []
        for _ in range(connections):
            c = stack.enter_context(RawClient(s.host, s.port))
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            c.greet()
            c.go(s.export, structured=False)
            c.send(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, k, 0, MAX_READ) for k in range(reads)))
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            clients.append(c)
        yield clients


def test_pipelined_reads_never_collected_stay_within_the_client_bound(
        shared_archive: Path, serve: Callable[..., Served], test_image: Path) -> None:
    image = test_image.read_bytes()
    s = serve(shared_archive, "web01")
    base = status(s, "VmRSS")  # cold: no chunk decoded yet, so the flood's reads take the slow path
    with flood(s, 1, 64):
        with RawClient(s.host, s.port) as good:  # a well-behaved client is served meanwhile
            good.greet()
            good.go("web01")
            for k in range(3):
                assert assemble(good.read(0, IMAGE_SIZE, cookie=k), 0, IMAGE_SIZE) == image
        settle(s)
        peak = status(s, "VmHWM")
    bound = base + IMAGE_SIZE + CLIENT_MEMORY + MAX_READ + TRANSIENT + MARGIN  # + the decoded chunks
    assert peak <= bound, f"peak RSS {peak // MiB} MiB > {bound // MiB} MiB (started at {base // MiB} MiB)"
    after = come_down(s, base + IMAGE_SIZE + MARGIN)
    assert after <= base + IMAGE_SIZE + MARGIN, f"RSS {after // MiB} MiB after the flood left"


def test_many_flooding_connections_stay_within_the_server_bound(
        shared_archive: Path, serve: Callable[..., Served], test_image: Path) -> None:
    image = test_image.read_bytes()
    s = serve(shared_archive, "web01")
    base = status(s, "VmRSS")
    with flood(s, 48, 1):
        settle(s)
        peak = status(s, "VmHWM")
    bound = base + IMAGE_SIZE + SERVER_MEMORY + TRANSIENT + MARGIN
    assert peak <= bound, f"peak RSS {peak // MiB} MiB > {bound // MiB} MiB (started at {base // MiB} MiB)"
    after = come_down(s, base + IMAGE_SIZE + MARGIN)
    assert after <= base + IMAGE_SIZE + MARGIN, f"RSS {after // MiB} MiB after the flood left"
    with RawClient(s.host, s.port) as c:  # and the memory given back serves the next client
        c.greet()
        c.go("web01")
        assert assemble(c.read(0, IMAGE_SIZE), 0, IMAGE_SIZE) == image


def test_memory_limit_options_bound_the_server(shared_archive: Path, serve: Callable[..., Served]) -> None:
    s = serve(shared_archive, "web01", "--memory-limit", "64M", "--client-memory-limit", "32M")
    base = status(s, "VmRSS")
    with flood(s, 8, 2):
        settle(s)
        peak = status(s, "VmHWM")
    bound = base + IMAGE_SIZE + 64 * MiB + TRANSIENT + MARGIN
    assert peak <= bound, f"peak RSS {peak // MiB} MiB > {bound // MiB} MiB (started at {base // MiB} MiB)"


def test_disc_answers_every_outstanding_request(shared_archive: Path, serve: Callable[..., Served],
                                                test_image: Path) -> None:
    image = test_image.read_bytes()
    s = serve(shared_archive, "web01")
    for structured, warm in ((False, False), (False, True), (True, True)):
        with RawClient(s.host, s.port) as c:
            c.greet()
            c.go("web01", structured=structured)
            wanted = {k: ((k * 3_000_017) % (IMAGE_SIZE - MiB), 4096 * (k + 1)) for k in range(1, 11)}
            c.send(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, k, off, n)
                            for k, (off, n) in wanted.items())
                   + P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 99, 0, 0))
            if warm:
                c.sock.shutdown(socket.SHUT_WR)  # and half-close: still all answered
            got = {}
            for _ in wanted:
                if structured:
                    r = c.reply()
                    off, n = wanted[r.cookie]
                    got[r.cookie] = assemble(r, off, n)
                else:
                    magic, error, cookie = P.SIMPLE_REPLY.unpack(c.recv_exact(16))
                    assert magic == P.SIMPLE_REPLY_MAGIC and error == 0
                    got[cookie] = c.recv_exact(wanted[cookie][1])
            assert c.closed_by_server()
            assert got == {k: image[off : off + n] for k, (off, n) in wanted.items()}
