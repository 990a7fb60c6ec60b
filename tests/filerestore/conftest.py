"""One archive and one libguestfs appliance for every file-level restore test (the appliance
boots once per session: 20 s or more)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.files import FileSource
from lifeboat.filerestore import PointFiles
from lifeboat.orchestrator import api
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from tests.filerestore.disks import build_blank, build_disk, build_os_disks
from tests.filerestore.fsdisks import build_fs_disks


@dataclass
class Points:
    """The archive, and machine ``files``' points of disk version 1 and 2, a blank disk's, and
    machine ``osbox``'s points of the operating system disk (LVM) before and after a change, and
    machine ``fsbox``'s of the btrfs and NTFS disk (``fsdisks``)."""

    location: str
    v1: PointInfo
    v2: PointInfo
    blank: PointInfo
    os1: PointInfo
    os2: PointInfo
    fs1: PointInfo
    fs2: PointInfo


def backup(arc: Archive, machine: str, image: Path) -> PointInfo:
    src = FileSource(image)
    try:
        return arc.backup(machine, src)
    finally:
        src.close()


@pytest.fixture(scope="session")
def points(tmp_path_factory: pytest.TempPathFactory) -> Points:
    location = str(tmp_path_factory.mktemp("filerestore") / "archive")
    arc = Archive.init(location)
    v1 = backup(arc, "files", build_disk(1))
    v2 = backup(arc, "files", build_disk(2))
    blank = backup(arc, "blank", build_blank())
    os1, os2 = (backup(arc, "osbox", image) for image in build_os_disks())
    fs1, fs2 = (backup(arc, "fsbox", image) for image in build_fs_disks())
    return Points(location, v1, v2, blank, os1, os2, fs1, fs2)


@pytest.fixture(scope="session")
def all_disks(points: Points) -> Iterator[list[PointFiles]]:
    """The disks of every point in one appliance (it boots once per session)."""
    arc = Archive.open(points.location)
    with api.point_files(arc, [points.v1, points.v2, points.blank, points.os1, points.os2, points.fs1,
                               points.fs2]) as found:
        yield list(found)


@pytest.fixture(scope="session")
def disks(all_disks: list[PointFiles]) -> tuple[PointFiles, PointFiles, PointFiles]:
    """The disks of v1, v2 and the blank point."""
    return all_disks[0], all_disks[1], all_disks[2]


@pytest.fixture(scope="session")
def os_disks(all_disks: list[PointFiles]) -> tuple[PointFiles, PointFiles]:
    """The operating system disks of os1 and os2: the same LVM physical volume and volume group
    UUIDs in one appliance (the helper filters LVM to one of them at a time)."""
    return all_disks[3], all_disks[4]


@pytest.fixture(scope="session")
def fs_disks(all_disks: list[PointFiles]) -> tuple[PointFiles, PointFiles]:
    """The btrfs and NTFS disks of fs1 and fs2: the same btrfs fsid in one appliance (the helper
    gives the second copy a fsid of its own in the appliance's overlay)."""
    return all_disks[5], all_disks[6]


@contextlib.contextmanager
def mounted(location: str, selector: str, view: Path, fs: str) -> Iterator[Path]:
    """``lifeboat mount SELECTOR VIEW --fs FS`` running until the block ends, then unmounted with
    ``guestunmount`` (the command must then exit 0 and leave nothing mounted)."""
    env = {**os.environ, "LIFEBOAT_ARCHIVE": location}
    proc = subprocess.Popen([*LIFEBOAT, "mount", selector, str(view), "--fs", fs], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "mounted" in line:
                break
        assert os.path.ismount(view), "".join(lines)
        yield view
    finally:
        subprocess.run(["guestunmount", str(view)], check=False)
        assert proc.wait(120) == 0
    assert not os.path.ismount(view)
