"""The agent's NBD read-ahead against a real NBD server (qemu-nbd)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lifeboat.agent.nbd import NbdReader, Prefetcher
from lifeboat.archive.store import ordered_map

KiB = 1024


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A random 8 MiB image served read-only by qemu-nbd on a unix socket: (socket, bytes)."""
    data = os.urandom(8 * 1024 * KiB)
    image = tmp_path / "disk.raw"
    image.write_bytes(data)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "--read-only", "--format=raw", "--shared=8", "--persistent",
                             f"--socket={sock}", "--export-name=disk", str(image)])
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.02)
    try:
        yield str(sock), data
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.timeout(60)
def test_read_ahead_planned_beyond_its_buffer_delivers_every_byte(served: tuple[str, bytes]) -> None:
    """Planned reads several times the prefetch buffer, consumed in order by a pool that keeps many
    reads in flight (as Archive.backup does): the reader once stalled here for good, sending no
    more requests while holding replies it had not received."""
    sock, data = served
    reads = [(off, 64 * KiB) for off in range(0, len(data), 64 * KiB)]
    prefetch = Prefetcher(sock, "disk", reads, max_bytes=512 * KiB, depth=16)
    direct = NbdReader(sock, "disk")

    def read(item: tuple[int, int]) -> bytes:
        got = prefetch.get(*item)
        return bytes(got) if got is not None else direct.read(*item)

    pool = ThreadPoolExecutor(2)
    try:
        out = b"".join(ordered_map(pool, read, reads, ahead=32))
    finally:  # a stall fails by the timeout: closing the read-ahead first lets the workers finish
        prefetch.close()
        pool.shutdown(wait=True, cancel_futures=True)
        direct.close()
    assert out == data
