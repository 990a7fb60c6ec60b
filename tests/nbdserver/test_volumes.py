"""The copy-on-write and hydrating volumes against a model: random unaligned writes, zeroes and
trims on a point whose size is not a multiple of any block size, checked byte for byte, across
close and reopen (a server restart), from several threads at once."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.files import FileSource
from lifeboat.archive.throttle import ThrottledBackend
from lifeboat.nbdserver.hydrate import HydrateVolume
from lifeboat.nbdserver.overlay import CowVolume
from lifeboat.nbdserver.service import identity
from lifeboat.nbdserver.volume import PointVolume, Volume, VolumeError
from lifeboat.plumbing import nbd as P

SIZE = 3 * 1024 * 1024 + 12345


@pytest.fixture
def small_point(tmp_path: Path) -> tuple[Archive, bytes]:
    rng = random.Random(5)
    data = bytearray(SIZE)
    for off in range(0, SIZE, 65536):
        if rng.random() < 0.6:
            n = min(65536, SIZE - off)
            data[off : off + n] = rng.randbytes(n)
    img = tmp_path / "small.img"
    img.write_bytes(bytes(data))
    arc = Archive.init(str(tmp_path / "archive"), chunk_size=65536)  # many chunks in a small point
    with FileSource(img) as src:
        arc.backup("small", src)
    return arc, bytes(data)


def random_ops(vol: Volume, model: bytearray, rng: random.Random, count: int, lock: threading.Lock) -> None:
    for _ in range(count):
        off = rng.randrange(0, SIZE - 1)
        n = rng.randrange(1, min(300_000, SIZE - off) + 1)
        kind = rng.random()
        with lock:  # the model and the volume change together; the volume is shared by threads
            if kind < 0.6:
                buf = rng.randbytes(n)
                vol.write(off, buf, fua=rng.random() < 0.1)
                model[off : off + n] = buf
            elif kind < 0.85:
                vol.zero(off, n, fua=False, may_trim=rng.random() < 0.5, fast=False)
                model[off : off + n] = bytes(n)
            else:
                vol.flush()


def random_ops_in_threads(vol: Volume, model: bytearray, seed: int, threads: int, count: int) -> None:
    """``random_ops`` in ``threads`` threads at once (seeds ``seed``, ``seed + 1``, …), waited for."""
    lock = threading.Lock()
    workers = [
        threading.Thread(target=random_ops, args=(vol, model, random.Random(seed + t), count, lock))
        for t in range(threads)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()


def check(vol: Volume, model: bytes) -> None:
    assert vol.read(0, SIZE) == model
    for off, n in ((0, 1), (SIZE - 1, 1), (65535, 2), (12345, 200_000)):
        assert vol.read(off, n) == model[off : off + n]
        fast = vol.read_fast(off, n)
        assert fast is None or fast == model[off : off + n]
    covered = 0
    for n, flags in vol.extents(0, SIZE):
        if flags & P.STATE_ZERO:
            assert model[covered : covered + n] == bytes(n), f"extent at {covered} claims zeros"
        covered += n
    assert covered >= SIZE


def test_cow_volume_matches_model_across_restarts(small_point: tuple[Archive, bytes], tmp_path: Path) -> None:
    arc, data = small_point
    info = arc.resolve("small")
    model = bytearray(data)
    overlay = tmp_path / "small.cow"
    for round_ in range(3):
        vol = CowVolume(PointVolume(arc.reader(info)), overlay, identity(arc, info))
        check(vol, bytes(model))
        random_ops_in_threads(vol, model, round_ * 10, threads=4, count=40)
        check(vol, bytes(model))
        vol.trim(65536 * 3 + 10, 65536 * 2, fua=False)  # only whole clusters are discarded: read as zeros
        model[65536 * 4 : 65536 * 5] = bytes(65536)
        check(vol, bytes(model))
        vol.close()
    assert arc.reader(info).read(0, SIZE) == data  # the archive is never written


def test_hydrate_volume_matches_model_and_finishes(small_point: tuple[Archive, bytes], tmp_path: Path) -> None:
    arc, data = small_point
    info = arc.resolve("small")
    model = bytearray(data)
    target = tmp_path / "small.raw"
    plain = arc.backend
    for round_ in range(2):
        # round 0 over a slow archive: the background copy runs while the writes come in
        arc.backend = ThrottledBackend(plain, 1_500_000) if round_ == 0 else plain
        vol = HydrateVolume(PointVolume(arc.reader(info)), target, identity(arc, info), chunk_size=info.chunk_size,
                            writable=True, log=lambda m: None)
        vol.start()
        random_ops_in_threads(vol, model, round_ * 10, threads=3, count=30)
        check(vol, bytes(model))
        if round_ == 1:
            assert vol.finished.wait(60)
        vol.close()
    assert target.read_bytes() == bytes(model)
    assert arc.reader(info).read(0, SIZE) == data


def test_read_only_volumes_refuse_writes(small_point: tuple[Archive, bytes], tmp_path: Path) -> None:
    arc, _ = small_point
    info = arc.resolve("small")
    vol = PointVolume(arc.reader(info))
    with pytest.raises(VolumeError) as e:
        vol.write(0, b"x", fua=False)
    assert e.value.error == P.EPERM
    hyd = HydrateVolume(PointVolume(arc.reader(info)), tmp_path / "ro.raw", identity(arc, info),
                        chunk_size=info.chunk_size, writable=False, log=lambda m: None)
    with pytest.raises(VolumeError):
        hyd.zero(0, 10, fua=False, may_trim=True, fast=False)
    hyd.close()
    vol.close()
