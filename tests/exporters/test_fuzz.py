"""Fuzzing the readers: valid images, mutated at random (seeded), must either read or fail with
a typed lifeboat error — never another exception, a hang, or an unbounded allocation.

Mutations hit the places parsers trust: the first sector, every metadata table (found by
parsing the valid image first) and anywhere in the file; they overwrite single bytes, flip
bits, plant 4- and 8-byte "interesting" integers, or truncate the file. For VHDX, half the
mutations recompute the CRC-32C of headers and region tables afterwards so that they reach the
parser behind the checksums. Each case reads the whole virtual disk when it is small, else its
first and last MiB and a few random spans.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest

from lifeboat.exporters import EXPORTERS, open_image
from lifeboat.exporters.qcow2 import Qcow2Image
from lifeboat.exporters.vhdx import HEADER1, HEADER2, HEADER_SIZE, REGION1, REGION2, REGION_SIZE, with_checksum
from lifeboat.exporters.vmdk import VmdkSparseImage
from lifeboat.plumbing.errors import LifeboatError
from tests.exporters.helpers import MiB, SparsePoint, qemu_img

CASES_PER_IMAGE = int(os.environ.get("LIFEBOAT_FUZZ_CASES", "220"))  # more for a longer hunt
SEED = os.environ.get("LIFEBOAT_FUZZ_SEED", "lifeboat-fuzz")
MAX_PEAK = 64 * MiB
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 2**62, 2**63 - 1, 2**64 - 1, 512, 65536]


def make_images(root: Path) -> dict[str, Path]:
    point = SparsePoint(6 * MiB + 512, {0: 0x11, 2 * MiB: 0x22, 6 * MiB: 0x33})
    images: dict[str, Path] = {}
    for fmt in ("qcow2", "vmdk", "vmdk-stream", "vhdx"):
        path = root / f"lifeboat.{fmt}"
        EXPORTERS.get(fmt)().write(point, path)
        images[fmt] = path
    raw = root / "src.raw"
    raw.write_bytes(point.read(0, point.size))
    for name, fmt, opts in [
        ("qemu-qcow2-deflate", "qcow2", ["-c"]),
        ("qemu-vmdk-stream", "vmdk", ["-o", "subformat=streamOptimized"]),
        ("qemu-vhdx", "vhdx", []),
        ("qemu-vmdk-flat", "vmdk", ["-o", "subformat=monolithicFlat"]),
    ]:
        path = root / f"{name}.{fmt}"
        qemu_img("convert", "-f", "raw", "-O", fmt, *opts, str(raw), str(path))
        images[name] = path
    return images


def hot_spots(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the metadata a parser trusts, found by parsing the valid image."""
    spots = [(0, 1024)]
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic.startswith(b"QFI"):
        q = Qcow2Image(path)
        l1_off = struct.unpack_from(">Q", os.pread(q.fd, 8, 40))[0]
        spots.append((l1_off, len(q.l1) * 8))
        spots += [(e & 0x00FF_FFFF_FFFF_FE00, 4096) for e in q.l1 if e]
        spots += [(q._entry(i) & q.coffset_mask, 64) for i in range(0, q.size // q.cluster_size) if q._entry(i)][:20]
        q.close()
    elif magic.startswith(b"KDMV"):
        v = VmdkSparseImage(path)
        gd_off = struct.unpack_from("<Q", os.pread(v.fd, 8, 56))[0]
        if gd_off != 2**64 - 1:
            spots.append((gd_off * 512, len(v.gd) * 4))
        spots.append((v.file_size - 1536, 1536))
        spots += [(s * 512, 2048) for s in v.gd if s]
        spots += [(v._gte(i) * 512, 16) for i in range(v.size // v.cluster_size) if v._gte(i) > 1][:20]
        v.close()
    elif magic.startswith(b"vhdxfile"):
        spots += [(HEADER1, 80), (HEADER2, 80), (REGION1, 80), (REGION2, 80), (2 * MiB, 256), (2 * MiB + 65536, 64)]
        spots += [(3 * MiB, 64)]
    else:
        spots.append((0, os.path.getsize(path)))
    return spots


def mutate(rnd: random.Random, fd: int, spots: list[tuple[int, int]]) -> str:
    """Apply one random mutation in place; returns its description."""
    size = os.fstat(fd).st_size
    if size == 0:
        return "nothing (empty file)"
    kind = rnd.choice(["byte", "bit", "int32", "int64", "int64", "truncate"])
    if kind == "truncate":
        new = rnd.randrange(0, size)
        os.ftruncate(fd, new)
        return f"truncate to {new}"
    where = rnd.random()
    if where < 0.6:
        off, length = rnd.choice(spots)
        pos = off + rnd.randrange(max(1, length))
    else:
        pos = rnd.randrange(size)
    pos = min(pos, size - 1)
    if kind == "byte":
        os.pwrite(fd, bytes([rnd.randrange(256)]), pos)
    elif kind == "bit":
        old = os.pread(fd, 1, pos)[0]
        os.pwrite(fd, bytes([old ^ (1 << rnd.randrange(8))]), pos)
    else:
        width = 4 if kind == "int32" else 8
        pos -= pos % width
        value = rnd.choice(INTERESTING + [rnd.randrange(2**32), size, size * 2, rnd.randrange(size)])
        value &= (1 << (8 * width)) - 1
        os.pwrite(fd, value.to_bytes(width, rnd.choice(["little", "big"])), pos)
    return f"{kind} at {pos}"


def fix_vhdx_checksums(fd: int) -> None:
    for off, size in ((HEADER1, HEADER_SIZE), (HEADER2, HEADER_SIZE), (REGION1, REGION_SIZE), (REGION2, REGION_SIZE)):
        block = os.pread(fd, size, off)
        if len(block) == size:
            os.pwrite(fd, with_checksum(block), off)


def exercise(path: Path, rnd: random.Random) -> None:
    with open_image(path) as src:
        size = src.size
        if size <= 16 * MiB:
            spans = [(o, min(MiB, size - o)) for o in range(0, size, MiB)]
        else:
            spans = [(0, MiB), (size - MiB, MiB)] + [(rnd.randrange(size - 65536), 65536) for _ in range(3)]
        for off, length in spans:
            data = src.read(off, length)
            assert len(data) == length


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_images(tmp_path_factory.mktemp("fuzz-src"))


IMAGES = [
    *("qcow2", "vmdk", "vmdk-stream", "vhdx"),
    *("qemu-qcow2-deflate", "qemu-vmdk-stream", "qemu-vhdx", "qemu-vmdk-flat"),
]


def mutant(name: str, src: Path, work: Path, rnd: random.Random, spots: list[tuple[int, int]]) -> list[str]:
    """Copy ``src`` to ``work`` and damage the copy one to four times (a VHDX's checksums are
    fixed up half the time, so the damage reaches past them); says what was changed."""
    shutil.copyfile(src, work)
    fd = os.open(work, os.O_RDWR)
    try:
        what = [mutate(rnd, fd, spots) for _ in range(rnd.choice([1, 1, 2, 4]))]
        if name.endswith("vhdx") and rnd.random() < 0.5:
            fix_vhdx_checksums(fd)
    finally:
        os.close(fd)
    return what


@pytest.mark.parametrize("name", IMAGES)
def test_mutated_images_fail_cleanly(name: str, images: dict[str, Path], tmp_path: Path) -> None:
    src = images[name]
    spots = hot_spots(src)
    rnd = random.Random(f"{SEED}-{name}")
    work = tmp_path / src.name
    if name == "qemu-vmdk-flat":  # the descriptor is what gets mutated; the flat extent beside it
        shutil.copy(src.with_name(src.stem + "-flat.vmdk"), tmp_path / (src.stem + "-flat.vmdk"))
    outcomes = {"ok": 0, "error": 0}
    tracemalloc.start()
    try:
        for case in range(CASES_PER_IMAGE):
            what = mutant(name, src, work, rnd, spots)
            tracemalloc.reset_peak()
            try:
                exercise(work, rnd)
                outcomes["ok"] += 1
            except LifeboatError as e:
                assert str(work) in str(e) or work.name in str(e) or "extent" in str(e), f"{what}: {e}"
                outcomes["error"] += 1
            except Exception as e:  # pragma: no cover - the failure being tested for
                pytest.fail(f"case {case} ({what}): {type(e).__name__}: {e}")
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < MAX_PEAK, f"case {case} ({what}) allocated {peak} bytes"
    finally:
        tracemalloc.stop()
    assert outcomes["error"] > CASES_PER_IMAGE // 10  # the mutations do reach the checks
