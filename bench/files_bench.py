"""Single-item restore (issue 16): time to the first directory listing of a point, lifeboat against
restoring the whole point and loop-mounting it; then ``files find`` over 1,000 indexed points.

    .venv/bin/python bench/files_bench.py [--points 1000]

1. The 2.5 GiB ext4 image of ``common.realistic_image`` is backed up once (machine ``usr``).
2. lifeboat: ``api.files_ls(arc, "usr", "/", read_disk=True)`` from a cold start: the NBD server on
   a thread, the libguestfs appliance boot (TCG), mount, list. Peer: ``lifeboat restore`` to a raw
   file, then ``mount -o loop,ro`` and list the root. Ratio = peer / lifeboat.
3. The point is indexed (``files index``, timed), then ``api.files_ls(arc, "usr", "/")`` is timed
   again, cold: now answered from the file index (no appliance); ratios against the appliance and
   the peer, and the listing checked equal to the appliance's.
4. The point's real file list is copied into ``--points`` points of a
   second machine, each with 0.1 % of its files changed from the one before, and
   ``files find`` of a name and of a path pattern is timed over all of them (the index alone).
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import drop_caches, machine_info, realistic_image  # noqa: E402

from lifeboat.archive import Archive  # noqa: E402
from lifeboat.archive.fileindex import FsIndex, find, read_index, write_index  # noqa: E402
from lifeboat.archive.files import FileSource  # noqa: E402
from lifeboat.archive.restore import restore  # noqa: E402
from lifeboat.orchestrator import api  # noqa: E402


def first_listing_lifeboat(arc: Archive, read_disk: bool) -> tuple[float, list[dict[str, Any]]]:
    drop_caches()
    t = time.monotonic()
    entries, from_index = api.files_ls(arc, "usr", "/", read_disk=read_disk)
    assert from_index != read_disk
    return time.monotonic() - t, entries


def first_listing_peer(arc: Archive, work: Path) -> tuple[float, float, int]:
    drop_caches()
    raw, mnt = work / "restored.img", work / "mnt"
    mnt.mkdir(exist_ok=True)
    t = time.monotonic()
    restore(arc.reader(arc.resolve("usr")), str(raw))
    restored = time.monotonic() - t
    subprocess.run(["mount", "-o", "loop,ro", str(raw), str(mnt)], check=True)
    try:
        n = len(list(mnt.iterdir()))
        total = time.monotonic() - t
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        raw.unlink()
    return total, restored, n


RUN = 20  # files change in runs of neighbours (a package upgrade, a log folder)


def many_points(arc: Archive, base: FsIndex, count: int, start: int = 0) -> float:
    """``count`` more points of machine ``many``, each indexed with 0.1 % of its files changed from
    the point before, in runs of ``RUN`` neighbours; the seconds spent indexing."""
    rng = random.Random(16 + start)
    records = list(base.records)
    spent = 0.0
    for i in range(start, start + count):
        info = arc.backup("many", _Tiny(i))
        for _ in range(max(1, len(records) // 1000 // RUN)):
            first = rng.randrange(len(records) - RUN)
            for j in range(first, first + RUN):
                records[j] = replace(records[j], size=records[j].size + 1, mtime=records[j].mtime + i)
        t = time.monotonic()
        write_index(arc, info, [replace(base, records=records)])
        spent += time.monotonic() - t
    return spent


class _Tiny:
    """A 4 KiB disk that differs per point (the index is what this part measures)."""

    def __init__(self, i: int) -> None:
        self.name = f"tiny-{i}"
        self.size = 4096
        self.data = i.to_bytes(8, "little") * 512

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


def first_listing(arc: Archive, work: Path) -> None:
    """Time to the first listing: lifeboat (appliance, then file index) against restore + loop mount."""
    peer, restored, n_peer = first_listing_peer(arc, work)
    ours, listed = first_listing_lifeboat(arc, read_disk=True)
    print(f"first listing of / : lifeboat files ls (appliance) {ours:.1f} s ({len(listed)} entries); "
          f"restore + loop mount {peer:.1f} s (restore {restored:.1f} s, {n_peer} entries); "
          f"ratio {peer / ours:.2f}x")
    t = time.monotonic()
    done = api.files_index(arc, ["usr@latest"], log=lambda m: None)
    print(f"files index of the point: {time.monotonic() - t:.1f} s, {done[0]['files']} files, "
          f"{done[0]['pieces']} pieces, {done[0]['bytes_new']} bytes stored")
    from_index, same = first_listing_lifeboat(arc, read_disk=False)
    assert same == listed, "the index's listing differs from the appliance's"
    print(f"first listing of / from the file index: {from_index:.2f} s (the same {len(same)} entries); "
          f"{ours / from_index:.0f}x faster than the appliance, {peer / from_index:.0f}x faster than "
          f"restore + loop mount")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--work", type=Path, help="Keep the archive in this folder and reuse what it already holds "
                                              "(the backup, listing and index steps then are skipped).")
    args = ap.parse_args()
    print(machine_info())
    work = args.work or Path(tempfile.mkdtemp(prefix="files-bench-", dir="/var/tmp"))
    try:
        if (work / "archive" / "config").exists():
            arc = Archive.open(str(work / "archive"))
        else:
            work.mkdir(parents=True, exist_ok=True)
            arc = Archive.init(str(work / "archive"))
            image = realistic_image()
            t = time.monotonic()
            arc.backup("usr", FileSource(image))
            print(f"backup of {image.name}: {time.monotonic() - t:.1f} s")
            first_listing(arc, work)
        indexed = read_index(arc, arc.resolve("usr"))
        assert indexed is not None
        have = len(arc.points("many")) if "many" in arc.machines() else 0
        spent = many_points(arc, indexed[0], max(0, args.points - have), start=have)
        pieces = sum(1 for _ in arc.backend.list("indexpieces/"))
        stored = sum(arc.backend.size(k) for k in arc.backend.list("indexpieces/"))
        stored += sum(arc.backend.size(k) for k in arc.backend.list("index/many/"))
        print(f"{args.points} points indexed ({len(indexed[0].records)} files each, 0.1 % changed per point in "
              f"runs of {RUN}): {spent:.1f} s for the {max(0, args.points - have)} new, {pieces} pieces, "
              f"{stored / 1e6:.1f} MB for all indexes ({stored / args.points / 1e3:.1f} kB a point)")
        for pattern in ("python3", "/usr/share/doc/*/copyright", "*.so.*"):
            for _ in range(2):
                t = time.monotonic()
                matches, unindexed = find(arc, "many", pattern)
                print(f"files find {pattern!r} over {args.points} points: {time.monotonic() - t:.2f} s, "
                      f"{len(matches)} matches, {len(unindexed)} unindexed")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
