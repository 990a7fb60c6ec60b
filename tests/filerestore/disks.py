"""Partitioned test disks with known files, built without root mounts or an appliance.

A GPT disk of four partitions: ext4 (``mkfs.ext4 -d``), xfs (``mkfs.xfs -p`` prototype file; xfs
refuses file systems under 300 MB, but unwritten space costs nothing in the archive), vfat
(``mkfs.vfat`` + ``mcopy``) and a LUKS volume (``cryptsetup luksFormat`` on a file). Version 1 and
version 2 differ in one changed, one added and one removed file per file system. Disks are built
once and cached by the content of this file under ``~/.cache/lifeboat-tests/filerestore/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

CACHE = Path.home() / ".cache" / "lifeboat-tests" / "filerestore"
MIB = 1024 * 1024
# partition sizes in MiB, in order; the disk has 1 MiB before the first and after the last
PARTS = [("ext4", 16), ("xfs", 300), ("vfat", 16), ("luks", 16)]
MTIME = 1_700_000_000  # fixed times, so that get's kept mtime can be checked


def files(version: int) -> dict[str, dict[str, bytes]]:
    """The files of each file system (path within it -> bytes) in disk ``version`` (1 or 2)."""
    big = bytes(range(256)) * 4096 * 3  # 3 MiB: spans chunks of a small-chunk archive
    common = {
        "/etc/hostname": b"filehost\n",
        "/data/big.bin": big,
        "/data/nested/deep/note.txt": b"deep note\n",
    }
    v1 = {
        "ext4": {**common, "/etc/app.conf": b"level=1\n", "/old.txt": b"only in version 1\n"},
        "xfs": {**common, "/srv/report.csv": b"a,b\n1,2\n", "/gone.log": b"removed later\n"},
        "vfat": {"/BOOT/CONFIG.TXT": b"boot=1\n", "/README.TXT": b"vfat readme\n", "/OLD.TXT": b"old\n"},
    }
    if version == 1:
        return v1
    return {
        "ext4": {**{k: v for k, v in v1["ext4"].items() if k != "/old.txt"}, "/etc/app.conf": b"level=2\nmore=yes\n",
                 "/new.txt": b"new in version 2\n"},
        "xfs": {**{k: v for k, v in v1["xfs"].items() if k != "/gone.log"}, "/srv/report.csv": b"a,b\n1,2\n3,4\n",
                "/srv/added.csv": b"x\n"},
        "vfat": {**{k: v for k, v in v1["vfat"].items() if k != "/OLD.TXT"}, "/BOOT/CONFIG.TXT": b"boot=2\n",
                 "/NEW.TXT": b"new\n"},
    }


def _tree(root: Path, content: dict[str, bytes]) -> None:
    for path, data in content.items():
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (MTIME, MTIME))
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        os.utime(d, (MTIME, MTIME))


def _run(*cmd: str, **kw: object) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def _xfs_proto(root: Path) -> str:
    """An ``mkfs.xfs -p`` prototype of the tree at ``root``."""
    lines = ["lifeboat", "0 0", "d--755 0 0"]

    def walk(d: Path, depth: int) -> None:
        for p in sorted(d.iterdir()):
            if p.is_dir():
                lines.append(f"{p.name} d--755 0 0")
                walk(p, depth + 1)
                lines.append("$")
            else:
                lines.append(f"{p.name} ---644 0 0 {p}")

    walk(root, 0)
    lines += ["$", ""]
    return "\n".join(lines)


def _partition(kind: str, size_mib: int, content: dict[str, bytes], work: Path) -> Path:
    img = work / f"{kind}.img"
    with open(img, "wb") as f:
        f.truncate(size_mib * MIB)
    root = work / f"{kind}-tree"
    if kind != "luks":
        _tree(root, content)
    if kind == "ext4":
        _run("mkfs.ext4", "-q", "-F", "-L", "ROOTFS", "-d", str(root), str(img))
    elif kind == "xfs":
        (work / "proto").write_text(_xfs_proto(root))
        _run("mkfs.xfs", "-q", "-L", "DATA", "-p", str(work / "proto"), str(img))
    elif kind == "vfat":
        _run("mkfs.vfat", "-n", "BOOTFS", str(img))
        _run("mcopy", "-i", str(img), "-s", "-m", *[str(p) for p in sorted(root.iterdir())], "::/")
    else:
        subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                        "--pbkdf-force-iterations", "1000", str(img), "-"], input=b"secret", check=True,
                       capture_output=True)
    return img


def build_disk(version: int) -> Path:
    """The raw disk image of ``version`` (cached; do not modify it)."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    out = CACHE / f"disk-v{version}-{digest}.img"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        disk = work / "disk.img"
        total = 1 + sum(s for _, s in PARTS) + 1
        with open(disk, "wb") as f:
            f.truncate(total * MIB)
        table = "label: gpt\n" + "".join(f"size={s}MiB\n" for _, s in PARTS)
        subprocess.run(["sfdisk", "-q", str(disk)], input=table.encode(), check=True, capture_output=True)
        start = 1
        for kind, size in PARTS:
            part = _partition(kind, size, files(version).get(kind, {}), work)
            _run("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={start}", "conv=notrunc,sparse")
            start += size
        os.replace(disk, out)
    return out


def build_blank() -> Path:
    """A disk with no file system at all (bytes, not zeros)."""
    out = CACHE / "blank.img"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(hashlib.sha256(b"lifeboat").digest() * (4 * MIB // 32))
        os.replace(tmp, out)
    return out


def copy_of(src: Path, dest: Path) -> Path:
    """A copy a test may back up (a source the test owns)."""
    shutil.copyfile(src, dest)
    return dest


# -- a disk with an operating system's layout and LVM ----------------------------------------------
# GPT: partition 1 an ext4 root (/etc/fstab, /etc/os-release, /bin: what libguestfs' inspection
# needs to call it a Linux root), partition 2 an LVM physical volume of volume group ``osvg`` whose
# logical volume ``srv`` holds an ext4 the root's fstab mounts at /srv. Version 2 is version 1 after
# a change (the same volume group and UUIDs, other files), as two points of one machine are.
OS_VG, OS_LV = "osvg", "srv"
OS_ROOT_MIB, OS_PV_MIB, OS_LV_MIB = 16, 24, 16
FSTAB = f"/dev/sda1 / ext4 defaults 0 1\n/dev/{OS_VG}/{OS_LV} /srv ext4 defaults 0 2\n"


def os_files(version: int) -> dict[str, dict[str, bytes]]:
    """The files of the root and of the logical volume (paths within each) in version 1 or 2."""
    root = {"/etc/fstab": FSTAB.encode(), "/etc/hostname": b"oshost\n",
            "/etc/os-release": b'NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian 12"\n',
            "/etc/debian_version": b"12.0\n", "/bin/sh": b"#!/bin/false\n", "/usr/bin/true": b"#!/bin/false\n"}
    srv = {"/www/index.html": b"<p>version %d</p>\n" % version, "/data/blob.bin": bytes(range(256)) * 2048,
           f"/only-v{version}.txt": b"only in version %d\n" % version}
    return {"root": root, "lv": srv}


def _ext4(content: dict[str, bytes], size_mib: int, label: str, work: Path, dirs: tuple[str, ...] = ()) -> Path:
    root = work / f"{label}-tree"
    shutil.rmtree(root, ignore_errors=True)
    for d in dirs:  # empty folders: mount points
        (root / d).mkdir(parents=True)
    _tree(root, content)
    img = work / f"{label}.img"
    img.unlink(missing_ok=True)
    with open(img, "wb") as f:
        f.truncate(size_mib * MIB)
    fixed = str(uuid.UUID(hashlib.md5(label.encode()).hexdigest()))
    _run("mkfs.ext4", "-q", "-F", "-L", label, "-U", fixed, "-d", str(root), str(img))
    return img


LV_META = f"""
logical_volumes {{
{OS_LV} {{
id = "L1feB0-at00-srv0-0000-0000-0000-000001"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
segment_count = 1
segment1 {{
start_extent = 0
extent_count = {OS_LV_MIB}
type = "striped"
stripe_count = 1
stripes = ["pv0", 0]
}}
}}
}}
"""


def _lv_offset(disk: Path, pv_start_mib: int, work: Path) -> int:
    """Make the disk's partition 2 a physical volume of volume group ``osvg`` with one linear
    logical volume of 1 MiB extents from its first; return the volume's byte offset in the disk.
    Through a loop device over the partition, with nothing activated: there is no device-mapper
    here, so ``lvcreate`` refuses; the volume is written into the group's metadata instead
    (``vgcfgbackup``, add it, ``vgcfgrestore``)."""
    loop = subprocess.run(["losetup", "--find", "--show", "--offset", str(pv_start_mib * MIB), "--sizelimit",
                           str(OS_PV_MIB * MIB), str(disk)], check=True, capture_output=True, text=True).stdout.strip()
    lvm = ["--devices", loop, "--config", "backup { backup = 0 archive = 0 }"]
    meta = work / "osvg.vg"
    try:
        _run("pvcreate", "-q", *lvm, loop)
        _run("vgcreate", "-q", *lvm, "--physicalextentsize", "1M", OS_VG, loop)
        _run("vgcfgbackup", "-q", *lvm, "-f", str(meta), OS_VG)
        text = meta.read_text()
        end = text.rindex("\n}")
        meta.write_text(text[:end] + LV_META + text[end:])
        _run("vgcfgrestore", "-q", *lvm, "-f", str(meta), OS_VG)
        pe_start = subprocess.run(["pvs", *lvm, "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", loop],
                                  check=True, capture_output=True, text=True).stdout.strip()
        return pv_start_mib * MIB + int(pe_start)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=False)


def build_os_disks() -> tuple[Path, Path]:
    """The raw disk images of the operating system layout, versions 1 and 2 (cached; needs root for
    a loop device: LVM's tools write only to block devices)."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    outs = (CACHE / f"os-v1-{digest}.img", CACHE / f"os-v2-{digest}.img")
    if all(o.exists() for o in outs):
        return outs
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        blank = work / "blank.img"
        with open(blank, "wb") as f:
            f.truncate((1 + OS_ROOT_MIB + OS_PV_MIB + 1) * MIB)
        table = f"label: gpt\nsize={OS_ROOT_MIB}MiB\nsize={OS_PV_MIB}MiB, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n"
        subprocess.run(["sfdisk", "-q", str(blank)], input=table.encode(), check=True, capture_output=True)
        lv_at = _lv_offset(blank, 1 + OS_ROOT_MIB, work)
        for version, out in enumerate(outs, 1):
            disk = work / f"disk-v{version}.img"
            shutil.copyfile(blank, disk)
            content = os_files(version)
            for img, at in ((_ext4(content["root"], OS_ROOT_MIB, "OSROOT", work, ("srv",)), MIB),
                            (_ext4(content["lv"], OS_LV_MIB, "OSSRV", work), lv_at)):
                _run("dd", f"if={img}", f"of={disk}", "bs=64K", f"seek={at}", "oflag=seek_bytes",
                     "conv=notrunc,sparse")
            os.replace(disk, out)
    return outs
