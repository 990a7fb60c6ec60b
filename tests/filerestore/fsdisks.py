"""A test disk with btrfs (and a subvolume) and NTFS, in two versions, as two points of one machine.

GPT: partition 1 a btrfs whose top level holds a subvolume ``home``, partition 2 an NTFS
(Microsoft basic data). Neither looks like an operating system's root: libguestfs' inspection,
which every other test's appliance request may run, would spend tens of seconds more on each
(TCG) for what ``test_os_lvm`` covers already. Version 2 is
version 1 after a change: the same file system UUIDs, a higher btrfs generation, one changed, one
added and one removed file per file system, as two points of one machine are.

Built once and cached by the content of this file under ``~/.cache/lifeboat-tests/filerestore/``,
with loop mounts (root; the kernel's btrfs for ``btrfs subvolume create``, ntfs-3g through FUSE
for NTFS: ``mkfs.btrfs --rootdir`` makes no subvolume and nothing writes NTFS offline).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.filerestore.disks import CACHE, MIB, MTIME

BTRFS_MIB, NTFS_MIB = 128, 16  # mkfs.btrfs refuses less than ~114 MiB; unwritten space costs nothing
BTRFS_UUID = "1feb0a75-b7f5-4d1e-9e55-000000000016"
SUBVOL = "home"
# modes btrfs keeps (NTFS has none: ntfs-3g shows every file alike)
MODES = {"/data/run.sh": 0o755, "/etc/secret": 0o600}


def fs_files(version: int) -> dict[str, dict[str, bytes]]:
    """The files of the btrfs top level (its subvolume left out), of the subvolume and of the NTFS
    (paths within each) in version 1 or 2."""
    big = bytes(range(256)) * 4096 * 2  # 2 MiB
    root = {"/etc/hostname": b"fsbox\n", "/etc/secret": b"s3cret\n", "/data/run.sh": b"#!/bin/sh\necho %d\n" % version,
            "/data/big.bin": big}
    home = {"/alice/todo.txt": b"todo %d\n" % version, "/alice/photo.bin": big[:300_000]}
    ntfs = {"/Windows/win.ini": b"[fonts]\r\n", "/Users/Public/report.txt": b"report version %d\r\n" % version,
            "/Program Files/App/app.dat": big[:100_000]}
    if version == 1:
        root["/old.txt"] = b"only in version 1\n"
        home["/alice/draft.txt"] = b"draft\n"
        ntfs["/Temp/old.tmp"] = b"old\r\n"
    else:
        root["/new.txt"] = b"new in version 2\n"
        home["/bob/hello.txt"] = b"hello bob\n"
        ntfs["/New Folder/new.txt"] = b"new\r\n"
    return {"btrfs": root, "subvol": home, "ntfs": ntfs}


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _write(root: Path, content: dict[str, bytes], old: dict[str, bytes]) -> None:
    """Make the tree under ``root`` go from ``old`` to ``content`` (fixed modes and times)."""
    for path in old.keys() - content.keys():
        (root / path.lstrip("/")).unlink()
    for path, data in content.items():
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if old.get(path) != data:
            p.write_bytes(data)
        if path in MODES:
            os.chmod(p, MODES[path])
        os.utime(p, (MTIME, MTIME))
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        if d.name != "lost+found" and not d.name.startswith("$") and not d.name.startswith("System Volume"):
            os.utime(d, (MTIME, MTIME))


class _Mounted:
    """A partition image mounted on a fresh folder (btrfs through a loop device, NTFS by ntfs-3g)."""

    def __init__(self, image: Path, kind: str, work: Path) -> None:
        self.image, self.kind = image, kind
        self.dir = Path(tempfile.mkdtemp(dir=work))

    def __enter__(self) -> Path:
        if self.kind == "btrfs":
            _run("mount", "-o", "loop", str(self.image), str(self.dir))
        else:
            _run("ntfs-3g", str(self.image), str(self.dir))
        return self.dir

    def __exit__(self, *exc: object) -> None:
        _run("umount", str(self.dir))
        self.dir.rmdir()


def _change(btrfs: Path, ntfs: Path, version: int, work: Path) -> None:
    """Write version ``version`` of the files into the partition images (version 1's files are
    the starting point of version 2)."""
    old = fs_files(version - 1) if version > 1 else {"btrfs": {}, "subvol": {}, "ntfs": {}}
    new = fs_files(version)
    with _Mounted(btrfs, "btrfs", work) as top:
        if version == 1:
            _run("btrfs", "subvolume", "create", str(top / SUBVOL))
        _write(top / SUBVOL, new["subvol"], old["subvol"])
        _write(top, new["btrfs"], old["btrfs"])
    with _Mounted(ntfs, "ntfs", work) as top:
        _write(top, new["ntfs"], old["ntfs"])


def build_fs_disks() -> tuple[Path, Path]:
    """The raw disk images of versions 1 and 2 (cached; do not modify them)."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    outs = (CACHE / f"btrfs-ntfs-v1-{digest}.img", CACHE / f"btrfs-ntfs-v2-{digest}.img")
    if all(o.exists() for o in outs):
        return outs
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        btrfs, ntfs, blank = work / "btrfs.img", work / "ntfs.img", work / "blank.img"
        for img, size in ((btrfs, BTRFS_MIB), (ntfs, NTFS_MIB), (blank, 1 + BTRFS_MIB + NTFS_MIB + 1)):
            with open(img, "wb") as f:
                f.truncate(size * MIB)
        table = (f"label: gpt\nsize={BTRFS_MIB}MiB\n"
                 f"size={NTFS_MIB}MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n")
        subprocess.run(["sfdisk", "-q", str(blank)], input=table.encode(), check=True, capture_output=True)
        _run("mkfs.btrfs", "-q", "-f", "-L", "FSROOT", "-U", BTRFS_UUID, str(btrfs))
        _run("mkntfs", "-q", "-F", "-f", "-L", "WINDATA", "-p", str((1 + BTRFS_MIB) * MIB // 512), str(ntfs))
        for version, out in enumerate(outs, 1):
            _change(btrfs, ntfs, version, work)
            disk = work / f"disk-v{version}.img"
            shutil.copyfile(blank, disk)
            for img, at in ((btrfs, 1), (ntfs, 1 + BTRFS_MIB)):
                _run("dd", f"if={img}", f"of={disk}", "bs=1M", f"seek={at}", "conv=notrunc,sparse")
            os.replace(disk, out)
    return outs
