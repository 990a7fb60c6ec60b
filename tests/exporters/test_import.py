"""Import: images written by qemu-img in every format and variant lifeboat reads are backed up
through ``open_image`` and must restore byte for byte; images lifeboat cannot import are refused
with a clear, typed error."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.errors import SourceError
from lifeboat.exporters import ImageError, UnsupportedImage, detect, open_image
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.plumbing.errors import LifeboatError
from tests.exporters.helpers import MiB, qemu_img

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "raw": ("raw", []),
    "qcow2": ("qcow2", []),
    "qcow2-v2": ("qcow2", ["-o", "compat=0.10"]),
    "qcow2-small-clusters": ("qcow2", ["-o", "cluster_size=4096"]),
    "qcow2-2M-clusters": ("qcow2", ["-o", "cluster_size=2M"]),
    "qcow2-deflate": ("qcow2", ["-c"]),
    "qcow2-zstd": ("qcow2", ["-c", "-o", "compression_type=zstd"]),
    "vmdk-monolithicSparse": ("vmdk", []),
    "vmdk-streamOptimized": ("vmdk", ["-o", "subformat=streamOptimized"]),
    "vmdk-monolithicFlat": ("vmdk", ["-o", "subformat=monolithicFlat"]),
    "vmdk-twoGbMaxExtentSparse": ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"]),
    "vmdk-twoGbMaxExtentFlat": ("vmdk", ["-o", "subformat=twoGbMaxExtentFlat"]),
    "vmdk-zeroed-grain": ("vmdk", ["-o", "zeroed_grain=on"]),
    "vhdx": ("vhdx", []),
    "vhdx-1M-blocks": ("vhdx", ["-o", "block_size=1M"]),
    "vhdx-fixed": ("vhdx", ["-o", "subformat=fixed"]),
}
SIZE = 11 * MiB + 1536


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw disk with random data, text, zero runs and a short tail."""
    rnd = random.Random(7)
    data = bytearray(SIZE)
    data[0 : 2 * MiB] = rnd.randbytes(2 * MiB)
    data[3 * MiB : 5 * MiB] = (b"compressible text " * 200_000)[: 2 * MiB]
    data[5 * MiB + 4096 : 5 * MiB + 4096 + 777] = rnd.randbytes(777)
    data[SIZE - 1000 :] = rnd.randbytes(1000)
    path = tmp_path_factory.mktemp("ref") / "ref.raw"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_qemu_image(variant: str, reference: Path, tmp_path: Path) -> None:
    fmt, opts = VARIANTS[variant]
    image = tmp_path / f"disk.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", fmt, *opts, str(reference), str(image))
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=256 * 1024)
    with open_image(image) as src:
        assert src.size == SIZE
        info = arc.backup("imported", src)
    restored = arc.reader(info)
    assert restored.read(0, restored.size) == reference.read_bytes()
    assert detect(image) == {"raw": "raw", "qcow2": "qcow2", "vhdx": "vhdx"}.get(
        fmt, "vmdk-descriptor" if "Flat" in variant or "twoGb" in variant else "vmdk"
    )


def test_import_lifeboat_export_roundtrip(reference: Path, tmp_path: Path) -> None:
    """lifeboat's own exports import back to the same point content, in every format."""
    from lifeboat.exporters import EXPORTERS

    arc = Archive.init(str(tmp_path / "arc"), chunk_size=64 * 1024)
    with open_image(reference) as src:
        reader = arc.reader(arc.backup("orig", src))
    for fmt in EXPORTERS.names():
        out = tmp_path / f"export.{fmt}"
        EXPORTERS.get(fmt)().write(reader, out)
        with open_image(out) as src:
            back = arc.reader(arc.backup(f"back-{fmt}", src))
        assert back.ids == reader.ids  # same chunks: deduplicated, nothing new stored


def test_refuses_qcow2_with_backing_file(reference: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-O", "qcow2", str(reference), str(base))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    with pytest.raises(UnsupportedImage, match=r"top\.qcow2 has a backing file"):
        open_image(top)


def test_refuses_vhd_and_vmdk_snapshot(reference: Path, tmp_path: Path) -> None:
    vhd = tmp_path / "disk.vhd"
    qemu_img("convert", "-O", "vpc", str(reference), str(vhd))
    with pytest.raises(UnsupportedImage, match="VHD"):
        open_image(vhd)
    base = tmp_path / "base.vmdk"
    qemu_img("convert", "-O", "vmdk", str(reference), str(base))
    delta = tmp_path / "delta.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", str(base), "-F", "vmdk", str(delta))
    with pytest.raises(UnsupportedImage, match="snapshot"):
        open_image(delta)


def test_vmdk_extent_outside_its_directory_is_refused(reference: Path, tmp_path: Path) -> None:
    desc = tmp_path / "disk.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", str(reference), str(desc))
    text = desc.read_text().replace('"disk-flat.vmdk"', '"../../../../etc/passwd"')
    desc.write_text(text)
    with pytest.raises(ImageError, match="must lie in"):
        open_image(desc)


def test_missing_and_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot open"):
        open_image(tmp_path / "nope.qcow2")
    with pytest.raises(LifeboatError):
        open_image(tmp_path)


def test_cli_backup_of_a_qcow2(reference: Path, tmp_path: Path) -> None:
    """``lifeboat backup MACHINE image.qcow2`` imports the image (via orchestrator.sources.open_source)."""

    image = tmp_path / "disk.qcow2"
    qemu_img("convert", "-O", "qcow2", "-c", str(reference), str(image))
    arc = tmp_path / "arc"
    cli = [*LIFEBOAT, "--archive", str(arc)]
    for args in (["archive", "init"], ["backup", "vm1", str(image)], ["restore", "vm1", str(tmp_path / "out.raw")]):
        r = subprocess.run(cli + args, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.raw").read_bytes() == reference.read_bytes()
