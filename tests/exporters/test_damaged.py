"""Damaged images (issue 18, items 3 and 6): each must be read exactly as ``qemu-img`` reads it or
refused with an ``ImageError`` naming the structure at fault, before a point is stored; a huge,
mostly unallocated image costs its allocated data, not its virtual size.

Each damage here was imported as if it were fine before the readers checked it: qemu-img
refuses every one of them (checked in the test, so the reference is visible).
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.exporters import ImageError, open_image
from lifeboat.exporters.vmdk import VmdkSparseImage
from tests.exporters.helpers import MiB, qemu_img

GiB = 1024 * MiB


def qemu_refuses(path: Path, fmt: str) -> None:
    """``qemu-img convert`` of ``path`` to raw fails (the damage is real to qemu too)."""
    r = qemu_img("convert", "-f", fmt, "-O", "raw", str(path), str(path.with_suffix(".out")), check=False)
    assert r.returncode != 0, f"qemu-img reads {path.name}"


def import_refused(path: Path, tmp_path: Path, match: str) -> None:
    """Importing ``path`` fails with ``match`` in the message, and the archive holds no point."""
    arc = Archive.init(str(tmp_path / "arc"))
    with pytest.raises(ImageError, match=match):
        with open_image(path) as src:
            arc.backup("damaged", src)
    assert arc.points("damaged") == []


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 MiB raw disk of random bytes."""
    path = tmp_path_factory.mktemp("damaged") / "data.raw"
    path.write_bytes(random.Random(18).randbytes(MiB))
    return path


def test_qcow2_v2_with_the_v3_zero_bit(data: Path, tmp_path: Path) -> None:
    image = tmp_path / "v2.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "compat=0.10", str(data), str(image))
    with open(image, "r+b") as f:
        l1_offset = struct.unpack(">Q", os.pread(f.fileno(), 8, 40))[0]
        l2_offset = struct.unpack(">Q", os.pread(f.fileno(), 8, l1_offset))[0] & 0x00FF_FFFF_FFFF_FE00
        entry = struct.unpack(">Q", os.pread(f.fileno(), 8, l2_offset))[0]
        os.pwrite(f.fileno(), struct.pack(">Q", entry | 1), l2_offset)
    qemu_refuses(image, "qcow2")
    import_refused(image, tmp_path, "guest cluster 0 has the 'reads as zeros' bit, which version 2 lacks")


@pytest.mark.parametrize("damage", ["adler32", "truncated"])
def test_vmdk_stream_damaged_grain(damage: str, data: Path, tmp_path: Path) -> None:
    image = tmp_path / "stream.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(data), str(image))
    with VmdkSparseImage(image) as v:
        marker = v._gte(0) * 512
    with open(image, "r+b") as f:
        size = struct.unpack("<I", os.pread(f.fileno(), 4, marker + 8))[0]
        if damage == "adler32":  # the stream's last byte: its checksum
            last = marker + 12 + size - 1
            os.pwrite(f.fileno(), bytes([os.pread(f.fileno(), 1, last)[0] ^ 0x55]), last)
        else:  # the marker claims half the stream: what inflates is a short, zero-padded grain
            os.pwrite(f.fileno(), struct.pack("<I", size // 2), marker + 8)
    qemu_refuses(image, "vmdk")
    match = "does not inflate" if damage == "adler32" else "is truncated"
    import_refused(image, tmp_path, f"compressed grain 0 at offset {marker} {match}")


def test_vhdx_region_table_crc(data: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", str(data), str(image))
    with open(image, "r+b") as f:
        os.pwrite(f.fileno(), b"\x01", 192 * 1024 + 100)  # inside region table 1, after its entries
    qemu_refuses(image, "vhdx")
    import_refused(image, tmp_path, "region table 1 .* CRC-32C")


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx"])
def test_huge_sparse_image_costs_its_data(fmt: str, tmp_path: Path) -> None:
    """A 2 TiB image holding 1 MiB: its data extents are that MiB (a VHDX: its 32 MiB block); a
    256 GiB one imports with only that block read and restores byte for byte."""
    for size, where in ((2048 * GiB, 1536 * GiB), (256 * GiB, 100 * GiB)):
        image = tmp_path / f"huge-{size // GiB}.{fmt}"
        qemu_img("create", "-f", fmt, str(image), str(size))
        r = subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P 0x5a {where} 1M", str(image)], capture_output=True)
        assert r.returncode == 0, r.stderr
        with open_image(image) as src:
            assert src.size == size
            [(offset, length)] = src.data_extents() or []
            assert offset <= where and where + MiB <= offset + length <= where + 32 * MiB
            if size > 256 * GiB:
                continue
            arc = Archive.init(str(tmp_path / "arc"))
            info = arc.backup("huge", src)
        assert info.bytes_read <= 32 * MiB  # the allocated block, not 256 GiB
        restored = arc.reader(info)
        assert restored.read(where, MiB) == b"\x5a" * MiB
        assert restored.read(where - MiB, MiB) == bytes(MiB)
