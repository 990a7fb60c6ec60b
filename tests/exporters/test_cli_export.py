"""``lifeboat export``: the form of shared/CLI.md, --json, --force, and exit status 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.formats import ZERO_ID, ChunkTable
from lifeboat.archive.points import PointInfo, new_point_id, now_utc
from lifeboat.exporters import EXPORTERS
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from tests.archive.helpers import BytesSource
from tests.exporters.helpers import MiB, qemu_img


def run(*args: str, archive: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LIFEBOAT_ARCHIVE=str(archive))
    return subprocess.run(LIFEBOAT + list(args), capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    arc = Archive.init(str(root / "arc"), chunk_size=64 * 1024)
    data = os.urandom(MiB) + bytes(2 * MiB) + os.urandom(4097)
    arc.backup("web01", BytesSource(data))
    (root / "web01.raw").write_bytes(data)
    return root / "arc"


@pytest.mark.parametrize("fmt", EXPORTERS.names())
def test_export_each_format(fmt: str, archive: Path, tmp_path: Path) -> None:
    out = tmp_path / f"web01.{fmt}"
    r = run("export", "web01@latest", str(out), "--format", fmt, "--json", archive=archive)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["machine"] == "web01" and doc["format"] == fmt and doc["out"] == str(out)
    assert doc["file_size"] == out.stat().st_size
    ref = archive.parent / "web01.raw"
    qfmt = EXPORTERS.get(fmt).qemu_format
    assert "identical" in qemu_img("compare", "-f", qfmt, "-F", "raw", str(out), str(ref)).stdout


def test_existing_out_needs_force(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "disk.qcow2"
    out.write_bytes(b"precious")
    r = run("export", "web01", str(out), "--format", "qcow2", archive=archive)
    assert r.returncode == 2
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"precious"
    r = run("export", "web01", str(out), "--format", "qcow2", "--force", archive=archive)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"QFI\xfb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.qcow2"]


def test_bad_input_exits_2(archive: Path, tmp_path: Path) -> None:
    cases = [
        (["export", "web01", str(tmp_path / "a"), "--format", "vdi"], "--format"),
        (["export", "nosuch", str(tmp_path / "a"), "--format", "raw"], "nosuch"),
        (["export", "web01@2001-01-01T00:00:00Z", str(tmp_path / "a"), "--format", "raw"], "web01"),
        (["export", "web01", str(tmp_path / "no-dir" / "a"), "--format", "raw"], "no-dir"),
        (["export", "web01", str(tmp_path / "a"), "--format", "raw", "--adapter-type", "lsilogic"], "adapter"),
    ]
    for args, needle in cases:
        r = run(*args, archive=archive)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_point_too_large_for_the_format(tmp_path: Path) -> None:
    """A 2 TiB + 16 MiB point (all zero chunks, manifest written directly) is refused as VMDK
    with exit 2 and nothing written, and exported fine as qcow2 and VHDX."""
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=16 * MiB)
    size = 2 * 1024**4 + 16 * MiB
    info = PointInfo(
        machine="big", point=new_point_id(), time=now_utc().isoformat(), parent=None, size=size,
        chunk_size=16 * MiB, bytes_read=0, bytes_new=0, bytes_stored=0, source="test",
    )  # fmt: skip
    arc.write_point(info, ChunkTable([ZERO_ID] * (size // (16 * MiB))))
    for fmt in ("vmdk", "vmdk-stream"):
        r = run("export", "big", str(tmp_path / "big.vmdk"), "--format", fmt, archive=tmp_path / "arc")
        assert r.returncode == 2 and "more than the 2 TiB" in r.stderr, r.stderr
        assert not (tmp_path / "big.vmdk").exists()
    for fmt in ("qcow2", "vhdx"):
        out = tmp_path / f"big.{fmt}"
        r = run("export", "big", str(out), "--format", fmt, archive=tmp_path / "arc")
        assert r.returncode == 0, r.stderr
        assert out.stat().st_blocks * 512 < 64 * MiB


@pytest.fixture(scope="module")
def patched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An archive whose newest point is a tracked incremental: slots with patches laid over them."""
    root = tmp_path_factory.mktemp("patched")
    arc = Archive.init(str(root / "arc"), chunk_size=256 * 1024)
    disk = bytearray(os.urandom(3 * MiB + 4096))
    base = arc.backup("db01", BytesSource(bytes(disk)))
    changed = [(4096, 4096), (300 * 1024, 8192), (2 * MiB + 512, 1000), (3 * MiB, 4096)]
    for off, n in changed:
        disk[off:off + n] = os.urandom(n) if off != 3 * MiB else bytes(n)
    info = arc.backup("db01", BytesSource(bytes(disk)), changed=changed, base=base)
    assert arc.chunk_table(info).patches
    (root / "db01.raw").write_bytes(bytes(disk))
    return root / "arc"


@pytest.mark.parametrize("fmt", EXPORTERS.names())
def test_export_of_a_patched_point(fmt: str, patched: Path, tmp_path: Path) -> None:
    out = tmp_path / f"db01.{fmt}"
    r = run("export", "db01", str(out), "--format", fmt, archive=patched)
    assert r.returncode == 0, r.stderr
    ref = patched.parent / "db01.raw"
    qfmt = EXPORTERS.get(fmt).qemu_format
    assert "identical" in qemu_img("compare", "-f", qfmt, "-F", "raw", str(out), str(ref)).stdout
