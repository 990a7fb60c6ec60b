"""Shared by the exporter tests: backups of bytes, a huge sparse stand-in for a point, and qemu-img."""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lifeboat.archive import Archive, PointReader
from tests.archive.helpers import BytesSource

MiB = 1024 * 1024


class SparsePoint:
    """A stand-in for ``PointReader`` of any size: zeros except a few data islands.

    Backing up terabytes of zeros reads every byte, so size-limit tests use this instead.
    ``islands`` maps aligned chunk offsets to a fill byte.
    """

    def __init__(self, size: int, islands: dict[int, int], chunk_size: int = MiB) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.islands = islands
        assert all(off % chunk_size == 0 and off < size for off in islands)

    def _byte_at(self, chunk_off: int) -> int:
        return self.islands.get(chunk_off, 0)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the virtual disk."""
        assert 0 <= offset and offset + length <= self.size
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            c = pos - pos % self.chunk_size
            take = min(c + self.chunk_size, end) - pos
            out += bytes([self._byte_at(c)]) * take
            pos += take
        return bytes(out)

    def extents(self) -> Iterator[tuple[int, int, bool]]:
        """Zero runs between the islands."""
        pos = 0
        for off in sorted(self.islands):
            if off > pos:
                yield pos, off - pos, True
            length = min(self.chunk_size, self.size - off)
            yield off, length, False
            pos = off + length
        if pos < self.size:
            yield pos, self.size - pos, True


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run qemu-img (it must be installed: a missing tool fails the test)."""
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, f"qemu-img {' '.join(args)}: {r.stdout}{r.stderr}"
    return r


def qemu_info(path: Path, fmt: str) -> dict[str, Any]:
    """``qemu-img info --output=json``."""
    doc: dict[str, Any] = json.loads(qemu_img("info", "-f", fmt, "--output=json", str(path)).stdout)
    return doc


def backup_bytes(arc: Archive, machine: str, data: bytes) -> PointReader:
    """A point holding ``data``."""
    return arc.reader(arc.backup(machine, BytesSource(data)))


def contents(seed: int = 1) -> dict[str, bytes]:
    """The matrix of point contents every exporter must handle."""
    rnd = random.Random(seed)

    def rand(n: int) -> bytes:
        return rnd.randbytes(n)

    sparse = bytearray(9 * MiB + 4096 + 17)
    for off, n in [(0, 4096), (70_000, 3000), (MiB - 10, 20), (3 * MiB, 2 * MiB + 5), (9 * MiB + 4096, 17)]:
        sparse[off : off + n] = rand(n)
    text = (b"lifeboat exports compressible text. " * 40_000)[: 2 * MiB + 300]
    return {
        "empty": b"",
        "one-byte": b"\x01",
        "one-sector": rand(512),
        "odd-1MiB-512": rand(MiB + 512),
        "zeros-8MiB": bytes(8 * MiB),
        "random-3MiB": rand(3 * MiB),
        "sparse-odd": bytes(sparse),
        "text": text,
    }
