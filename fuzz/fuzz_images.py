"""Fuzz the disk-image readers (``lifeboat.exporters.open_image``: qcow2, VMDK sparse and
streamOptimized, VMDK descriptor files, VHDX; the format sniffed from the magic).

Why: ``lifeboat backup MACHINE IMAGE`` imports images that come from elsewhere and may be damaged
or hostile; every input must open and read, or fail with a typed ``LifeboatError`` (an
``ImageError`` naming the structure), never another exception, a hang, or an allocation or a
walk sized by a field rather than by the file.

The input is the image file with long zero runs folded (``HOLE`` + a 3-byte big-endian count of
zero bytes), so a VHDX, whose structures sit at 1 MiB boundaries, fits a seed of a few KiB; it
is unfolded (to at most 16 MiB) into ``image`` in a private temporary folder and opened. Then
what a backup reads is read: the data extents (the allocation-table walk), every extent when
the virtual size is at most 64 MiB, else the first MiB of a few of them.

Seeds (``fuzz/corpus/images/``, 1 MiB virtual disks made by qemu-img and by lifeboat's exporters,
folded): ``python fuzz/fuzz_images.py --make-corpus fuzz/corpus/images``.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lifeboat.exporters import open_image
from lifeboat.plumbing.errors import LifeboatError

HOLE = b"\xffHOLE"
MIN_FOLD = 64  # zero runs shorter than this stay as they are
MAX_FILE = 16 * 1024 * 1024
MAX_FULL_READ = 64 * 1024 * 1024
MiB = 1024 * 1024

_DIR = Path(tempfile.mkdtemp(prefix="lifeboat-fuzz-images-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
_FILE = _DIR / "image"


def unfold(data: bytes) -> bytes:
    """The image file an input stands for: each ``HOLE`` + count becomes that many zero bytes."""
    out = bytearray()
    pos = 0
    while (at := data.find(HOLE, pos)) >= 0 and len(out) <= MAX_FILE:
        out += data[pos:at]
        count = int.from_bytes(data[at + len(HOLE) : at + len(HOLE) + 3], "big")
        out += bytes(min(count, MAX_FILE + 1 - len(out)))
        pos = at + len(HOLE) + 3
    out += data[pos:]
    return bytes(out[:MAX_FILE])


def fold(image: bytes) -> bytes:
    """``unfold``'s inverse: zero runs of ``MIN_FOLD`` bytes or more as ``HOLE`` + count."""
    assert HOLE not in image
    out = bytearray()
    pos = 0
    for m in re.finditer(rb"\0{%d,}" % MIN_FOLD, image):
        out += image[pos : m.start()]
        for start in range(m.start(), m.end(), 0xFFFFFF):
            out += HOLE + min(0xFFFFFF, m.end() - start).to_bytes(3, "big")
        pos = m.end()
    out += image[pos:]
    return bytes(out)


def test_one_input(data: bytes) -> None:
    """Open ``data`` (folded) as an image and read what a backup would read."""
    _FILE.write_bytes(unfold(data))
    try:
        with open_image(_FILE) as src:
            extents = src.data_extents()
            if extents is None:  # a raw file that cannot tell its holes: all of it
                extents = [(0, src.size)]
            assert all(0 <= off and 0 < n and off + n <= src.size for off, n in extents), extents
            if src.size > MAX_FULL_READ:
                spans = [(off, min(n, MiB)) for off, n in extents[:8]]
            else:
                spans = [(o, min(MiB, off + n - o)) for off, n in extents for o in range(off, off + n, MiB)]
            for off, n in spans:
                assert len(src.read(off, n)) == n
    except LifeboatError:
        return


SEEDS: dict[str, list[str]] = {
    "qcow2": ["-f", "qcow2", "-o", "cluster_size=4096"],
    "qcow2-v2": ["-f", "qcow2", "-o", "cluster_size=4096,compat=0.10"],
    "qcow2-deflate": ["-f", "qcow2", "-c", "-o", "cluster_size=4096"],
    "vmdk-sparse": ["-f", "vmdk"],
    "vmdk-stream": ["-f", "vmdk", "-o", "subformat=streamOptimized"],
    "vmdk-zeroed-grain": ["-f", "vmdk", "-o", "zeroed_grain=on"],
    "vhdx": ["-f", "vhdx", "-o", "block_size=1M"],
}


def make_corpus(out: Path) -> None:
    """Write the seed corpus: 1 MiB disks (a few KiB of text and random bytes) made by qemu-img
    and by lifeboat's exporters, plus a monolithicFlat descriptor, each folded."""
    from lifeboat.archive import Archive
    from lifeboat.archive.files import FileSource
    from lifeboat.exporters import EXPORTERS

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lifeboat-fuzz-corpus-"))
    try:
        raw = work / "disk.raw"
        disk = bytearray(MiB)
        disk[0:512] = os.urandom(512)
        disk[200_000:204_000] = b"lifeboat fuzz seed " * 210 + b"x" * 10
        disk[MiB - 700 :] = os.urandom(700)
        raw.write_bytes(bytes(disk))
        for name, args in SEEDS.items():
            image = work / name
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", *args[1:], str(raw), str(image)], check=True)
            (out / name).write_bytes(fold(image.read_bytes()))
        flat = work / "flat.vmdk"
        subprocess.run(["qemu-img", "create", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(flat), "1M"],
                       check=True, capture_output=True)  # fmt: skip
        text = re.sub(rb'RW \d+ FLAT "flat-flat.vmdk" 0', b'RW 2 FLAT "image" 0', flat.read_bytes())
        (out / "vmdk-descriptor").write_bytes(fold(text.ljust(1024, b"\0")))  # its extent: itself
        arc = Archive.init(str(work / "arc"), chunk_size=64 * 1024)
        with FileSource(raw) as src:
            point = arc.reader(arc.backup("seed", src))
        for fmt in ("qcow2", "vmdk", "vmdk-stream", "vhdx"):
            image = work / f"lifeboat.{fmt}"
            EXPORTERS.get(fmt)().write(point, image)
            (out / f"lifeboat-{fmt}").write_bytes(fold(image.read_bytes()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--make-corpus"] and len(sys.argv) == 3:
        make_corpus(Path(sys.argv[2]))
    else:
        sys.exit(f"usage: {sys.argv[0]} --make-corpus DIR")
