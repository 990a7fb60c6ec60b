"""The issue's error cases that ``test_files`` leaves out, in the session's appliance: copying out of
an encrypted volume, out of a point with no file system, a missing path on btrfs and NTFS and a
DEST that exists each say what is wrong, with the exit status the CLI gives (1: the point cannot
be read that way; 2: bad input), and write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifeboat.filerestore import DestExists, EncryptedVolume, NoFileSystem, PathMissing, PointFiles
from lifeboat.plumbing.errors import LifeboatError

Disks = tuple[PointFiles, PointFiles, PointFiles]


def refused(call: object, kind: type[LifeboatError], says: str, status: int) -> None:
    assert callable(call)
    with pytest.raises(kind, match=says) as e:
        call()
    assert e.value.exit_code == status


def test_get_refusals_write_nothing(disks: Disks, fs_disks: tuple[PointFiles, PointFiles], tmp_path: Path) -> None:
    v1, _, blank = disks
    dest = tmp_path / "out"
    refused(lambda: v1.get("/", dest, "/dev/sda4"), EncryptedVolume, "/dev/sda4.*encrypted", 1)
    refused(lambda: blank.get("/etc/hostname", dest), NoFileSystem, "no recognisable file system", 1)
    refused(lambda: blank.get("/", dest, "/dev/sda"), NoFileSystem, "holds no file system", 1)
    refused(lambda: fs_disks[0].get("/home/nobody", dest, "/dev/sda1"), PathMissing, "/home/nobody", 2)
    refused(lambda: fs_disks[0].get("/Users/nobody.txt", dest, "/dev/sda2"), PathMissing, "/Users/nobody.txt", 2)
    dest.mkdir()
    refused(lambda: fs_disks[1].get("/Windows", dest, "/dev/sda2"), DestExists, "never overwrites", 2)
    assert list(tmp_path.iterdir()) == [dest] and list(dest.iterdir()) == []
