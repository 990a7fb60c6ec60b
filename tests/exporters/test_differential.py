"""Differential check of the image readers against ``qemu-img convert -O raw`` on mutated images.

The rule (issue 18, item 3): an image lifeboat accepts must read exactly as qemu-img reads it,
and an image qemu-img refuses lifeboat must refuse too (lifeboat may refuse more: an offset
past the end of the file, which qemu reads as zeros, is damage to lifeboat). The mutations are
``test_fuzz``'s (seeded); lifeboat's side reads what a backup reads: the ``data_extents`` of the
image, the rest being zeros. ``LIFEBOAT_DIFF_CASES`` sets the mutants per image (default 40,
about 320 in all).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from lifeboat.exporters import detect, open_image
from lifeboat.plumbing.errors import LifeboatError
from tests.exporters.helpers import MiB
from tests.exporters.test_fuzz import IMAGES, hot_spots, make_images, mutant

CASES_PER_IMAGE = int(os.environ.get("LIFEBOAT_DIFF_CASES", "40"))
QEMU_FORMAT = {"qcow2": "qcow2", "vmdk": "vmdk", "vmdk-descriptor": "vmdk", "vhdx": "vhdx"}
MAX_DATA = 256 * MiB  # a mutant whose tables map more than this is not compared byte by byte


def file_data_runs(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the allocated parts of a sparse file (SEEK_DATA / SEEK_HOLE)."""
    runs: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, pos - start))
    finally:
        os.close(fd)
    return runs


def lifeboat_read(path: Path) -> tuple[int, list[tuple[int, bytes]]] | str:
    """(virtual size, [(offset, bytes)] of the data extents), or the error's message."""
    try:
        with open_image(path) as src:
            extents = src.data_extents() or [(0, src.size)]  # None: a raw file that cannot tell
            if sum(n for _, n in extents) > MAX_DATA:
                return src.size, []
            return src.size, [(off, src.read(off, n)) for off, n in extents]
    except LifeboatError as e:
        return str(e)


def difference(out: Path, size: int, runs: list[tuple[int, bytes]]) -> str | None:
    """Where qemu's raw output differs from lifeboat's reading, or None."""
    if out.stat().st_size != size:
        return f"virtual size: qemu {out.stat().st_size}, lifeboat {size}"
    with open(out, "rb") as f:
        for off, data in runs:
            f.seek(off)
            if f.read(len(data)) != data:
                return f"bytes differ in the extent at {off} (+{len(data)})"
        covered = [(off, off + len(data)) for off, data in runs]
        for off, n in file_data_runs(out):  # outside lifeboat's extents, qemu must read zeros
            pos, end = off, off + n
            for lo, hi in covered:
                if hi <= pos or lo >= end:
                    continue
                if lo > pos:
                    f.seek(pos)
                    if f.read(lo - pos).strip(b"\0"):
                        return f"qemu reads data at {pos} that lifeboat calls unallocated"
                pos = max(pos, hi)
            if pos < end:
                f.seek(pos)
                if f.read(end - pos).strip(b"\0"):
                    return f"qemu reads data at {pos} that lifeboat calls unallocated"
    return None


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_images(tmp_path_factory.mktemp("diff-src"))


@pytest.mark.parametrize("name", IMAGES)
def test_mutants_read_as_qemu_reads_them(name: str, images: dict[str, Path], tmp_path: Path) -> None:
    src = images[name]
    spots = hot_spots(src)
    rnd = random.Random(f"lifeboat-diff-{name}")
    work = tmp_path / src.name
    if name == "qemu-vmdk-flat":
        shutil.copy(src.with_name(src.stem + "-flat.vmdk"), tmp_path / (src.stem + "-flat.vmdk"))
    out = tmp_path / "qemu.raw"
    found: list[str] = []
    outcomes = {"both read": 0, "both refuse": 0, "lifeboat refuses": 0}
    for case in range(CASES_PER_IMAGE):
        what = mutant(name, src, work, rnd, spots)
        kind = detect(work)
        if kind not in QEMU_FORMAT:  # the magic is gone: both read it as raw, byte for byte
            continue
        out.unlink(missing_ok=True)
        r = subprocess.run(
            ["qemu-img", "convert", "-f", QEMU_FORMAT[kind], "-O", "raw", str(work), str(out)],
            capture_output=True, text=True, errors="replace", timeout=120,
        )  # fmt: skip
        mine = lifeboat_read(work)
        if isinstance(mine, str):
            outcomes["both refuse" if r.returncode else "lifeboat refuses"] += 1
        elif r.returncode:
            found.append(f"case {case} {what}: qemu-img refuses ({r.stderr.strip()[:160]}), lifeboat reads it")
        else:
            outcomes["both read"] += 1
            diff = difference(out, *mine)
            if diff:
                found.append(f"case {case} {what}: {diff}")
    assert not found, "\n".join(found)
    assert outcomes["both read"] and outcomes["both refuse"], outcomes  # the mutants reach both sides
