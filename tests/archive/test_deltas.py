"""Incrementals from change tracking stored as patches: exact bytes, bounded fragmentation,
and patch chunks kept alive by prune and checked by verify."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.deltas import MAX_REFS, Job, cut, plan_jobs
from lifeboat.archive.errors import FormatError
from lifeboat.archive.formats import ZERO_ID, ChunkTable, Patch, encode_point, parse_point
from lifeboat.archive.prune import prune
from lifeboat.archive.restore import restore
from lifeboat.archive.verify import verify
from tests.archive.helpers import BytesSource, read_all

CS = 64 * 1024
GRANULE = 4096


class Recording(BytesSource):
    """A source that notes every read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return super().read(offset, length)


def _change(disk: bytearray, rnd: random.Random, writes: int) -> list[tuple[int, int]]:
    """Random granule-aligned writes (some of zeros), as a dirty bitmap would report them."""
    changed = []
    for _ in range(writes):
        off = rnd.randrange(0, len(disk) // GRANULE) * GRANULE
        n = min(rnd.choice([1, 1, 2, 3, 9]) * GRANULE, len(disk) - off)
        disk[off:off + n] = bytes(n) if rnd.random() < 0.15 else rnd.randbytes(n)
        changed.append((off, n))
    return changed


def test_twenty_tracked_incrementals_restore_exactly_and_stay_bounded(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    rnd = random.Random(5)
    disk = bytearray(rnd.randbytes(CS * 24 + 3 * GRANULE))
    disk[CS * 5:CS * 8] = bytes(CS * 3)  # some zero slots to be written into
    points = [(arc.backup("vm", BytesSource(bytes(disk))), bytes(disk))]
    for _ in range(20):
        changed = _change(disk, rnd, rnd.randrange(1, 12))
        src = Recording(bytes(disk))
        info = arc.backup("vm", src, changed=changed, base=points[-1][0])
        table = arc.chunk_table(info)
        patched = sum(n for _, _, n in (r for j in plan_jobs(len(disk), CS, changed, arc.chunk_table(points[-1][0]))
                                        for r in j.runs))
        assert info.bytes_read == sum(n for _, n in src.reads) >= patched
        assert all(len(table.slot_refs(s)) <= MAX_REFS for s in range(len(table.ids)))
        points.append((info, bytes(disk)))
    assert any(arc.chunk_table(p).patches for p, _ in points[1:])
    for info, want in points:
        assert read_all(arc.reader(info)) == want
    last, want = points[-1]
    restore(arc.reader(last), tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == want


def test_only_changed_bytes_are_read_and_a_mostly_changed_slot_is_stored_whole(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    disk = bytearray(random.Random(1).randbytes(CS * 4))
    base = arc.backup("vm", BytesSource(bytes(disk)))
    disk[CS + GRANULE:CS + 2 * GRANULE] = b"x" * GRANULE  # a small change: a patch
    disk[3 * CS:3 * CS + CS * 3 // 4] = b"y" * (CS * 3 // 4)  # most of a slot: stored whole
    src = Recording(bytes(disk))
    info = arc.backup("vm", src, changed=[(CS + GRANULE, GRANULE), (3 * CS, CS * 3 // 4)], base=base)
    assert sorted(src.reads) == [(CS + GRANULE, GRANULE), (3 * CS, CS)]
    table = arc.chunk_table(info)
    assert set(table.patches) == {1}
    assert table.ids[3] != arc.chunk_table(base).ids[3]
    assert read_all(arc.reader(info)) == bytes(disk)


def test_zero_writes_make_zero_patches_and_a_zeroed_zero_slot_stays_a_hole(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    disk = bytearray(CS * 3)
    disk[:CS] = random.Random(2).randbytes(CS)
    base = arc.backup("vm", BytesSource(bytes(disk)))
    disk[GRANULE:2 * GRANULE] = bytes(GRANULE)  # zeros written into data
    changed = [(GRANULE, GRANULE), (CS + GRANULE, GRANULE)]  # and into a zero slot
    info = arc.backup("vm", BytesSource(bytes(disk)), changed=changed, base=base)
    reader = arc.reader(info)
    assert reader.table.patches[0][0].chunk_id == ZERO_ID and 1 not in reader.table.patches
    assert reader.is_zero(1) and not reader.is_zero(0)
    assert info.bytes_new == 0 and read_all(reader) == bytes(disk)


def test_prune_keeps_patch_chunks_of_kept_points_and_verify_names_their_points(tmp_path: Path) -> None:
    loc = str(tmp_path / "arc")
    arc = Archive.init(loc, chunk_size=CS)
    rnd = random.Random(3)
    disk = bytearray(rnd.randbytes(CS * 8))
    infos = [arc.backup("vm", BytesSource(bytes(disk)))]
    for _ in range(4):
        changed = _change(disk, rnd, 3)
        infos.append(arc.backup("vm", BytesSource(bytes(disk)), changed=changed, base=infos[-1]))
    arc.config["retention"] = {"keep_last": 1}
    arc.save_config()
    prune(arc)
    arc = Archive.open(loc)
    (kept,) = arc.points("vm")
    assert kept.point == infos[-1].point and arc.chunk_table(kept).patches
    assert read_all(arc.reader(kept)) == bytes(disk)
    assert verify(arc).ok
    patch_id = next(p.chunk_id for ps in arc.chunk_table(kept).patches.values() for p in ps if p.chunk_id != ZERO_ID)
    loc_ = arc.index.get(patch_id)
    assert loc_ is not None
    pack = tmp_path / "arc" / loc_.pack
    blob = bytearray(pack.read_bytes())
    blob[loc_.entry.offset + loc_.entry.length // 2] ^= 0xFF
    pack.write_bytes(bytes(blob))
    report = verify(Archive.open(loc))
    assert not report.ok and f"vm@{kept.point}" in report.bad_points


def test_plan_packs_runs_of_several_slots_into_one_patch_chunk() -> None:
    base = ChunkTable([b"\x01" * 32] * 8)
    jobs = plan_jobs(CS * 8, CS, [(0, GRANULE), (CS * 2 + 100, 50), (CS * 5, GRANULE)], base)
    assert jobs == [Job(runs=((0, 0, GRANULE), (2, 100, 50), (5, 0, GRANULE)))]
    assert plan_jobs(CS * 8, CS, None, None) == [Job(slot=i) for i in range(8)]


def test_a_slot_at_its_reference_limit_is_stored_whole() -> None:
    ids = [b"\x01" * 32, b"\x02" * 32]
    patches = {0: [Patch(0, i * GRANULE, 10, bytes([i + 3]) * 32, 0, 10) for i in range(MAX_REFS - 1)]}
    jobs = plan_jobs(CS * 2, CS, [(CS - GRANULE, GRANULE)], ChunkTable(ids, patches))
    assert jobs == [Job(slot=0)]


def test_cut_splits_a_patch_around_a_run() -> None:
    p = Patch(0, 100, 300, b"\x05" * 32, 1000, 5000)
    want = [Patch(0, 100, 100, p.chunk_id, 1000, 5000), Patch(0, 250, 150, p.chunk_id, 1150, 5000)]
    assert cut([p], [(200, 50)]) == want
    assert cut([p], [(0, 1000)]) == []


@pytest.mark.parametrize("bad", [
    Patch(0, CS - 10, 20, b"\x05" * 32, 0, 20),  # past the end of the slot
    Patch(0, 0, 20, b"\x05" * 32, 10, 20),  # past the end of its chunk
    Patch(3, 0, 20, b"\x05" * 32, 0, 20),  # a slot the disk does not have
    Patch(0, 0, 0, b"\x05" * 32, 0, 20),  # empty
])
def test_manifests_with_bad_patches_are_refused(bad: Patch) -> None:
    data = encode_point({"size": CS * 2, "chunk_size": CS}, ChunkTable([ZERO_ID] * 2, {bad.slot: [bad]}))
    with pytest.raises(FormatError, match="patch"):
        parse_point("points/vm/1", data)


def test_overlapping_patches_are_refused() -> None:
    ps = [Patch(0, 0, 20, b"\x05" * 32, 0, 40), Patch(0, 10, 20, b"\x05" * 32, 20, 40)]
    data = encode_point({"size": CS, "chunk_size": CS}, ChunkTable([ZERO_ID], {0: ps}))
    with pytest.raises(FormatError, match="out of order"):
        parse_point("points/vm/1", data)
