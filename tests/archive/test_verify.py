"""Verify finds damage anywhere in a pack and names the points it hurts."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.errors import CorruptChunk
from lifeboat.archive.formats import PACK_TRAILER, parse_point
from lifeboat.archive.packs import read_pack_index
from lifeboat.archive.verify import verify
from tests.archive.helpers import BytesSource, read_all

CS = 4096


def _archive(tmp_path: Path) -> tuple[Archive, list[Path]]:
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    base = os.urandom(CS * 40)
    arc.backup("a", BytesSource(base))
    arc.backup("b", BytesSource(os.urandom(CS * 10)))
    arc.backup("a", BytesSource(base[: CS * 20] + os.urandom(CS * 20)))
    packs = sorted(p for p in (tmp_path / "arc" / "packs").rglob("*") if p.is_file())
    return arc, packs


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_clean_archive_verifies(tmp_path: Path) -> None:
    arc, packs = _archive(tmp_path)
    report = verify(arc)
    assert report.ok and report.points == 3 and report.packs == len(packs) == 3


def _points_using(root: Path, chunks: set[bytes]) -> list[str]:
    """The points (MACHINE@POINT) whose manifests reference any of ``chunks``, read before the damage."""
    names = []
    for manifest in sorted((root / "points").rglob("*")):
        if manifest.is_file():
            key = str(manifest.relative_to(root))
            _, table = parse_point(key, manifest.read_bytes())
            if chunks & set(table.referenced()):
                names.append(f"{manifest.parent.name}@{manifest.name}")
    return sorted(names)


@pytest.mark.parametrize("where", ["magic", "blob", "index", "trailer"])
def test_flipped_byte_names_the_affected_points(tmp_path: Path, where: str) -> None:
    arc, packs = _archive(tmp_path)
    target = packs[0]
    root = tmp_path / "arc"
    entries = read_pack_index(arc.backend, str(target.relative_to(root)))
    size = target.stat().st_size
    offset = {
        "magic": 3,
        "blob": 8 + 100,
        "index": size - PACK_TRAILER.size - 10,
        "trailer": size - 3,
    }[where]
    # a damaged blob hurts its chunk; any other damage leaves the whole pack untrusted or unreadable
    hurt = {e.chunk_id for e in entries if where != "blob" or e.offset <= offset < e.offset + e.length}
    expected = _points_using(root, hurt)
    assert expected
    _flip(target, offset)
    doc = verify(Archive.open(str(root))).to_json()
    assert not doc["ok"]
    if where != "blob":
        assert str(target.relative_to(root)) in doc["bad_packs"]
    assert doc["affected_points"] == expected
    assert sorted(doc["bad_points"]) == expected
    assert {c.hex() for c in hurt} <= set(doc["bad_chunks"])


def test_bad_chunk_names_affected_points_and_reads_fail(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    shared = os.urandom(CS)
    p1 = arc.backup("x", BytesSource(shared + os.urandom(CS)))
    p2 = arc.backup("y", BytesSource(os.urandom(CS) + shared))
    p3 = arc.backup("z", BytesSource(os.urandom(CS)))
    cid = arc.codec.chunk_id(shared)
    loc = arc.index.get(cid)
    assert loc is not None
    _flip(tmp_path / "arc" / loc.pack, loc.entry.offset + 5)
    fresh = Archive.open(str(tmp_path / "arc"))
    report = verify(fresh)
    assert report.affected[cid.hex()] == sorted([f"x@{p1.point}", f"y@{p2.point}"])
    assert f"z@{p3.point}" not in report.bad_points
    with pytest.raises(CorruptChunk, match=cid.hex()):
        read_all(fresh.reader(p1))
    assert read_all(fresh.reader(p3))  # untouched points still read


def test_damaged_manifest_is_reported(tmp_path: Path) -> None:
    arc, _ = _archive(tmp_path)
    manifest = next((tmp_path / "arc" / "points" / "b").iterdir())
    _flip(manifest, manifest.stat().st_size - 40)
    report = verify(arc)
    assert any(name.startswith("b@") for name in report.bad_points)


def test_random_single_byte_flips_always_detected(tmp_path: Path) -> None:
    arc, packs = _archive(tmp_path)
    rnd = random.Random(7)
    for _ in range(15):
        target = rnd.choice(packs)
        original = target.read_bytes()
        _flip(target, rnd.randrange(len(original)))
        report = verify(Archive.open(str(tmp_path / "arc")))
        assert not report.ok and report.to_json()["affected_points"], "every damage names its points"
        target.write_bytes(original)
    assert verify(Archive.open(str(tmp_path / "arc"))).ok
