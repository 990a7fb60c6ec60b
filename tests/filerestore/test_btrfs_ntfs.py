"""Single-item restore of btrfs (with a subvolume) and NTFS: a GPT disk of both (``fsdisks.py``),
backed up before and after a change. Both points share the session's appliance with the same
btrfs fsid (the helper separates the copies). ``files fs`` lists the file systems and the
subvolume, ``files get`` returns each version byte for byte with the modes and times btrfs keeps
(NTFS keeps times, not modes: files 0644, folders 0755), the index names the right points, and
``lifeboat mount`` shows the subvolume as a folder of its btrfs."""

from __future__ import annotations

from pathlib import Path

from lifeboat.archive import Archive
from lifeboat.archive.fileindex import find, write_index
from lifeboat.filerestore import PointFiles
from tests.filerestore.conftest import Points, mounted
from tests.filerestore.disks import MTIME
from tests.filerestore.fsdisks import BTRFS_UUID, MODES, SUBVOL, fs_files
from tests.filerestore.test_files import tree_files

FsDisks = tuple[PointFiles, PointFiles]
BTRFS, NTFS, SUB = "/dev/sda1", "/dev/sda2", f"btrfsvol:/dev/sda1/{SUBVOL}"


def top_level(version: int) -> dict[str, bytes]:
    """The btrfs' files as its top level shows them: the subvolume as the folder /home."""
    content = fs_files(version)
    return {**content["btrfs"], **{f"/{SUBVOL}{p}": data for p, data in content["subvol"].items()}}


def test_fs_lists_btrfs_its_subvolume_and_ntfs(fs_disks: FsDisks) -> None:
    for disk in fs_disks:
        found = {f["device"]: f for f in disk.filesystems()}
        assert {d: f["fstype"] for d, f in found.items()} == {BTRFS: "btrfs", SUB: "btrfs", NTFS: "ntfs"}
        # each copy shows the UUID it has on disk, not the one the appliance gave the second copy
        assert (found[BTRFS]["label"], found[BTRFS]["uuid"]) == ("FSROOT", BTRFS_UUID)
        assert found[SUB]["subvolume_of"] == BTRFS and found[SUB]["uuid"] == BTRFS_UUID
        assert found[NTFS]["label"] == "WINDATA" and not found[NTFS]["encrypted"]


def test_get_returns_each_version_byte_for_byte(fs_disks: FsDisks, tmp_path: Path) -> None:
    for version, disk in enumerate(fs_disks, 1):
        expected = {BTRFS: top_level(version), SUB: fs_files(version)["subvol"], NTFS: fs_files(version)["ntfs"]}
        for device, content in expected.items():
            dest = tmp_path / f"{device.replace('/', '_')}-v{version}"
            disk.get("/", dest, device)
            assert tree_files(dest) == content, (device, version)
        for path, mode in MODES.items():  # btrfs keeps modes and times, also through a tree's tar
            st = (tmp_path / f"{BTRFS.replace('/', '_')}-v{version}" / path.lstrip("/")).stat()
            assert (st.st_mode & 0o7777, int(st.st_mtime)) == (mode, MTIME), path
    one = tmp_path / "report.txt"
    fs_disks[1].get("/Users/Public/report.txt", one, NTFS)
    st = one.stat()
    assert one.read_bytes() == fs_files(2)["ntfs"]["/Users/Public/report.txt"]
    assert (st.st_mode & 0o7777, int(st.st_mtime)) == (0o644, MTIME)
    listed = {e["name"]: e for e in fs_disks[1].ls("/", NTFS)}
    assert (listed["New Folder"]["type"], listed["New Folder"]["mode"], listed["New Folder"]["mtime"]) == \
        ("d", 0o755, MTIME)
    assert {e["name"] for e in fs_disks[0].ls("/alice", SUB)} == {"todo.txt", "photo.bin", "draft.txt"}


def test_find_names_the_points_that_hold_a_file(fs_disks: FsDisks, points: Points) -> None:
    """The index of both points: the subvolume's files once (under the btrfs that shows them)."""
    arc = Archive.open(points.location)
    for info, disk in zip((points.fs1, points.fs2), fs_disks, strict=True):
        write_index(arc, info, disk.walk())

    def where(pattern: str) -> list[tuple[str, str, str, str]]:
        return [(m.point.point, m.device, m.mountpoint, m.record.path) for m in find(arc, "fsbox", pattern)[0]]

    p1, p2 = points.fs1.point, points.fs2.point
    assert where("todo.txt") == [(p1, BTRFS, "", "/home/alice/todo.txt"), (p2, BTRFS, "", "/home/alice/todo.txt")]
    assert where("draft.txt") == [(p1, BTRFS, "", "/home/alice/draft.txt")]
    assert where("hello.txt") == [(p2, BTRFS, "", "/home/bob/hello.txt")]
    assert where("new.txt") == [(p2, BTRFS, "", "/new.txt"), (p2, NTFS, "", "/New Folder/new.txt")]
    assert where("*.tmp") == [(p1, NTFS, "", "/Temp/old.tmp")]
    sizes = {(m.point.point, m.record.size) for m in find(arc, "fsbox", "/Users/Public/report.txt")[0]}
    assert sizes == {(p, len(fs_files(v)["ntfs"]["/Users/Public/report.txt"])) for v, p in ((1, p1), (2, p2))}


def test_mount_shows_the_subvolume(points: Points, tmp_path: Path) -> None:
    """``lifeboat mount --fs /dev/sda1`` (guestmount's own appliance: the one NTFS is not mounted
    too, which would cost another boot; ``files get`` reads NTFS above)."""
    view = tmp_path / "view"
    view.mkdir()
    with mounted(points.location, f"fsbox@{points.fs1.point}", view, BTRFS):
        content = fs_files(1)
        assert (view / SUBVOL / "alice" / "draft.txt").read_bytes() == content["subvol"]["/alice/draft.txt"]
        assert (view / "data" / "run.sh").read_bytes() == content["btrfs"]["/data/run.sh"]
