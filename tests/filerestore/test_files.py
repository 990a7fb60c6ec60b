"""Single-item restore against real file systems: a GPT disk with ext4, xfs, vfat and a LUKS volume
(``disks.py``), backed up before and after its files changed, read by one libguestfs appliance over
lifeboat's own NBD server. ``files get`` returns each version byte for byte, errors write nothing,
and the index's ``find`` names the right points."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.fileindex import find, write_index
from lifeboat.filerestore import DestExists, EncryptedVolume, NoFileSystem, PathMissing, PointFiles
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.plumbing.errors import UsageError
from tests.filerestore.conftest import Points, mounted
from tests.filerestore.disks import MTIME, files

Disks = tuple[PointFiles, PointFiles, PointFiles]
DEVICE = {"ext4": "/dev/sda1", "xfs": "/dev/sda2", "vfat": "/dev/sda3"}


def tree_files(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` by its path from there, lost+found left out."""
    return {"/" + str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "lost+found" not in p.parts}


def test_fs_finds_every_file_system_and_the_encrypted_volume(disks: Disks) -> None:
    v1, _, blank = disks
    found = {f["device"]: f for f in v1.fs()["filesystems"]}
    assert {d: f["fstype"] for d, f in found.items()} == {
        "/dev/sda1": "ext4", "/dev/sda2": "xfs", "/dev/sda3": "vfat", "/dev/sda4": "crypto_LUKS"}
    assert found["/dev/sda1"]["label"] == "ROOTFS" and found["/dev/sda4"]["encrypted"]
    assert [f["fstype"] for f in blank.fs()["filesystems"]] == ["unknown"]


def test_get_returns_each_version_byte_for_byte(disks: Disks, tmp_path: Path) -> None:
    for version, disk in ((1, disks[0]), (2, disks[1])):
        for kind, device in DEVICE.items():
            dest = tmp_path / f"{kind}-v{version}"
            disk.get("/", dest, device)
            assert tree_files(dest) == files(version)[kind], (kind, version)
    one = tmp_path / "app.conf"
    disks[1].get("/etc/app.conf", one, "/dev/sda1")
    st = one.stat()
    assert one.read_bytes() == b"level=2\nmore=yes\n"
    assert (st.st_mode & 0o7777, int(st.st_mtime)) == (0o644, MTIME)
    listed = {e["name"]: e for e in disks[0].ls("/etc", "/dev/sda1")}
    assert listed["app.conf"] | {"uid": 0} == {"name": "app.conf", "type": "f", "size": 8, "mode": 0o644,
                                                "mtime": MTIME, "uid": 0, "gid": 0}


def test_errors_are_clear_and_write_nothing(disks: Disks, tmp_path: Path) -> None:
    v1, _, blank = disks
    with pytest.raises(PathMissing, match="/etc/nope"):
        v1.get("/etc/nope", tmp_path / "a", "/dev/sda1")
    with pytest.raises(EncryptedVolume, match="/dev/sda4"):
        v1.ls("/", "/dev/sda4")
    with pytest.raises(NoFileSystem, match="no recognisable file system"):
        blank.ls("/")
    with pytest.raises(UsageError, match="--fs"):
        v1.ls("/")  # three file systems, no operating system: which one?
    with pytest.raises(UsageError, match="/dev/sdz9"):
        v1.ls("/", "/dev/sdz9")
    kept = tmp_path / "kept"
    kept.write_bytes(b"mine")
    with pytest.raises(DestExists, match="kept"):
        v1.get("/etc/app.conf", kept, "/dev/sda1")
    assert kept.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


@pytest.fixture(scope="module")
def indexed(points: Points, disks: Disks) -> Archive:
    """The archive with both points of machine ``files`` indexed."""
    arc = Archive.open(points.location)
    for info, disk in ((points.v1, disks[0]), (points.v2, disks[1])):
        write_index(arc, info, disk.walk())
    return arc


def test_find_names_the_points_that_hold_a_file(indexed: Archive, points: Points) -> None:
    def where(pattern: str) -> list[tuple[str, str, int]]:
        return [(m.point.point, m.record.path, m.record.size) for m in find(indexed, "files", pattern)[0]]

    p1, p2 = points.v1.point, points.v2.point
    assert where("app.conf") == [(p1, "/etc/app.conf", 8), (p2, "/etc/app.conf", 17)]
    assert where("old.txt") == [(p1, "/old.txt", 18)]
    assert where("new.txt") == [(p2, "/new.txt", 17)]
    assert where("/srv/*.csv") == [(p1, "/srv/report.csv", 8), (p2, "/srv/added.csv", 2), (p2, "/srv/report.csv", 12)]
    assert where("CONFIG.TXT") == [(p1, "/BOOT/CONFIG.TXT", 7), (p2, "/BOOT/CONFIG.TXT", 7)]
    devices = {(m.device, m.record.type) for m in find(indexed, "files", "big.bin")[0]}
    assert devices == {("/dev/sda1", "f"), ("/dev/sda2", "f")}


def test_cli_find_and_get(indexed: Archive, points: Points, tmp_path: Path) -> None:
    env = {**os.environ, "LIFEBOAT_ARCHIVE": points.location}
    found = subprocess.run([*LIFEBOAT, "files", "find", "files", "*.conf", "--json"], env=env,
                           capture_output=True, text=True, check=True)
    doc = json.loads(found.stdout)
    assert [(m["point"], m["size"]) for m in doc["matches"]] == [(points.v1.point, 8), (points.v2.point, 17)]
    assert doc["unindexed"] == []
    dest = tmp_path / "report.csv"
    subprocess.run([*LIFEBOAT, "files", "get", f"files@{points.v1.point}", "/srv/report.csv", str(dest),
                    "--fs", "/dev/sda2"], env=env, capture_output=True, text=True, check=True)
    assert dest.read_bytes() == files(1)["xfs"]["/srv/report.csv"]


def test_mount_shows_the_point_read_only_until_unmounted(points: Points, tmp_path: Path) -> None:
    view = tmp_path / "view"
    view.mkdir()
    with mounted(points.location, f"files@{points.v2.point}", view, "/dev/sda1"):
        assert (view / "etc" / "app.conf").read_bytes() == files(2)["ext4"]["/etc/app.conf"]
        assert (view / "data" / "big.bin").read_bytes() == files(2)["ext4"]["/data/big.bin"]
        with pytest.raises(OSError):
            (view / "new-file").write_bytes(b"x")
    assert list(view.iterdir()) == []
