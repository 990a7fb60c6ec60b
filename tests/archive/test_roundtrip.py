"""Backups restore byte for byte: random, sparse, all-zero and odd sizes; incremental chains."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.errors import BadSelector, WrongKey
from lifeboat.archive.formats import ZERO_ID
from lifeboat.archive.restore import restore
from tests.archive.helpers import BytesSource, read_all

CS = 4096


@pytest.fixture
def arc(tmp_path: Path) -> Archive:
    return Archive.init(str(tmp_path / "arc"), chunk_size=CS)


def _sparse(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    buf = bytearray(size)
    for _ in range(max(1, size // (CS * 8))):
        off = rnd.randrange(0, size)
        n = min(rnd.randrange(1, 3 * CS), size - off)
        buf[off:off + n] = rnd.randbytes(n)
    return bytes(buf)


CASES = {
    "one-byte": b"\x7f",
    "one-zero-byte": b"\x00",
    "512-bytes": os.urandom(512),
    "exact-chunk": os.urandom(CS),
    "chunk-plus-one": os.urandom(CS + 1),
    "odd-random": os.urandom(CS * 37 + 1234),
    "all-zero": bytes(CS * 50),
    "all-zero-odd": bytes(CS * 9 + 17),
    "sparse": _sparse(CS * 200 + 99, 1),
    "repetitive": (b"lifeboat" * 1000)[: CS * 3 - 5],
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_roundtrip(arc: Archive, tmp_path: Path, name: str) -> None:
    data = CASES[name]
    info = arc.backup("m", BytesSource(data))
    assert info.size == len(data)
    assert read_all(arc.reader(info)) == data
    out = tmp_path / "out.img"
    restore(arc.reader(info), out)
    assert out.read_bytes() == data
    # a fresh process view of the archive sees the same
    again = Archive.open(str(tmp_path / "arc"))
    assert read_all(again.reader(again.resolve("m@latest"))) == data


def test_zero_chunks_are_stored_as_nothing(arc: Archive, tmp_path: Path) -> None:
    info = arc.backup("z", BytesSource(bytes(CS * 64)))
    assert info.bytes_stored == 0
    assert all(i == ZERO_ID for i in arc.chunk_table(info).ids)
    out = tmp_path / "z.img"
    restore(arc.reader(info), out)
    assert out.stat().st_size == CS * 64
    assert out.stat().st_blocks == 0  # sparse: holes, not written zeros


def test_twenty_incremental_points(arc: Archive, tmp_path: Path) -> None:
    rnd = random.Random(20)
    disk = bytearray(_sparse(CS * 64 + 321, 2))
    versions = []
    for _ in range(20):
        for _ in range(rnd.randrange(1, 6)):
            off = rnd.randrange(0, len(disk))
            n = min(rnd.randrange(1, CS * 2), len(disk) - off)
            disk[off:off + n] = rnd.randbytes(n) if rnd.random() < 0.8 else bytes(n)
        info = arc.backup("inc", BytesSource(bytes(disk)))
        versions.append((info, bytes(disk)))
    pts = arc.points("inc")
    assert [p.point for p in pts] == [v[0].point for v in versions]
    assert pts[0].parent is None and all(p.parent == q.point for p, q in zip(pts[1:], pts, strict=False))
    assert sum(p.bytes_new for p in pts[1:]) < 20 * len(disk) // 4  # incrementals store only changes
    for i, (info, expected) in enumerate(versions):
        out = tmp_path / f"v{i}.img"
        restore(arc.reader(arc.resolve(f"inc@{info.point}")), out)
        assert out.read_bytes() == expected, f"point {i} differs"


def test_random_access_reads(arc: Archive) -> None:
    data = os.urandom(CS * 10 + 5)
    r = arc.reader(arc.backup("r", BytesSource(data)))
    rnd = random.Random(3)
    for _ in range(300):
        off = rnd.randrange(0, len(data))
        n = rnd.randrange(0, len(data) - off + 1)
        assert r.read(off, n) == data[off:off + n]
    assert list(r.extents()) == [(0, len(data), False)]


def test_selectors(arc: Archive) -> None:
    a = arc.backup("s", BytesSource(b"a" * 100))
    b = arc.backup("s", BytesSource(b"b" * 100))
    assert arc.resolve("s").point == b.point
    assert arc.resolve("s@latest").point == b.point
    assert arc.resolve(f"s@{a.point}").point == a.point
    assert arc.resolve(f"s@{a.time}").point == a.point
    assert arc.resolve("s@2999-01-01T00:00:00Z").point == b.point
    with pytest.raises(BadSelector, match="no point of 's' at or before"):
        arc.resolve("s@2000-01-01T00:00:00")
    with pytest.raises(BadSelector, match="not a point id"):
        arc.resolve("s@yesterday")
    with pytest.raises(BadSelector, match="no points"):
        arc.resolve("other@latest")
    with pytest.raises(BadSelector, match="nothing after"):
        arc.resolve("s@")
    with pytest.raises(BadSelector, match="invalid"):
        arc.resolve("../etc@latest")


def test_encrypted_roundtrip_and_wrong_key(tmp_path: Path) -> None:
    key = tmp_path / "key"
    loc = str(tmp_path / "enc")
    arc = Archive.init(loc, chunk_size=CS, encrypt=True, key_file=str(key))
    assert key.stat().st_mode & 0o777 == 0o600
    data = b"secret disk " * 5000
    arc.backup("e", BytesSource(data))
    again = Archive.open(loc, key_file=str(key))
    assert read_all(again.reader(again.resolve("e"))) == data
    packs = list((tmp_path / "enc" / "packs").rglob("*"))
    assert not any(b"secret disk" in p.read_bytes() for p in packs if p.is_file())
    wrong = tmp_path / "wrong"
    wrong.write_bytes(os.urandom(32))
    with pytest.raises(WrongKey, match="does not open"):
        Archive.open(loc, key_file=str(wrong))
    with pytest.raises(WrongKey, match="encrypted"):
        Archive.open(loc)


def test_incremental_from_changed_extents(arc: Archive) -> None:
    disk = bytearray(os.urandom(CS * 20 + 100))
    base = arc.backup("cbt", BytesSource(bytes(disk)))
    disk[CS * 3 + 10:CS * 3 + 20] = os.urandom(10)
    disk[-50:] = bytes(50)
    read_offsets: list[int] = []

    class Tracking(BytesSource):
        def read(self, offset: int, length: int) -> bytes:
            read_offsets.append(offset)
            return super().read(offset, length)

    info = arc.backup("cbt", Tracking(bytes(disk)), changed=[(CS * 3 + 10, 10), (len(disk) - 50, 50)], base=base)
    assert sorted(read_offsets) == [CS * 3 + 10, len(disk) - 50]  # only the changed bytes
    assert info.parent == base.point and info.bytes_read == 60
    assert read_all(arc.reader(info)) == bytes(disk)
    assert read_all(arc.reader(base)) != bytes(disk)


@pytest.mark.parametrize("refusal", ["no-direct-fd", "direct-write-einval"])
def test_restore_writes_through_the_cache_when_o_direct_is_refused(
        arc: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str) -> None:
    import errno

    import lifeboat.archive.restore as restore_mod

    data = os.urandom(CS * 9 + 123)
    info = arc.backup("od", BytesSource(data))
    direct_fds: list[int] = []
    if refusal == "no-direct-fd":
        monkeypatch.setattr(restore_mod, "open_direct", lambda path, mode=0: None)
    else:
        real_open, real_write = restore_mod.open_direct, restore_mod.pwrite_all

        def opened(path: str | os.PathLike[str], mode: int = os.O_RDONLY) -> int | None:
            fd = real_open(path, mode)
            if fd is not None:
                direct_fds.append(fd)
            return fd

        def refusing(fd: int, buffers: list[bytes | bytearray | memoryview], offset: int) -> None:
            if fd in direct_fds:  # as a file system that accepted the open but not the write
                raise OSError(errno.EINVAL, "Invalid argument")
            real_write(fd, buffers, offset)

        monkeypatch.setattr(restore_mod, "open_direct", opened)
        monkeypatch.setattr(restore_mod, "pwrite_all", refusing)
    restore(arc.reader(info), tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == data
    assert refusal == "no-direct-fd" or direct_fds
