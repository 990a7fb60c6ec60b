"""A block device that is an LVM logical volume, read from a temporary LVM snapshot.

Reading a live device gives a point that mixes moments; an LVM snapshot freezes the volume at
one instant (crash-consistent, like pulling the power), so the point is one real state of the
disk. The snapshot is created by ``prepare``, read, and removed by ``commit``/``abort``. If its
copy-on-write space fills up during the read, LVM invalidates it and reads fail: the capture
fails with a clear error rather than storing a mixed point (device-mapper fails every read of an
invalidated snapshot, so every read that succeeded came from the intact snapshot). The snapshot size is 20 % of the
volume (at least 256 MiB) unless ``LIFEBOAT_LVM_SNAPSHOT_SIZE`` (an lvcreate ``--size``) says.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import subprocess
from typing import ClassVar

from lifeboat.agent.plan import MODE_FULL, MODE_HASH_SCAN, BackupPlan, CaptureError, Guarantees
from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.errors import SourceError
from lifeboat.archive.files import FileSource
from lifeboat.archive.points import now_utc
from lifeboat.plumbing.errors import UsageError

MIN_SNAPSHOT = 256 * 1024 * 1024


def _lvm(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise CaptureError(f"{' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def logical_volume(path: str) -> tuple[str, str, int] | None:
    """(volume group, volume, size) when ``path`` is an LVM logical volume, else None."""
    try:
        if not stat.S_ISBLK(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    if shutil.which("lvs") is None:
        return None
    proc = subprocess.run(["lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
                           "-o", "vg_name,lv_name,lv_size", path], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    vg, lv, size = (x.strip() for x in proc.stdout.strip().splitlines()[0].split("|"))
    return vg, lv, int(float(size))


def open_volume(path: str) -> LvmSnapshotSource:
    """The LVM logical volume at ``path`` as a source; ``UsageError`` if it is none."""
    lv = logical_volume(path)
    if lv is None:
        raise UsageError(f"source {path}: not an LVM logical volume")
    return LvmSnapshotSource(path, *lv)


class LvmSnapshotSource:
    """An LVM logical volume, captured from a snapshot taken at ``prepare``."""

    guarantees: ClassVar[Guarantees] = Guarantees(crash_consistent=True)

    def __init__(self, path: str, vg: str, lv: str, size: int) -> None:
        self.path = path
        self.vg, self.lv = vg, lv
        self.size = size
        self.name = path
        self._snap: str | None = None
        self._file: FileSource | None = None

    def prepare(self, arc: Archive, machine: str) -> BackupPlan:
        """Take the snapshot; everything is read and hashed from it."""
        snap = f"lifeboat-snap-{secrets.token_hex(4)}"
        size = os.environ.get("LIFEBOAT_LVM_SNAPSHOT_SIZE") or f"{max(MIN_SNAPSHOT, self.size // 5)}b"
        started = now_utc()
        _lvm("lvcreate", "--snapshot", "--name", snap, "--size", size, f"{self.vg}/{self.lv}")
        self._snap = snap
        try:
            dev = _lvm("lvs", "--noheadings", "-o", "lv_path", f"{self.vg}/{snap}").strip()
            self._file = FileSource(dev)
        except (CaptureError, SourceError):
            self.abort()
            raise
        self.size = self._file.size
        mode = MODE_HASH_SCAN if arc.points(machine) else MODE_FULL
        return BackupPlan(mode=mode, started=started, size=self.size,
                          notes=[f"read from LVM snapshot {self.vg}/{snap} of {self.vg}/{self.lv}"])

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the snapshot."""
        if self._file is None:
            raise UsageError(f"source {self.path}: read before prepare()")
        try:
            return self._file.read(offset, length)
        except SourceError as e:
            raise CaptureError(f"LVM snapshot of {self.vg}/{self.lv} became unreadable (full?): {e}") from None

    def _remove(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._snap is not None:
            snap, self._snap = self._snap, None
            _lvm("lvremove", "--force", f"{self.vg}/{snap}")

    def commit(self, info: PointInfo) -> None:
        """Remove the snapshot."""
        self._remove()

    def abort(self) -> None:
        """Remove the snapshot."""
        with contextlib.suppress(CaptureError):
            self._remove()

    def close(self) -> None:
        """Remove a leftover snapshot."""
        self.abort()

    def __enter__(self) -> LvmSnapshotSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
