"""Single-item restore of a disk laid out as an operating system's: an ext4 root whose /etc/fstab
mounts a logical volume of LVM at /srv (``disks.build_os_disks``), backed up before and after a
change. ``files fs`` lists the logical volume; ``--fs /dev/osvg/srv`` reads it byte for byte in
both points, which share one appliance (the same LVM UUIDs: LVM is filtered to one disk at a time);
without ``--fs`` paths are as that system mounts them (the first point). ``files index osbox``
indexes both points in one appliance, the logical volume's files of each."""

from __future__ import annotations

from pathlib import Path

from lifeboat.archive import Archive
from lifeboat.archive.fileindex import find, write_index
from lifeboat.filerestore import PointFiles
from tests.filerestore.conftest import Points
from tests.filerestore.disks import OS_LV, OS_VG, os_files
from tests.filerestore.test_files import tree_files

LV = f"/dev/{OS_VG}/{OS_LV}"


def test_fs_lists_the_logical_volume_and_the_system(os_disks: tuple[PointFiles, PointFiles]) -> None:
    for disk in os_disks:  # filesystems() alone: inspection (systems) costs 20 s per appliance here
        found = {f["device"]: f for f in disk.filesystems()}
        assert found[LV]["fstype"] == "ext4" and found[LV]["lvm"] and found[LV]["label"] == "OSSRV"
        assert found["/dev/sda1"]["fstype"] == "ext4" and not found["/dev/sda1"]["lvm"]
    (system,) = os_disks[0].fs()["os"]
    assert (system["root"], system["type"], system["distro"]) == ("/dev/sda1", "linux", "debian")
    assert system["mountpoints"] == [["/", "/dev/sda1"], ["/srv", LV]]


def test_logical_volume_byte_for_byte_in_both_points(os_disks: tuple[PointFiles, PointFiles],
                                                     tmp_path: Path) -> None:
    for version, disk in enumerate(os_disks, 1):
        dest = tmp_path / f"lv-v{version}"
        disk.get("/", dest, LV)
        assert tree_files(dest) == os_files(version)["lv"], version
        assert {e["name"] for e in disk.ls("/", LV)} >= {"www", "data", f"only-v{version}.txt"}


def test_paths_are_as_the_system_mounts_them(os_disks: tuple[PointFiles, PointFiles], tmp_path: Path) -> None:
    os1 = os_disks[0]  # the first point only: inspecting the second too would cost 20 s more
    assert {e["name"] for e in os1.ls("/srv")} == {"www", "data", "only-v1.txt", "lost+found"}
    dest = tmp_path / "index.html"
    os1.get("/srv/www/index.html", dest)
    assert dest.read_bytes() == os_files(1)["lv"]["/www/index.html"]
    assert {e["name"] for e in os1.ls("/etc")} >= {"fstab", "os-release"}


def test_index_of_both_points_in_one_appliance_holds_each_logical_volume(
        os_disks: tuple[PointFiles, PointFiles], points: Points) -> None:
    """What ``files index osbox`` does (``api.files_index``: every point walked in one appliance),
    in the session's appliance (a second boot would cost 20 s or more)."""
    arc = Archive.open(points.location)
    for info, disk in zip((points.os1, points.os2), os_disks, strict=True):
        write_index(arc, info, disk.walk())
    found = {(m.point.point, m.device, m.mountpoint, m.record.path, m.record.size)
             for m in find(arc, "osbox", "*.txt")[0]}
    assert found == {(p.point, LV, "/srv", f"/only-v{v}.txt", len(os_files(v)["lv"][f"/only-v{v}.txt"]))
                     for v, p in ((1, points.os1), (2, points.os2))}
    pages = {m.point.point for m in find(arc, "osbox", "/www/index.html")[0]}
    assert pages == {points.os1.point, points.os2.point}
