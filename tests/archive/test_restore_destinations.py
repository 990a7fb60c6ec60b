"""Restore never replaces a device node: block devices are written in place, character devices,
FIFOs, sockets and directories are refused (exit 2, naming the path and what it is), even with
``--force``. The character device is our own node with /dev/null's numbers, never a real one."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.errors import DestinationError
from lifeboat.archive.restore import restore
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from tests.archive.helpers import BytesSource

CS = 4096
DATA = os.urandom(CS * 5) + bytes(CS * 3) + os.urandom(123)


@pytest.fixture
def arc(tmp_path: Path) -> Archive:
    a = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    a.backup("m", BytesSource(DATA))
    return a


def _char_device(p: Path) -> None:
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers: writes would vanish


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _socket(p: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()  # the node stays


def _directory(p: Path) -> None:
    p.mkdir()


SPECIAL: dict[str, tuple[Callable[[Path], None], Callable[[int], bool]]] = {
    "character device": (_char_device, stat.S_ISCHR),
    "FIFO": (_fifo, stat.S_ISFIFO),
    "socket": (_socket, stat.S_ISSOCK),
    "directory": (_directory, stat.S_ISDIR),
}


@pytest.mark.parametrize("kind", sorted(SPECIAL))
@pytest.mark.parametrize("force", [False, True])
def test_special_files_are_refused_and_kept(arc: Archive, tmp_path: Path, kind: str, force: bool) -> None:
    make, is_kind = SPECIAL[kind]
    dest = tmp_path / "dest"
    make(dest)
    with pytest.raises(DestinationError, match=f"{dest} is a {kind}") as err:
        restore(arc.reader(arc.resolve("m")), dest, force=force)
    assert err.value.exit_code == 2
    assert is_kind(os.lstat(dest).st_mode), f"{kind} was replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arc", "dest"]  # no temporary left


def test_link_to_a_character_device_is_refused(arc: Archive, tmp_path: Path) -> None:
    node = tmp_path / "null"
    _char_device(node)
    link = tmp_path / "disk"
    link.symlink_to(node)
    with pytest.raises(DestinationError, match="character device"):
        restore(arc.reader(arc.resolve("m")), link, force=True)
    assert link.is_symlink() and stat.S_ISCHR(os.lstat(node).st_mode)


def test_cli_restore_force_onto_character_device_exits_2(arc: Archive, tmp_path: Path) -> None:
    dest = tmp_path / "null"
    _char_device(dest)
    r = subprocess.run([*LIFEBOAT, "restore", "m", str(dest), "--force", "--archive", str(tmp_path / "arc")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert str(dest) in r.stderr and "character device" in r.stderr
    assert stat.S_ISCHR(os.lstat(dest).st_mode)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    backing = tmp_path / "backing"
    backing.write_bytes(b"\xff" * (len(DATA) + 8 * CS))
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("force", [False, True])
def test_block_device_is_written_in_place(arc: Archive, loop_device: str, force: bool) -> None:
    restore(arc.reader(arc.resolve("m")), loop_device, force=force)
    assert stat.S_ISBLK(os.stat(loop_device).st_mode)
    with open(loop_device, "rb") as f:
        written = f.read(len(DATA) + CS)
    assert written == DATA + b"\xff" * CS  # the point, zero chunks as zeros, and the rest untouched
