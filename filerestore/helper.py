"""The libguestfs side of file-level restore: a small program run under Debian's ``/usr/bin/python3``.

libguestfs' Python binding (``python3-guestfs``) exists only for Debian's interpreter, not for the
virtual environment lifeboat runs in, so ``filerestore.session`` starts this file as a child
process and talks to it in JSON lines over stdin/stdout: one request ``{"op": ..., ...}`` a line,
one reply ``{"ok": ...}`` or ``{"error": ..., "kind": ...}`` a line. It imports nothing of lifeboat.

One appliance per process: ``launch`` adds the given NBD exports read-only (one disk each, in
order: the first is ``/dev/sda``) and boots the appliance once; every later request reuses it.
Each view (one file system, or an operating system's mounts) is mounted once, under its own folder
of the appliance, and stays mounted; paths are looked up below that folder, so an absolute
symbolic link in the middle of a path is not followed into the guest (name the real path).
When more than one disk holds LVM physical volumes (two points of one machine: the same PV and VG
UUIDs, which LVM refuses to activate twice), LVM is filtered to one of those disks at a time
(``lvm_set_filter``): a request about another of them unmounts every view and switches the filter.
Copies of one btrfs on several disks (the same fsid: two points of one machine) are another
matter: Linux (the appliance's 6.1) mounts only one device of a given fsid, and refuses one of an
older generation once a newer one is registered, which makes libguestfs' listing and inspection
fail. At launch every further copy gets a fsid of its own in the appliance's copy-on-write overlay
(``btrfstune -m``: the superblock alone; the point is not written), and is shown with the UUID
it has on disk.
NTFS, which has no POSIX modes, is mounted with files 0644 and folders 0755 (ntfs-3g shows 0777).
Each request's duration goes to stderr (kept in a file by the caller, shown when the helper fails).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
import time
from typing import Any

TYPE_OF_MODE = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
                stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}
ENCRYPTED = ("crypto_LUKS", "BitLocker")
MOUNT_OPTIONS = {"ntfs": "ro,fmask=0133,dmask=0022"}  # what is not "ro" alone
BTRFS_TOP_LEVEL = 5  # the subvolume id of a btrfs' top level
STAT_BATCH = 500


class Refused(Exception):
    """A request that cannot be answered for a reason the user should read (``kind`` says which)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Helper:
    """The appliance and what is mounted in it."""

    def __init__(self) -> None:
        self.g: Any = None
        self.views: dict[tuple[tuple[str, str], ...], str] = {}  # view -> the appliance folder it is under
        self.base: str | None = None  # the folder of the current view
        self._next_view = 0
        self._pv_disks: set[int] | None = None  # the disks holding LVM physical volumes
        self._lvm_disk: int | None = None  # the one LVM is filtered to, if it is filtered
        # what was found, per LVM filter: another filter shows other logical volumes
        self._fstype_cache: dict[int | None, dict[str, str]] = {}
        self._roots: dict[int | None, list[str]] = {}
        self._uuids: dict[str, str] = {}  # a btrfs copy's own UUID, changed in the overlay
        # partitions and disks (the same under every filter): their types, and each btrfs
        # subvolume's device if that device's mount shows it as a folder, else ""
        self._plain: tuple[dict[str, str], dict[str, str]] | None = None
        self._subvolume_of: dict[int | None, dict[str, str]] = {}

    # -- requests --------------------------------------------------------------------------
    def launch(self, drives: list[dict[str, Any]]) -> dict[str, Any]:
        import guestfs  # only Debian's python3 has it: imported here so that the module loads anywhere

        g = guestfs.GuestFS(python_return_dict=True)
        for d in drives:
            # with protocol nbd, the "filename" is the export name
            g.add_drive_opts(d["export"], readonly=1, format="raw", protocol="nbd",
                             server=[f"tcp:{d['host']}:{d['port']}"])
        g.launch()
        self.g = g
        self._separate_btrfs_copies()
        return {"devices": g.list_devices()}

    def filesystems(self, disk: int) -> dict[str, Any]:
        """Partitions, LVM volumes and file systems of disk ``disk`` (0 = /dev/sda)."""
        self._select(disk)
        g = self.g
        prefix = g.list_devices()[disk]
        lvs = set(g.lvs())
        out = []
        fstypes = self._fstypes()
        for dev, fstype in sorted(fstypes.items()):
            if not self._on_disk(dev, prefix, lvs):
                continue
            block = self._block_device(dev)
            item = {"device": dev, "fstype": fstype, "label": "", "uuid": "", "size": 0,
                    "encrypted": fstype in ENCRYPTED, "lvm": dev in lvs}
            if block != dev:  # a btrfs subvolume: shown as a folder of its file system's mount?
                item["subvolume_of"] = self._subvolume_of[self._lvm_disk][dev]
            try:
                item["size"] = g.blockdev_getsize64(block)
                if fstype not in ("unknown", "swap") and not item["encrypted"]:
                    item["label"] = g.vfs_label(block)
                    item["uuid"] = self._uuids.get(block) or g.vfs_uuid(block)
            except RuntimeError:
                pass
            out.append(item)
        return {"filesystems": out}

    def systems(self, disk: int) -> dict[str, Any]:
        """The operating systems on disk ``disk`` and where they mount their file systems
        (libguestfs inspection: it looks into every file system, so it is asked only when needed)."""
        self._select(disk)
        g = self.g
        prefix = g.list_devices()[disk]
        lvs = set(g.lvs())
        if self._lvm_disk not in self._roots:
            self._forget_views()  # inspection unmounts every file system: the views with them
            self._roots[self._lvm_disk] = g.inspect_os()
        roots = []
        for root in self._roots[self._lvm_disk]:
            if not self._on_disk(root, prefix, lvs):
                continue
            mps = g.inspect_get_mountpoints(root)
            roots.append({"root": root, "type": g.inspect_get_type(root), "distro": g.inspect_get_distro(root),
                          "product": g.inspect_get_product_name(root),
                          "mountpoints": sorted(([m, d] for m, d in mps.items()), key=lambda x: len(x[0]))})
        return {"os": roots}

    def mount(self, disk: int, mounts: list[list[str]]) -> dict[str, Any]:
        """Make ``[[mountpoint, device], ...]`` (shortest mountpoint first) of disk ``disk`` the
        view that paths name. Each view is mounted read-only once, under its own folder of the
        appliance, and stays mounted (until the LVM filter changes): going back to an earlier view
        costs nothing."""
        self._select(disk)
        want = tuple((m, d) for m, d in mounts)
        if want in self.views:
            self.base = self.views[want]
            return {}
        g = self.g
        fstypes = self._fstypes()
        for _, dev in want:
            fstype = fstypes.get(dev, "unknown")
            if fstype in ENCRYPTED:
                raise Refused("encrypted", f"{dev} is an encrypted volume ({fstype}): lifeboat does not open "
                                           "encrypted volumes")
            if fstype in ("unknown", "swap"):
                raise Refused("nofs", f"{dev} holds no file system lifeboat can read ({fstype})")
        base = f"/lifeboat-view-{self._next_view}"
        self._next_view += 1
        g.mkmountpoint(base)
        for mp, dev in want:
            try:
                options = MOUNT_OPTIONS.get(fstypes.get(dev, ""))
                if options:
                    g.mount_options(options, dev, base + mp.rstrip("/"))
                else:
                    g.mount_ro(dev, base + mp.rstrip("/"))
            except RuntimeError as e:
                if mp == "/":
                    g.rmmountpoint(base)
                    raise Refused("nofs", f"{dev}: cannot mount its {fstypes[dev]} file system: {e}") from None
                # a secondary file system of the guest that does not mount stays out of the view
        self.views[want] = self.base = base
        return {}

    def ls(self, path: str) -> dict[str, Any]:
        real = self._check(path, want_dir=True)
        names = sorted(self.g.ls(real))
        return {"entries": [self._entry(n, st) for n, st in zip(names, self._stats(real, names), strict=True)]}

    def stat(self, path: str) -> dict[str, Any]:
        real = self._check(path)
        return {"entry": self._entry(path.rsplit("/", 1)[-1] or "/", self.g.lstatns(real))}

    def walk(self) -> dict[str, Any]:
        """Every file under ``/`` of the mounted view: ``[path, type, size, mtime, mode, uid, gid]``
        rows, and the top folder's own ``[type, size, mtime, mode, uid, gid]`` as ``root``."""
        g = self.g
        base = self._check("/")
        with tempfile.NamedTemporaryFile(prefix="lifeboat-find0-") as tmp:
            g.find0(base, tmp.name)
            raw = open(tmp.name, "rb").read()
        paths = [p.decode("utf-8", "surrogateescape") for p in raw.split(b"\0") if p]
        by_dir: dict[str, list[str]] = {}
        for p in paths:
            d, _, name = ("/" + p.lstrip("/")).rpartition("/")
            by_dir.setdefault(d or "/", []).append(name)
        rows = []
        for d, names in by_dir.items():
            for name, st in zip(names, self._stats(base + d.rstrip("/"), names), strict=True):
                full = (d.rstrip("/") or "") + "/" + name
                rows.append([full, *self._row(st)])
        return {"rows": rows, "root": self._row(g.lstatns(base))}

    def get(self, path: str, dest: str) -> dict[str, Any]:
        """Copy ``path`` out to ``dest`` (a new local path): a file's bytes, or a directory as a
        tar archive for the caller to unpack (modes and times kept by tar)."""
        g = self.g
        real = self._check(path)
        st = g.lstatns(real)
        kind = TYPE_OF_MODE.get(stat.S_IFMT(st["st_mode"]), "?")
        if kind == "d":
            g.tar_out(real, dest, numericowner=True, xattrs=False)
        elif kind == "f":
            g.download(real, dest)
        elif kind == "l":
            os.symlink(g.readlink(real), dest)
        else:
            raise Refused("type", f"{path} is not a file, directory or symbolic link")
        return {"entry": self._entry(path.rsplit("/", 1)[-1] or "/", st)}

    # -- helpers ---------------------------------------------------------------------------
    def _select(self, disk: int) -> None:
        """Let LVM see the physical volumes of disk ``disk`` alone, if other disks hold some too:
        copies of one volume group (two points of one machine) are otherwise activated on neither.
        Views are unmounted first (LVM deactivates every volume group to change its filter)."""
        g = self.g
        devices = g.list_devices()
        if self._pv_disks is None:
            parts = g.list_partitions()
            self._pv_disks = {n for n, d in enumerate(devices)
                              if any(self._is_pv(p) for p in [d, *(p for p in parts if p.startswith(d))])}
        if len(self._pv_disks) < 2:
            return
        # a disk without physical volumes is read under whichever filter is set (one is, always)
        want = disk if disk in self._pv_disks else min(self._pv_disks) if self._lvm_disk is None else self._lvm_disk
        if want == self._lvm_disk:
            return
        self._forget_views()
        g.lvm_set_filter([devices[want]])
        self._lvm_disk = want

    def _forget_views(self) -> None:
        """Unmount every view (the next request about one mounts it again)."""
        self.g.umount_all()
        self.views.clear()
        self.base = None

    def _separate_btrfs_copies(self) -> None:
        """Give every further copy of a single-device btrfs (the same fsid on another device) a
        fsid of its own in the overlay, so that the kernel takes them for different file systems;
        keep the UUID each had, to show. The devices of a btrfs that spans several (the same fsid,
        other device ids) are one file system, not copies: they are left as they are."""
        g = self.g
        parts = g.list_partitions()
        seen: dict[str, str] = {}
        for dev in parts + [d for d in g.list_devices() if not any(p.startswith(d) for p in parts)]:
            try:
                if g.vfs_type(dev) != "btrfs":
                    continue
                uuid = g.vfs_uuid(dev)
            except RuntimeError:
                continue
            if uuid not in seen:
                seen[uuid] = dev
                continue
            if "\nnum_devices\t\t1\n" not in g.debug("sh", [f"btrfs inspect-internal dump-super {dev}"]):
                continue
            out = g.debug("sh", [f"btrfstune -m {dev} 2>&1 && echo lifeboat-done"])
            if "lifeboat-done" in out:
                self._uuids[dev] = uuid
            else:  # this copy stays unreadable while another is registered: say why in the log
                print(f"lifeboat-helper: btrfstune -m {dev} failed: {out.strip()}", file=sys.stderr, flush=True)
        if self._uuids:  # the kernel still has the copies registered under the old fsid
            g.debug("sh", ["btrfs device scan --forget && udevadm settle"])

    def _look_at(self, dev: str, types: dict[str, str], parents: dict[str, str]) -> None:
        """Add ``dev``'s type to ``types`` and, for a btrfs, its subvolumes but the default one
        (the device itself mounts that one) to both."""
        g = self.g
        try:
            types[dev] = g.vfs_type(dev) or "unknown"
        except RuntimeError:
            types[dev] = "unknown"
        if types[dev] != "btrfs":
            return
        try:
            default = int(g.btrfs_subvolume_get_default(dev))
            vols = g.btrfs_subvolume_list(dev)
        except RuntimeError:
            return  # the file system itself still mounts, or says why not
        for vol in vols:
            if vol["btrfssubvolume_id"] != default:
                name = f"btrfsvol:{dev}/{vol['btrfssubvolume_path']}"
                types[name] = "btrfs"
                parents[name] = dev if default == BTRFS_TOP_LEVEL else ""

    def _block_device(self, dev: str) -> str:
        """The device that holds ``dev`` (``btrfsvol:/dev/sda1/home``: /dev/sda1)."""
        if not dev.startswith("btrfsvol:"):
            return dev
        return max((d for d in self._fstypes() if not d.startswith("btrfsvol:") and dev.startswith(f"btrfsvol:{d}/")),
                   key=len, default=dev)

    def _is_pv(self, dev: str) -> bool:
        try:
            return bool(self.g.vfs_type(dev) == "LVM2_member")
        except RuntimeError:
            return False

    def _fstypes(self) -> dict[str, str]:
        """Every partition, unpartitioned disk, RAID device and logical volume (those LVM's filter
        shows) with the type of what it holds ("unknown" for nothing recognisable), and the
        subvolumes of each btrfs. As libguestfs' ``list_filesystems`` but for what it leaves out
        (encrypted volumes, physical volumes), and with partitions and disks looked at once, not
        again under each LVM filter (each btrfs is mounted to list its subvolumes)."""
        if self._lvm_disk in self._fstype_cache:
            return self._fstype_cache[self._lvm_disk]
        g = self.g
        if self._plain is None:
            parts = g.list_partitions()
            self._plain = ({}, {})
            for dev in [*parts, *(d for d in g.list_devices() if not any(p.startswith(d) for p in parts)),
                        *g.list_md_devices()]:
                self._look_at(dev, *self._plain)
        found, parents = dict(self._plain[0]), dict(self._plain[1])
        for lv in g.lvs():
            self._look_at(lv, found, parents)
        self._fstype_cache[self._lvm_disk] = found
        self._subvolume_of[self._lvm_disk] = parents
        return found

    def _on_disk(self, dev: str, prefix: str, lvs: set[str]) -> bool:
        """``dev`` lies on the disk ``prefix``: a partition of it, or a logical volume of a
        volume group with a physical volume on it (or a btrfs subvolume of either)."""
        dev = self._block_device(dev)
        if dev.startswith(prefix):
            return True
        if dev in lvs:
            vg = dev.split("/")[2]
            uuids = set(self.g.vgpvuuids(vg))
            return any(pv.startswith(prefix) and self.g.pvuuid(pv) in uuids for pv in self.g.pvs())
        return False

    def _check(self, path: str, want_dir: bool = False) -> str:
        """Where ``path`` of the current view is in the appliance; refused if it does not exist."""
        if self.base is None:
            raise Refused("usage", "nothing is mounted")
        real = self.base + path.rstrip("/")
        if not path.startswith("/") or "/../" in path + "/":
            raise Refused("missing", f"{path}: not an absolute path without '..'")
        try:
            self.g.lstatns(real)  # not exists(): a symbolic link is looked at, not followed
        except RuntimeError:
            raise Refused("missing", f"{path}: no such file or directory") from None
        if want_dir and not self.g.is_dir(real):
            raise Refused("notdir", f"{path}: not a directory")
        return real

    def _stats(self, d: str, names: list[str]) -> list[dict[str, Any]]:
        out = []
        for i in range(0, len(names), STAT_BATCH):
            out.extend(self.g.lstatnslist(d, names[i:i + STAT_BATCH]))
        return out

    def _row(self, st: dict[str, Any]) -> list[Any]:
        """``[type, size, mtime, mode, uid, gid]``: what ``_entry`` shows, as the index records it."""
        return [TYPE_OF_MODE.get(stat.S_IFMT(st["st_mode"]), "?"), st["st_size"], st["st_mtime_sec"],
                stat.S_IMODE(st["st_mode"]), st["st_uid"], st["st_gid"]]

    def _entry(self, name: str, st: dict[str, Any]) -> dict[str, Any]:
        kind = TYPE_OF_MODE.get(stat.S_IFMT(st["st_mode"]), "?")
        entry = {"name": name, "type": kind, "size": st["st_size"], "mode": stat.S_IMODE(st["st_mode"]),
                 "mtime": st["st_mtime_sec"], "uid": st["st_uid"], "gid": st["st_gid"]}
        return entry


def main() -> None:
    """Answer requests until stdin closes."""
    helper = Helper()
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        started = time.monotonic()
        try:
            reply: dict[str, Any] = {"ok": getattr(helper, op)(**req)}
        except Refused as e:
            reply = {"error": str(e), "kind": e.kind}
        except RuntimeError as e:
            reply = {"error": str(e), "kind": "guestfs"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        print(f"lifeboat-helper: {op} {time.monotonic() - started:.2f} s", file=sys.stderr, flush=True)
    if helper.g is not None:
        helper.g.close()


if __name__ == "__main__":
    main()
