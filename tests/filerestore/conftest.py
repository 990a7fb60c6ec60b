"""One archive and one libguestfs appliance for every file-level restore test (the appliance
boots once per session: 20 s or more)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.files import FileSource
from lifeboat.filerestore import PointFiles
from lifeboat.orchestrator import api
from tests.filerestore.disks import build_blank, build_disk


@dataclass
class Points:
    """The archive, and machine ``files``' points of disk version 1 and 2, and a blank disk's."""

    location: str
    v1: PointInfo
    v2: PointInfo
    blank: PointInfo


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
    return Points(location, v1, v2, backup(arc, "blank", build_blank()))


@pytest.fixture(scope="session")
def disks(points: Points) -> Iterator[tuple[PointFiles, PointFiles, PointFiles]]:
    """The disks of v1, v2 and the blank point in one appliance."""
    arc = Archive.open(points.location)
    with api.point_files(arc, [points.v1, points.v2, points.blank]) as (v1, v2, blank):
        yield v1, v2, blank
