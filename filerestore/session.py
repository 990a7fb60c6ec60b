"""A libguestfs appliance reading points over NBD, driven from lifeboat's own interpreter.

``GuestSession`` starts ``helper.py`` under Debian's ``/usr/bin/python3`` (the only interpreter
``python3-guestfs`` imports under) with ``LIBGUESTFS_BACKEND=direct`` and
``LIBGUESTFS_BACKEND_SETTINGS=force_tcg`` (KVM crashes the appliance on the machines this was
built on; TCG is slower to boot but works everywhere) and speaks JSON lines with it. The
appliance boots once per session (20 s or more) and serves every later request.

``PointFiles`` is one point's disk inside a session: its file systems (``fs``), directory
listings (``ls``), copies out (``get``) and file lists for the index (``walk``). Device names are
given and shown as if the point's disk were the only one (``/dev/sda1``), whichever disk of the
session it is.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.fileindex import FileRecord, FsIndex, write_index
from lifeboat.plumbing.errors import LifeboatError, UsageError

HELPER = Path(__file__).with_name("helper.py")
SYSTEM_PYTHON = "/usr/bin/python3"
BTRFSVOL = "btrfsvol:"  # libguestfs' name of a btrfs subvolume: btrfsvol:DEVICE/PATH
GUESTFS_ENV = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


class FileRestoreError(LifeboatError):
    """The appliance failed, or a point cannot be read at file level (exit 1)."""


class NoFileSystem(FileRestoreError):
    """The point's disk holds no file system lifeboat can read."""


class EncryptedVolume(FileRestoreError):
    """The file system asked for is inside an encrypted volume."""


class PathMissing(UsageError):
    """The path asked for does not exist in the point (exit 2)."""


class DestExists(UsageError):
    """``files get`` never overwrites: DEST must not exist (exit 2)."""


ERRORS: dict[str, type[LifeboatError]] = {"encrypted": EncryptedVolume, "nofs": NoFileSystem,
                                          "missing": PathMissing, "notdir": PathMissing, "usage": UsageError}


def check_dest(dest: Path) -> None:
    """``files get`` writes only a new path in an existing folder."""
    if os.path.lexists(dest):
        raise DestExists(f"{dest} exists: lifeboat files get never overwrites")
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent}: no such directory")


def readable(filesystems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of ``PointFiles.filesystems``' items, those lifeboat can mount (not swap, not encrypted, not
    unknown)."""
    return [f for f in filesystems if f["fstype"] not in ("unknown", "swap") and not f["encrypted"]]


@dataclass(frozen=True)
class Drive:
    """One NBD export the appliance reads as a disk."""

    host: str
    port: int
    export: str


class GuestSession:
    """One libguestfs appliance with ``drives`` attached read-only, until ``close()``."""

    def __init__(self, drives: list[Drive], python: str = SYSTEM_PYTHON) -> None:
        if not Path(python).exists():
            raise FileRestoreError(f"{python} is missing: file-level restore needs Debian's python3 "
                                   "with python3-guestfs (scripts/setup.sh installs it)")
        env = {**os.environ, **GUESTFS_ENV}
        # stderr to a file, not a pipe: libguestfs may write more than a pipe holds while no one reads
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([python, str(HELPER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, env=env, text=True)
        try:
            self.devices: list[str] = self.request(
                "launch", drives=[{"host": d.host, "port": d.port, "export": d.export} for d in drives])["devices"]
        except BaseException:
            self.close()
            raise

    def request(self, op: str, **args: Any) -> Any:
        """Send one request, return its answer; a refusal raises its typed error."""
        stdin, stdout = self._pipes()
        try:
            stdin.write(json.dumps({"op": op, **args}) + "\n")
            stdin.flush()
            line = stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self._proc.wait()
            self._stderr.seek(0)
            err = self._stderr.read()
            raise FileRestoreError(f"the libguestfs helper exited ({self._proc.returncode}): {err.strip()[-2000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise ERRORS.get(reply["kind"], FileRestoreError)(reply["error"])
        return reply["ok"]

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        return self._proc.stdin, self._proc.stdout

    def disk(self, index: int) -> PointFiles:
        """The ``index``-th drive (in the order given) as a point's files."""
        return PointFiles(self, index)

    def close(self) -> None:
        """Shut the appliance down (closing its stdin ends the helper)."""
        if self._proc.poll() is None:
            if self._proc.stdin:
                self._proc.stdin.close()
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout:
            self._proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> GuestSession:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class PointFiles:
    """The file systems of one disk of a session."""

    def __init__(self, session: GuestSession, index: int) -> None:
        self.session = session
        self.prefix = session.devices[index]
        self.index = index
        self._filesystems: list[dict[str, Any]] | None = None
        self._systems: list[dict[str, Any]] | None = None

    # device names as the user sees them (the disk alone: /dev/sda...) and as the appliance does
    def _inside(self, device: str) -> str:
        if device.startswith(BTRFSVOL):
            return BTRFSVOL + self._inside(device[len(BTRFSVOL):])
        return self.prefix + device[len("/dev/sda"):] if device.startswith("/dev/sda") else device

    def _outside(self, device: str) -> str:
        if device.startswith(BTRFSVOL):
            return BTRFSVOL + self._outside(device[len(BTRFSVOL):])
        return "/dev/sda" + device[len(self.prefix):] if device.startswith(self.prefix) else device

    def fs(self) -> dict[str, Any]:
        """``{"filesystems": [{device, fstype, label, uuid, size, encrypted, lvm[, subvolume_of]}], "os": [{root,
        type, distro, product, mountpoints: [[mountpoint, device]]}]}``."""
        return {"filesystems": self.filesystems(), "os": self.systems()}

    def filesystems(self) -> list[dict[str, Any]]:
        """The partitions, LVM volumes and file systems of the disk. A btrfs subvolume
        (``btrfsvol:/dev/sda1/home``) has ``subvolume_of``: the device whose mount shows it as a
        folder, or "" when that mount does not (its default subvolume is not the top level)."""
        if self._filesystems is None:
            found = self.session.request("filesystems", disk=self.index)["filesystems"]
            for f in found:
                f["device"] = self._outside(f["device"])
                if f.get("subvolume_of"):
                    f["subvolume_of"] = self._outside(f["subvolume_of"])
            self._filesystems = found
        return self._filesystems

    def systems(self) -> list[dict[str, Any]]:
        """The operating systems found on the disk (inspection: slower, asked only when needed)."""
        if self._systems is None:
            found = self.session.request("systems", disk=self.index)["os"]
            for o in found:
                o["root"] = self._outside(o["root"])
                o["mountpoints"] = [[m, self._outside(d)] for m, d in o["mountpoints"]]
            self._systems = found
        return self._systems

    def readable(self) -> list[dict[str, Any]]:
        """The file systems lifeboat can mount (not swap, not encrypted, not unknown)."""
        return readable(self.filesystems())

    def view(self, device: str | None) -> list[list[str]]:
        """What to mount for paths: ``device`` alone at ``/``; else the operating system's mounts;
        else the disk's one file system."""
        if device is not None:
            known = {f["device"] for f in self.filesystems()}
            if device not in known:
                raise UsageError(f"--fs {device}: no such file system on this point "
                                 f"(found: {', '.join(sorted(known)) or 'none'})")
            return [["/", device]]
        systems = self.systems()
        if systems:
            mountpoints: list[list[str]] = systems[0]["mountpoints"]
            return mountpoints
        readable = self.readable()
        if len(readable) == 1:
            return [["/", readable[0]["device"]]]
        if readable:
            raise UsageError("the disk holds several file systems and no operating system: choose one with "
                             f"--fs ({', '.join(f['device'] for f in readable)})")
        encrypted = [f["device"] for f in self.filesystems() if f["encrypted"]]
        if encrypted:
            raise EncryptedVolume(f"{', '.join(encrypted)}: encrypted volume; lifeboat does not open encrypted volumes")
        raise NoFileSystem("no recognisable file system on this point's disk")

    def _mount(self, device: str | None) -> None:
        self.session.request("mount", disk=self.index, mounts=[[m, self._inside(d)] for m, d in self.view(device)])

    def ls(self, path: str = "/", device: str | None = None) -> list[dict[str, Any]]:
        """A directory's entries: name, type, size, mode, mtime, uid, gid."""
        self._mount(device)
        entries: list[dict[str, Any]] = self.session.request("ls", path=path)["entries"]
        return entries

    def stat(self, path: str, device: str | None = None) -> dict[str, Any]:
        """One entry, as ``ls`` gives it."""
        self._mount(device)
        entry: dict[str, Any] = self.session.request("stat", path=path)["entry"]
        return entry

    def get(self, path: str, dest: Path, device: str | None = None) -> dict[str, Any]:
        """Copy a file, symbolic link or directory tree out to ``dest`` (which must not exist), with
        modes and times; nothing is left at ``dest`` if anything fails."""
        check_dest(dest)
        self._mount(device)
        tmp = dest.parent / f".{dest.name}.lifeboat-{secrets.token_hex(4)}"
        unpacked = tmp.with_name(tmp.name + ".d")
        try:
            entry: dict[str, Any] = self.session.request("get", path=path, dest=str(tmp))["entry"]
            if entry["type"] == "d":
                unpacked.mkdir()
                with tarfile.open(tmp) as tar:
                    tar.extractall(unpacked, filter="tar")
                tmp.unlink()
                os.chmod(unpacked, entry["mode"])
                os.utime(unpacked, (entry["mtime"], entry["mtime"]))
                os.rename(unpacked, dest)
            else:
                if entry["type"] == "f":
                    os.chmod(tmp, entry["mode"])
                os.utime(tmp, (entry["mtime"], entry["mtime"]), follow_symlinks=False)
                os.rename(tmp, dest)
            return entry
        finally:
            if os.path.lexists(tmp):
                tmp.unlink()
            if unpacked.exists():
                shutil.rmtree(unpacked)

    def walk(self) -> list[FsIndex]:
        """Every readable file system's file list, paths within that file system (for the index);
        a btrfs subvolume its file system's list holds as a folder is not listed again."""
        mountpoints = {d: m for o in self.systems() for m, d in o["mountpoints"]}
        readable = self.readable()
        devices = {f["device"] for f in readable}
        out = []
        for f in readable:
            if f.get("subvolume_of") in devices:
                continue
            try:
                self._mount(f["device"])
            except NoFileSystem:
                continue  # recognised by blkid but not mountable: nothing to index
            walked = self.session.request("walk")
            records = [FileRecord(*row) for row in walked["rows"]]
            out.append(FsIndex(f["device"], f["fstype"], f["label"], f["uuid"], mountpoints.get(f["device"], ""),
                               records, FileRecord("/", *walked["root"])))
        return out

    def store_index(self, arc: Archive, info: PointInfo) -> dict[str, int]:
        """Record this disk's file lists, and what ``fs`` says of it, as ``info``'s file index."""
        return write_index(arc, info, self.walk(), self.fs())
