"""FileSource.read_view: the right bytes at any offset and length, from many threads at once, on a
file system where O_DIRECT works (/tmp) and on tmpfs (/dev/shm, where it may be refused), and with
O_DIRECT unavailable altogether. Every test judges the bytes, never which path ran."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import lifeboat.archive.files
from lifeboat.archive.errors import SourceError
from lifeboat.archive.files import FileSource

MiB = 1 << 20


@pytest.fixture(params=["/tmp", "/dev/shm"])
def folder(request: pytest.FixtureRequest) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir=request.param, prefix="lifeboat-test-files-") as d:
        yield Path(d)


def make(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


# (offset, length) pairs: aligned, unaligned start, unaligned length, crossing blocks, inside one block
SPANS = [
    (0, 4096),
    (0, MiB),
    (4096, 8192),
    (1, 4095),
    (4095, 2),
    (100, 5000),
    (8191, 4097),
    (12345, MiB + 17),
    (MiB - 1, 1),
    (3 * 4096 + 5, 0),
]


def test_aligned_and_unaligned_spans(folder: Path) -> None:
    data = make(folder / "img", 4 * MiB)
    with FileSource(folder / "img") as src:
        for offset, length in SPANS:
            view = src.read_view(offset, length)
            assert isinstance(view, memoryview) and view.readonly
            assert view == data[offset : offset + length], (offset, length)
            assert bytes(view) == src.read(offset, length)


def test_tail_of_odd_sized_file(folder: Path) -> None:
    size = 3 * MiB + 4096 * 3 + 123  # neither a multiple of 4096 nor of 512
    data = make(folder / "img", size)
    with FileSource(folder / "img") as src:
        assert src.size == size
        for offset in (size - 123, size - 1, size - 5000, size - MiB, 3 * MiB, 0):
            assert src.read_view(offset, size - offset) == data[offset:], offset
        assert src.read_view(size, 0) == b""


def test_one_byte_file(folder: Path) -> None:
    (folder / "one").write_bytes(b"\x7f")
    with FileSource(folder / "one") as src:
        assert src.size == 1
        assert src.read_view(0, 1) == b"\x7f"
        with pytest.raises(SourceError):
            src.read_view(0, 2)


def test_view_feeds_hash_and_zero_compare(folder: Path) -> None:
    cs = MiB
    data = make(folder / "img", 3 * cs)
    with open(folder / "img", "r+b") as f:
        f.seek(cs)
        f.write(bytes(cs))  # the middle chunk is all zero
    data = data[:cs] + bytes(cs) + data[2 * cs :]
    zero = bytes(cs)
    with FileSource(folder / "img") as src:
        for i in range(3):
            view = src.read_view(i * cs, cs)
            assert hashlib.sha256(view).digest() == hashlib.sha256(data[i * cs : (i + 1) * cs]).digest()
            assert (view == zero) == (i == 1)


def test_many_threads_at_once(folder: Path) -> None:
    size = 8 * MiB + 777
    data = make(folder / "img", size)
    cs = 256 * 1024
    # chunk-sized reads like a backup, then odd ones that make each thread's buffer grow
    jobs = [(i * cs, min(cs, size - i * cs)) for i in range(-(-size // cs))]
    jobs += [(o * 7919, 3 * cs + o) for o in range(40)]
    jobs *= 3
    with FileSource(folder / "img") as src:

        def work(job: tuple[int, int]) -> bool:
            offset, length = job
            view = src.read_view(offset, length)
            digest = hashlib.sha256(view).digest()  # while other threads read into their own buffers
            expected = data[offset : offset + length]
            return view == src.read(offset, length) and digest == hashlib.sha256(expected).digest()

        with ThreadPoolExecutor(3) as pool:
            assert all(pool.map(work, jobs))


def test_view_is_valid_until_the_next_read_view_of_the_same_thread(folder: Path) -> None:
    data = make(folder / "img", 2 * MiB)
    with FileSource(folder / "img") as src:
        first = src.read_view(5, 1000)
        with ThreadPoolExecutor(1) as pool:  # another thread's reads leave this thread's view alone
            assert pool.submit(lambda: bytes(src.read_view(5000, MiB))).result() == data[5000 : 5000 + MiB]
        assert first == data[5:1005]
        big = src.read_view(0, 2 * MiB)  # grows the buffer: the old view still reads what it read
        assert first == data[5:1005] and big == data


def test_without_o_direct(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The platform or file system refuses O_DIRECT: plain pread, same bytes."""
    monkeypatch.setattr(lifeboat.archive.files, "open_direct", lambda path, mode=0: None)
    size = 2 * MiB + 4321
    data = make(folder / "img", size)
    with FileSource(folder / "img") as src:
        for offset, length in [*SPANS, (size - 4321, 4321), (size - 1, 1)]:
            assert src.read_view(offset, length) == data[offset : offset + length], (offset, length)


def test_o_direct_read_refused(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The O_DIRECT descriptor opens but its reads fail with EINVAL (another alignment wanted)."""
    data = make(folder / "img", MiB + 99)
    real_preadv = os.preadv
    with FileSource(folder / "img") as src:
        direct_fd = src._direct_fd

        def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            if fd == direct_fd:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)
        for offset, length in [(0, MiB), (17, 4000), (MiB, 99)]:
            assert src.read_view(offset, length) == data[offset : offset + length]


def test_file_shrank(folder: Path) -> None:
    make(folder / "img", 3 * 4096 + 10)
    with FileSource(folder / "img") as src:
        os.truncate(folder / "img", 4096 + 5)
        with pytest.raises(SourceError, match=r"img.*offset 4096"):
            src.read_view(4096, 4096)
        with pytest.raises(SourceError, match=r"img.*offset 100"):
            src.read_view(100, 3 * 4096)
        assert src.read_view(4096, 5) == (folder / "img").read_bytes()[4096:]


def test_close_closes_both_descriptors(folder: Path) -> None:
    make(folder / "img", 10_000)
    before = set(os.listdir("/proc/self/fd"))
    src = FileSource(folder / "img")
    src.read_view(0, 10_000)
    src.close()
    assert set(os.listdir("/proc/self/fd")) == before
