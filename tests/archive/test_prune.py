"""Retention, rollup and garbage collection."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.prune import prune
from lifeboat.archive.retention import check_policy, keep
from lifeboat.archive.verify import verify
from lifeboat.plumbing.errors import UsageError
from tests.archive.helpers import BytesSource, read_all

CS = 4096


def _info(point: str, when: datetime) -> PointInfo:
    return PointInfo("m", point, when.isoformat(), None, 0, CS, 0, 0, 0, "t")


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_policy_rules() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    pts = [_info(f"p{i:03d}", start + timedelta(hours=6 * i)) for i in range(40)]  # 10 days, 4 a day
    assert keep(pts, {}) == {p.point for p in pts}
    assert keep(pts, {"keep_last": 3}) == {"p039", "p038", "p037"}
    daily = keep(pts, {"keep_daily": 3})
    assert daily == {"p039", "p035", "p031"}  # newest of each of the last 3 days
    assert keep(pts, {"keep_monthly": 1}) == {"p039"}
    assert "p039" in keep(pts, {"keep_weekly": 0, "keep_last": 0})
    with pytest.raises(UsageError, match="unknown"):
        check_policy({"keep_forever": 1})
    with pytest.raises(UsageError, match="whole number"):
        check_policy({"keep_last": -1})


def test_prune_rolls_up_and_reclaims_space(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    disk = bytearray(os.urandom(CS * 64))
    versions = {}
    for i in range(6):
        disk[i * CS * 8:(i + 1) * CS * 8] = os.urandom(CS * 8)
        info = arc.backup("m", BytesSource(bytes(disk)))
        versions[info.point] = bytes(disk)
    arc.config["retention"] = {"keep_last": 2}
    arc.save_config()
    before = _du(tmp_path / "arc")
    dry = prune(arc, dry_run=True)
    assert len(dry.removed) == 4 and _du(tmp_path / "arc") == before
    report = prune(arc)
    assert len(report.removed) == 4 and len(report.kept) == 2
    kept = arc.points("m")
    assert len(kept) == 2
    assert kept[0].parent is None  # rolled up: its parent was removed, it is now a base point
    assert kept[1].parent == kept[0].point
    for p in kept:
        assert read_all(arc.reader(p)) == versions[p.point]
    assert _du(tmp_path / "arc") < before * 0.75  # 72 of 104 chunks stay live
    assert verify(Archive.open(str(tmp_path / "arc"))).ok


def test_prune_without_policy_keeps_everything(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    for _ in range(3):
        arc.backup("m", BytesSource(os.urandom(CS * 4)))
    report = prune(arc)
    assert not report.removed and len(arc.points("m")) == 3


def test_prune_collects_orphan_packs(tmp_path: Path) -> None:
    """A backup killed after writing packs but before its manifest leaves packs that prune frees."""
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    keep_data = os.urandom(CS * 8)
    arc.backup("m", BytesSource(keep_data))
    info = arc.backup("m", BytesSource(os.urandom(CS * 8)))
    arc.backend.delete(info.key)  # as if the manifest had never been written
    report = prune(arc)
    assert report.packs_deleted == 1
    assert read_all(arc.reader(arc.resolve("m"))) == keep_data
    assert verify(arc).ok


def test_readers_never_wait_for_locks(tmp_path: Path) -> None:
    """Restores and listings work while prune (exclusive) or a backup (shared) holds the lock."""
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    data = os.urandom(CS * 4)
    arc.backup("m", BytesSource(data))
    for exclusive in (True, False):
        with arc.backend.lock(exclusive=exclusive):
            other = Archive.open(str(tmp_path / "arc"))
            assert read_all(other.reader(other.resolve("m"))) == data
            assert verify(other).ok


def test_long_lived_archive_sees_other_writers_and_prunes(tmp_path: Path) -> None:
    """A process that keeps its Archive open (protect, serve) must neither store a chunk twice
    that another process stored, nor trust a chunk that a prune elsewhere deleted."""
    loc = str(tmp_path / "arc")
    mine = Archive.init(loc, chunk_size=CS)
    other = Archive.open(loc)
    shared = os.urandom(CS * 4)
    mine.backup("a", BytesSource(os.urandom(CS * 4)))
    other.backup("b", BytesSource(shared))
    c = mine.backup("c", BytesSource(shared))
    assert c.bytes_new == 0  # the other process's new pack was picked up
    other.config["retention"] = {"keep_last": 1}
    old = other.backup("b", BytesSource(os.urandom(CS * 4)))
    assert old.parent is not None
    for name in ("c",):
        for p in other.points(name):
            other.backend.delete(p.key)  # as if c's points had been pruned away too
    prune(other)
    again = mine.backup("d", BytesSource(shared))
    assert again.bytes_new == len(shared)  # stored anew: its old pack is gone
    assert read_all(Archive.open(loc).reader(again)) == shared
    assert verify(Archive.open(loc)).ok
