"""The file index without being asked, and directory listings from it.

``lifeboat protect`` indexes its points in the background: two points, then ``files find`` names
both with no ``files index``. A listing from the index is the appliance's listing of the same
point (the session appliance of ``conftest``), paths as the operating system mounts them or within
one file system; an index written before modes were recorded still lists, mode unknown. When
points come faster than they are indexed, the newest goes first; the background indexer racing a
prune leaves no index of the pruned point.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lifeboat.agent.indexer import Indexer
from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.fileindex import PIECE_PREFIX, FileRecord, FsIndex, PointGone, read_manifest, write_index
from lifeboat.archive.prune import prune
from lifeboat.filerestore import PointFiles, indexed
from lifeboat.orchestrator import api
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from tests.archive.test_fileindex import tree
from tests.filerestore.conftest import Points
from tests.filerestore.test_os_lvm import LV

T = 1_700_000_000


class Disk:
    """A small disk whose content is ``tag`` (a point of it differs from another tag's)."""

    def __init__(self, tag: int) -> None:
        self.name = f"disk-{tag}"
        self.size = 65536
        self.data = tag.to_bytes(8, "little") * (self.size // 8)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


def cli(location: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LIFEBOAT_ARCHIVE": location}
    return subprocess.run([*LIFEBOAT, *args], env=env, capture_output=True, text=True, timeout=600)


def test_listing_from_the_index_is_the_appliance_listing(points: Points, all_disks: list[PointFiles]) -> None:
    """The first osbox point only (its system is inspected by test_os_lvm in the same appliance;
    walking machine files' points too would cost a minute more under TCG)."""
    arc = Archive.open(points.location)
    os1 = all_disks[3]
    os1.store_index(arc, points.os1)
    for path in ("/", "/srv", "/srv/www", "/etc"):  # as the system mounts them: the LV at /srv
        assert indexed.ls(arc, points.os1, path) == os1.ls(path), path
    for path in ("/", "/www"):
        assert indexed.ls(arc, points.os1, path, LV) == os1.ls(path, LV), path
    shown = cli(points.location, "files", "ls", f"osbox@{points.os1.point}", "/srv")
    assert shown.returncode == 0 and "from the point's file index" in shown.stderr, shown.stderr
    assert [line.split()[-1] for line in shown.stdout.splitlines()] == [e["name"] for e in os1.ls("/srv")]


def test_an_index_written_before_modes_lists_them_unknown(tmp_path: Path) -> None:
    location = str(tmp_path / "archive")
    arc = Archive.init(location)
    info = arc.backup("old", Disk(1))
    old = [FileRecord("/etc", "d", 4096, T), FileRecord("/etc/passwd", "f", 12, T),
           FileRecord("/etc/ssl", "d", 4096, T)]
    write_index(arc, info, [FsIndex("/dev/sda1", "ext4", records=old)])  # no mode, root or disk: the old format
    raw = cli(location, "files", "ls", "old", "/etc", "--json")
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout) == [
        {"name": "passwd", "type": "f", "size": 12, "mode": None, "mtime": T, "uid": None, "gid": None},
        {"name": "ssl", "type": "d", "size": 4096, "mode": None, "mtime": T, "uid": None, "gid": None}]
    text = cli(location, "files", "ls", "old", "/etc")
    assert text.stdout.splitlines()[0].split()[:3] == ["f", "?????????", "12"]
    missing = cli(location, "files", "ls", "old", "/nope")
    assert missing.returncode == 2 and "/nope: no such file or directory" in missing.stderr


DISK = {"filesystems": [{"device": "/dev/sda1", "fstype": "ext4", "label": "root", "uuid": "u-1", "size": 65536,
                         "encrypted": False, "lvm": False}],
        "os": [{"root": "/dev/sda1", "type": "linux", "distro": "debian", "product": "Debian 12",
                "mountpoints": [["/", "/dev/sda1"]]}]}


def test_files_fs_answers_from_the_index_and_an_older_index_reads_the_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``files fs`` of a point whose index recorded its disk needs no appliance; ``--read-disk``
    and an index written before the ``disk`` entry read the disk (a stand-in appliance here: the
    real one's answer is what ``write_index`` is given, checked by test_files)."""
    location = str(tmp_path / "archive")
    arc = Archive.init(location)
    new, old = arc.backup("box", Disk(1)), arc.backup("box", Disk(2))
    records = [FileRecord("/etc", "d", 4096, T, 0o755, 0, 0)]
    write_index(arc, new, [FsIndex("/dev/sda1", "ext4", "root", "u-1", "/", records)], disk=DISK)
    write_index(arc, old, [FsIndex("/dev/sda1", "ext4", records=records)])  # before the disk entry
    shown = cli(location, "files", "fs", f"box@{new.point}", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == DISK and "from the point's file index" in shown.stderr
    text = cli(location, "files", "fs", f"box@{new.point}")
    assert text.stdout.splitlines() == ["/dev/sda1  ext4  size=65536  label=root  uuid=u-1",
                                        "os /dev/sda1: Debian 12 (linux); mounts /=/dev/sda1"]
    read: list[str] = []

    class Appliance:
        def fs(self) -> dict[str, Any]:
            return {"filesystems": [], "os": []}

    @contextmanager
    def point_files(archive: Archive, infos: list[PointInfo]) -> Iterator[list[Appliance]]:
        read.extend(i.point for i in infos)
        yield [Appliance()]

    monkeypatch.setattr(api, "point_files", point_files)
    assert api.files_fs(arc, f"box@{new.point}") == (DISK, True)
    assert api.files_fs(arc, f"box@{new.point}", read_disk=True) == ({"filesystems": [], "os": []}, False)
    assert api.files_fs(arc, f"box@{old.point}") == ({"filesystems": [], "os": []}, False)
    assert read == [new.point, old.point]


def test_a_listing_reads_only_the_pieces_around_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder's listing reads the pieces that can hold its paths (found from the manifest's
    ``firsts``) and is the listing that reading every piece gives, as a manifest written before
    ``firsts`` does."""
    arc = Archive.init(str(tmp_path / "archive"))
    info = arc.backup("big", Disk(1))
    records = tree(5000) + [FileRecord("/d07-old", "d", 4096, T), FileRecord("/d07-old/x", "f", 1, T),
                            FileRecord("/d07/sub", "d", 4096, T), FileRecord("/d07/sub/deep", "f", 2, T)]
    stats = write_index(arc, info, [FsIndex("/dev/sda", "ext4", records=records)])
    assert stats["pieces"] > 20  # enough pieces for a directory to need few of them
    get = arc.backend.get
    reads: list[str] = []

    def counted(key: str) -> bytes:
        if key.startswith(PIECE_PREFIX):
            reads.append(key)
        return get(key)

    monkeypatch.setattr(arc.backend, "get", counted)
    listings: dict[str, list[dict[str, Any]] | None] = {}
    counts: dict[str, int] = {}
    for path in ("/d07", "/d07/sub", "/d19", "/d00", "/"):
        reads.clear()
        listings[path] = indexed.ls(arc, info, path)
        counts[path] = len(reads)
    stored = read_manifest(arc, info.machine, info.point)
    assert stored is not None
    old = {**stored, "filesystems": [{k: v for k, v in fs.items() if k != "firsts"} for fs in stored["filesystems"]]}
    monkeypatch.setattr(indexed, "read_manifest", lambda *_: old)  # a manifest written before firsts
    for path, listing in listings.items():
        reads.clear()
        assert indexed.ls(arc, info, path) == listing, path
        assert len(reads) == stats["pieces"], path  # every piece
    assert [e["name"] for e in listings["/d07/sub"] or []] == ["deep"]
    assert len(listings["/d07"] or []) == 251 and len(listings["/"] or []) == 21
    for path in ("/d07", "/d19", "/d00"):  # 250 files of 5000: a few of the pieces, not all
        assert 0 < counts[path] <= stats["pieces"] // 4, (path, counts[path], stats["pieces"])
    assert counts["/d07/sub"] <= 2 and counts["/"] == stats["pieces"]


def test_the_indexer_racing_a_prune_leaves_no_index_of_the_pruned_point(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "archive"))
    first, second = arc.backup("m", Disk(1)), arc.backup("m", Disk(2))
    walking, pruned = threading.Event(), threading.Event()
    stored: list[str] = []

    def index(infos: list[PointInfo]) -> list[dict[str, Any]]:
        out = []
        for info in infos:
            if info.point == first.point:
                walking.set()
                pruned.wait(60)  # the appliance walks the point while prune removes it
            try:
                fs = FsIndex("/dev/sda", "ext4", records=[FileRecord("/a", "f", 1, T)])
                out.append({"point": info.point, **write_index(arc, info, [fs])})
                stored.append(info.point)
            except PointGone:
                pass  # what api.index_points does: logged, not a failure
        return out

    indexer = Indexer(index)
    indexer.request_point(first)
    assert walking.wait(60)
    arc.config["retention"] = {"keep_last": 1}
    prune(arc)
    pruned.set()
    indexer.request_point(second)
    indexer.close()
    assert stored == [second.point] and indexer.status()["failures"] == 0
    assert list(arc.backend.list("index/")) == [f"index/m/{second.point}"]
    assert prune(arc).index_pieces_deleted == 0  # every piece left is named by the kept point's index


def test_points_coming_faster_than_indexing_the_newest_goes_first(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "archive"))
    infos = [arc.backup("m", Disk(n)) for n in range(4)]
    running, release = threading.Event(), threading.Event()
    runs: list[list[str]] = []

    def index(batch: list[PointInfo]) -> list[dict[str, Any]]:
        runs.append([p.point for p in batch])
        running.set()
        release.wait(60)
        return [{"point": p.point, "files": 0} for p in batch]

    indexer = Indexer(index)
    indexer.request_point(infos[0])
    assert running.wait(60)
    for info in infos[1:]:  # three captures during the first run
        indexer.request_point(info)
    release.set()
    while indexer.status()["waiting"]:
        time.sleep(0.05)
    indexer.close()
    p = [i.point for i in infos]
    assert runs == [[p[0]], [p[3]], [p[2], p[1]]]  # the newest, then the skipped ones when idle
    assert indexer.status()["points_indexed"] == 4


def test_protect_indexes_its_points_without_being_asked(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hello.txt").write_bytes(b"hello from protect\n")
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    location = str(tmp_path / "archive")
    Archive.init(location)
    metrics = tmp_path / "metrics.prom"
    done = cli(location, "protect", "box", str(image), "--rpo", "0.5", "--max-captures", "2",
               "--metrics-file", str(metrics), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["index"]["points_indexed"] == 2, done.stderr
    assert "(the same disk as" in done.stderr  # nothing changed: the second point's index is a copy
    assert 'lifeboat_index_points_total{machine="box"} 2' in metrics.read_text()
    found = json.loads(cli(location, "files", "find", "box", "hello.txt", "--json").stdout)
    points = [p.point for p in Archive.open(location).points("box")]
    assert [(m["point"], m["path"], m["size"]) for m in found["matches"]] == [(p, "/etc/hello.txt", 19) for p in points]
    assert found["unindexed"] == []
    listed = cli(location, "files", "ls", "box", "/etc")
    assert listed.stdout.split()[-1] == "hello.txt" and "file index" in listed.stderr
