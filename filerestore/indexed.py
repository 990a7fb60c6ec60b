"""Directory listings answered from a point's file index, without booting an appliance.

The appliance costs 20 s or more before its first answer; the index (``archive.fileindex``) holds
every file's name, type, size, mtime, mode and owner, so ``files ls`` and the web pane's browser
read a directory from it in well under a second when the point is indexed. The listing is the one
``PointFiles.ls`` gives, with the same view: ``--fs DEVICE`` alone at ``/``; else the file systems
at the mountpoints the disk's operating system gives them (a mountpoint shows as the mounted file
system's top folder, as a mount does); else the disk's one file system.

``disk`` gives what ``files fs`` says of the disk (the pane's browser shows it) from the index.
``ls`` returns None when the index cannot answer and the disk must be read: no index, a ``--fs``
device it does not hold (an encrypted or unreadable volume: the appliance then says why), several
file systems and no operating system (the appliance asks for ``--fs``), or a missing path below a
symbolic link (the appliance resolves relative links in the middle of a path; the index does not).
Indexes written before modes were recorded answer with mode, uid and gid None.
"""

from __future__ import annotations

from typing import Any

from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.fileindex import FileRecord, load_fs, load_records, read_manifest
from lifeboat.filerestore import session
from lifeboat.filerestore.session import PathMissing


def disk(arc: Archive, info: PointInfo) -> dict[str, Any] | None:
    """What ``PointFiles.fs`` says of the point's disk, as recorded with its index (None when the
    point has no index, or one written before this was recorded)."""
    doc = read_manifest(arc, info.machine, info.point)
    found: dict[str, Any] | None = None if doc is None else doc.get("disk")
    return found


def _view(doc: dict[str, Any], device: str | None) -> list[tuple[str, dict[str, Any]]] | None:
    """``[(mountpoint, file system document)]``, shortest mountpoint first, as ``PointFiles.view``
    chooses them (from the manifest's ``disk``; an index written before it was recorded: from each
    file system's ``mountpoint``); None when the index cannot tell."""
    found = {fs["device"]: fs for fs in doc["filesystems"]}
    if device is not None:
        return [("/", found[device])] if device in found else None
    disk = doc.get("disk")
    if disk is None:
        mounts = sorted(([fs["mountpoint"], d] for d, fs in found.items() if fs["mountpoint"]), key=lambda m: len(m[0]))
        readable = list(found) if not mounts else []
    else:  # a file system of the system that the index lacks did not mount: the appliance leaves it out too
        mounts = disk["os"][0]["mountpoints"] if disk["os"] else []
        readable = [f["device"] for f in session.readable(disk["filesystems"])]
    if mounts:
        view = [(m, found[d]) for m, d in mounts if d in found]
        return view if view and view[0][0] == "/" else None
    return [("/", found[readable[0]])] if len(readable) == 1 and readable[0] in found else None


def _under(path: str, mountpoint: str) -> str | None:
    """``path`` within a file system mounted at ``mountpoint`` (None when it is not below it)."""
    top = mountpoint.rstrip("/")
    if path == top or path == "/" and not top:
        return "/"
    return path[len(top):] if path.startswith(top + "/") else None


def ls(arc: Archive, info: PointInfo, path: str = "/", device: str | None = None) -> list[dict[str, Any]] | None:
    """The entries of directory ``path`` as ``PointFiles.ls`` gives them (sorted by name), from the
    index; None when the point must be read instead (see the module's docstring)."""
    doc = read_manifest(arc, info.machine, info.point)
    if doc is None:
        return None
    view = _view(doc, device)
    if view is None:
        return None
    if not path.startswith("/") or "/../" in path + "/":
        raise PathMissing(f"{path}: not an absolute path without '..'")
    path = path.rstrip("/") or "/"
    mountpoint, fs_doc = max(((m, f) for m, f in view if _under(path, m) is not None), key=lambda v: len(v[0]))
    inner = _under(path, mountpoint)
    assert inner is not None
    prefix = inner.rstrip("/") + "/"
    # the folder and every path below it sort in [inner, prefix with its "/" raised to "0")
    records = load_records(arc, fs_doc, inner, prefix[:-1] + "0")
    by_path = {r.path: r for r in records}
    if inner != "/":
        found = by_path.get(inner)
        if found is None:
            by_path = {r.path: r for r in load_fs(arc, fs_doc).records}  # the folders above it: anywhere
            parts = inner.split("/")
            above = (by_path.get("/".join(parts[:n])) for n in range(2, len(parts)))
            if any(r is not None and r.type == "l" for r in above):
                return None
            raise PathMissing(f"{path}: no such file or directory")
        if found.type != "d":
            raise PathMissing(f"{path}: not a directory")
    entries = {r.path[len(prefix):]: r for r in records
               if r.path.startswith(prefix) and "/" not in r.path[len(prefix):]}
    for m, other in view:  # a file system mounted on a folder of this one shows its own top folder
        top = m.rstrip("/")
        if top and top.rpartition("/")[0] == path.rstrip("/") and "root" in other:
            name = top.rpartition("/")[2]
            if name in entries and entries[name].type == "d":  # else the mount fails in the appliance
                entries[name] = FileRecord(top, *other["root"])
    return [entries[name].entry(name) for name in sorted(entries)]
