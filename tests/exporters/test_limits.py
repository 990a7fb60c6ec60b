"""Size limits: the largest point each format can hold is written and judged by qemu; one sector
more is refused with a clear error before any file is created.

Backing up terabytes of zeros would read every byte, so these tests feed the exporters a sparse
stand-in for a point (``SparsePoint``, the reader interface with a few data islands).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lifeboat.exporters import EXPORTERS, ImageTooLarge, open_image
from lifeboat.exporters.base import PiB, TiB
from tests.exporters.helpers import MiB, SparsePoint, qemu_img, qemu_info

LIMITS = {"qcow2": 2 * PiB, "vmdk": 2 * TiB, "vmdk-stream": 2 * TiB, "vhdx": 64 * TiB, "raw": 4 * TiB}


def qemu_io_read(path: Path, fmt: str, offset: int, length: int, pattern: int) -> None:
    """qemu-io reads ``length`` bytes at ``offset`` and checks they all equal ``pattern``."""
    r = subprocess.run(
        ["qemu-io", "-f", fmt, "-r", "-c", f"read -P {pattern:#x} {offset} {length}", str(path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("fmt", EXPORTERS.names())
def test_largest_size(fmt: str, tmp_path: Path) -> None:
    w = EXPORTERS.get(fmt)()
    size = LIMITS[fmt]
    assert fmt == "raw" or w.max_size == size
    last = size - MiB
    point = SparsePoint(size, {0: 0xA5, 5 * MiB: 0x3C, last: 0x5A})
    out = tmp_path / f"huge.{fmt}"
    result = w.write(point, out)
    assert result.virtual_size == size
    assert result.allocated_bytes < 256 * MiB
    q = w.qemu_format
    assert qemu_info(out, q)["virtual-size"] == size
    if q != "raw":
        assert "No errors were found" in qemu_img("check", "-f", q, str(out)).stdout
    qemu_io_read(out, q, 0, MiB, 0xA5)
    qemu_io_read(out, q, 5 * MiB, MiB, 0x3C)
    qemu_io_read(out, q, 64 * MiB, MiB, 0)
    qemu_io_read(out, q, last, MiB, 0x5A)
    with open_image(out) as src:
        assert src.size == size
        assert src.read(last - 512, 1024) == bytes(512) + b"\x5a" * 512
        assert src.read(size // 2, 4096) == bytes(4096)


@pytest.mark.parametrize("fmt", [f for f in EXPORTERS.names() if f != "raw"])
def test_one_sector_too_many(fmt: str, tmp_path: Path) -> None:
    w = EXPORTERS.get(fmt)()
    point = SparsePoint(w.max_size + 1, {0: 1})
    with pytest.raises(ImageTooLarge, match=f"--format {fmt}: the point is .* more than the .* image can hold"):
        w.write(point, tmp_path / "too-big")
    assert list(tmp_path.iterdir()) == []
    w.check_size(w.max_size)
    with pytest.raises(ImageTooLarge):
        w.check_size(w.max_size + 1)
