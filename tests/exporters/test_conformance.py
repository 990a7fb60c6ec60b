"""Every exporter over one matrix of point contents, judged by qemu-img.

For each format and content: ``qemu-img check`` finds no errors (raw has no checks),
``qemu-img compare`` finds the image identical to the point's bytes, ``qemu-img info`` shows the
expected format details, the export is sparse where the point is zero, no temporary file is
left behind, and lifeboat's own reader reads the image back to the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lifeboat.archive import Archive, PointReader
from lifeboat.archive.errors import DestinationError
from lifeboat.exporters import EXPORTERS, Exporter, open_image
from tests.exporters.helpers import MiB, backup_bytes, contents, qemu_img, qemu_info

CONTENTS = contents()
CHUNK_SIZES = [4096, 64 * 1024, MiB]


@pytest.fixture(scope="module")
def points(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], PointReader]:
    """Every content backed up at every chunk size (small contents only at the smaller ones)."""
    root = tmp_path_factory.mktemp("points")
    out: dict[tuple[int, str], PointReader] = {}
    for cs in CHUNK_SIZES:
        arc = Archive.init(str(root / f"arc-{cs}"), chunk_size=cs)
        for name, data in CONTENTS.items():
            out[(cs, name)] = backup_bytes(arc, name, data)
    return out


def expected_details(w: Exporter, info: dict[str, object]) -> None:
    spec = info.get("format-specific")
    if w.format == "qcow2":
        assert isinstance(spec, dict)
        data = spec["data"]
        assert data["compat"] == "1.1" and data["refcount-bits"] == 16 and data["corrupt"] is False
        assert info["cluster-size"] == 65536
    elif w.format in ("vmdk", "vmdk-stream"):
        assert isinstance(spec, dict)
        data = spec["data"]
        stream = w.format == "vmdk-stream"
        assert data["create-type"] == ("streamOptimized" if stream else "monolithicSparse")
        assert data["parent-cid"] == 0xFFFFFFFF
        [extent] = data["extents"]
        assert extent.get("compressed", False) is stream and extent["cluster-size"] == 65536
    elif w.format == "vhdx":
        assert info["cluster-size"] in (8 * MiB, 16 * MiB, 32 * MiB, 64 * MiB)


def check_export(w: Exporter, reader: PointReader, tmp: Path) -> None:
    ref = tmp / "ref.raw"
    data = reader.read(0, reader.size)
    ref.write_bytes(data)
    out = tmp / f"out.{w.format}"
    result = w.write(reader, out)
    assert [p.name for p in tmp.iterdir() if "lifeboat-partial" in p.name] == []
    fmt = w.qemu_format
    if fmt != "raw":
        r = qemu_img("check", "-f", fmt, str(out))
        assert "No errors were found on the image." in r.stdout
    r = qemu_img("compare", "-f", fmt, "-F", "raw", str(out), str(ref))
    assert "Images are identical." in r.stdout
    info = qemu_info(out, fmt)
    assert info["format"] == fmt
    sectors = -(-reader.size // 512) * 512
    assert result.virtual_size == w.virtual_size(reader.size) == (reader.size if fmt == "raw" else sectors)
    assert info["virtual-size"] == sectors  # qemu shows a raw file's size rounded up to a sector
    expected_details(w, info)
    nonzero = sum(1 for i in range(0, len(data), 4096) if any(data[i : i + 4096]))
    assert result.allocated_bytes <= nonzero * 4096 * 1.1 + 8 * MiB  # sparse: zeros are not stored
    with open_image(out) as src:
        assert src.size == result.virtual_size
        back = src.read(0, src.size)
    assert back[: len(data)] == data and not any(back[len(data) :])


@pytest.mark.parametrize("content", list(CONTENTS))
@pytest.mark.parametrize("fmt", EXPORTERS.names())
def test_writer_matrix(fmt: str, content: str, points: dict[tuple[int, str], PointReader], tmp_path: Path) -> None:
    w = EXPORTERS.get(fmt)()
    reader = points[(64 * 1024, content)]
    if reader.size < w.min_size:  # VMDK, VHDX: no empty disks
        with pytest.raises(DestinationError, match="at least 1 byte"):
            w.write(reader, tmp_path / "out")
        assert list(tmp_path.iterdir()) == []
        return
    check_export(w, reader, tmp_path)


@pytest.mark.parametrize("chunk_size", [4096, MiB])
@pytest.mark.parametrize("fmt", EXPORTERS.names())
def test_chunk_sizes(fmt: str, chunk_size: int, points: dict[tuple[int, str], PointReader], tmp_path: Path) -> None:
    """Chunks smaller than a cluster (4 KiB) and larger ones (1 MiB) give the same image."""
    for content in ("sparse-odd", "odd-1MiB-512"):
        sub = tmp_path / content
        sub.mkdir()
        check_export(EXPORTERS.get(fmt)(), points[(chunk_size, content)], sub)


@pytest.mark.parametrize("fmt", EXPORTERS.names())
def test_single_worker(fmt: str, points: dict[tuple[int, str], PointReader], tmp_path: Path) -> None:
    check_export(EXPORTERS.get(fmt)(workers=1), points[(64 * 1024, "sparse-odd")], tmp_path)
