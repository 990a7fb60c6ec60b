"""The pack cache: reads of a point through it are the point's bytes, its size stays within its
bound however much is read, a sequential read is served by few GETs (whole blocks, read ahead),
and its directory is gone once closed."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

from lifeboat.archive import Archive
from lifeboat.archive.files import FileSource
from lifeboat.archive.packcache import PackCache

KiB = 1024


def _archive(tmp_path: Path, size: int) -> tuple[Archive, bytes]:
    data = random.Random(3).randbytes(size)  # incompressible: stored bytes = read bytes
    image = tmp_path / "image"
    image.write_bytes(data)
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=16 * KiB)
    with FileSource(image) as src:
        arc.backup("m", src)
    return arc, data


def _dir_bytes(path: Path) -> int:
    """Bytes of the files in ``path`` (read ahead may remove one while they are summed)."""
    total = 0
    for entry in os.scandir(path):
        with contextlib.suppress(FileNotFoundError):
            total += entry.stat().st_size
    return total


def test_reads_through_the_cache_stay_within_its_bound(tmp_path: Path) -> None:
    arc, data = _archive(tmp_path, 2048 * KiB)
    cache = PackCache(256 * KiB, tmp_path, block=64 * KiB, readahead=2)
    arc.pack_cache = cache
    arc.cache.max_bytes = 0  # no decoded chunks in memory: every read goes to the pack cache
    reader = arc.reader(arc.resolve("m"))
    biggest = 0
    for offset in range(0, len(data), 16 * KiB):  # 8 times the cache's size, in order
        assert reader.read(offset, 16 * KiB) == data[offset:offset + 16 * KiB]
        biggest = max(biggest, cache.held, _dir_bytes(cache.dir))
    assert 0 < biggest <= 256 * KiB
    assert cache.held <= 256 * KiB and _dir_bytes(cache.dir) <= 256 * KiB
    # whole blocks (4 chunks each) and read ahead: far fewer GETs than the 128 chunks read
    assert cache.fetches < 128 // 2
    rng = random.Random(5)
    for _ in range(200):  # random access, evicting and fetching again
        offset = rng.randrange(0, len(data) - 40 * KiB)
        assert reader.read(offset, 40 * KiB) == data[offset:offset + 40 * KiB]
        assert cache.held <= 256 * KiB and _dir_bytes(cache.dir) <= 256 * KiB
    cache.close()
    assert not cache.dir.exists()


def test_a_cached_block_is_not_fetched_again(tmp_path: Path) -> None:
    arc, data = _archive(tmp_path, 256 * KiB)
    cache = PackCache(1024 * KiB, tmp_path, block=64 * KiB, readahead=0)
    arc.pack_cache = cache
    arc.cache.max_bytes = 0
    reader = arc.reader(arc.resolve("m"))
    assert reader.read(0, 16 * KiB) == data[:16 * KiB]
    assert cache.fetches == 1
    assert reader.read(16 * KiB, 32 * KiB) == data[16 * KiB:48 * KiB]  # chunks stored in the same block
    assert cache.fetches == 1
    cache.close()
