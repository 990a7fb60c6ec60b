"""``lifeboat files fs|ls|get|find|index`` and ``lifeboat mount``: single-item restore from any point,
and the file index.

Each command but ``find`` boots one libguestfs appliance (20 s or more) that reads the point over
NBD from a read-only server in this process (``filerestore``); ``find`` reads the file index only,
and so do ``ls`` and ``fs`` of an indexed point (unless ``--read-disk``).
"""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import click

from lifeboat.orchestrator import api
from lifeboat.orchestrator.cli import cli, command, emit_json, json_option, open_archive
from lifeboat.orchestrator.console import log


@cli.group(name="files")
def files_group() -> None:
    """Browse, copy out and find the files of any point without restoring its disk."""


fs_option = click.option("--fs", "device", metavar="DEVICE",
                         help="Paths within this one file system (see 'lifeboat files fs'), "
                              "not as the point's operating system mounts them.")


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


read_disk_option = click.option("--read-disk", is_flag=True,
                                help="Read the point's disk (boots the appliance: 20 s or more) even when its "
                                     "file index could answer.")


@command(files_group, name="fs")
@click.argument("selector", metavar="MACHINE[@WHEN]")
@read_disk_option
@json_option
def fs_cmd(selector: str, read_disk: bool, as_json: bool) -> None:
    """List the partitions, LVM volumes and file systems of a point's disk: from the point's file
    index when it recorded them (in a second), else from its disk (boots the appliance)."""
    found, from_index = api.files_fs(open_archive(), selector, read_disk=read_disk)
    if from_index:
        log("(from the point's file index; --read-disk reads its disk)")
    if as_json:
        emit_json(found)
        return
    for f in found["filesystems"]:
        notes = " encrypted" if f["encrypted"] else (" lvm" if f["lvm"] else "")
        click.echo(f"{f['device']}  {f['fstype']}  size={f['size']}  label={f['label'] or '-'}  "
                   f"uuid={f['uuid'] or '-'}{notes}")
    for o in found["os"]:
        mounts = ", ".join(f"{m}={d}" for m, d in o["mountpoints"])
        click.echo(f"os {o['root']}: {o['product'] or o['distro']} ({o['type']}); mounts {mounts}")


@command(files_group, name="ls")
@click.argument("selector", metavar="MACHINE[@WHEN]")
@click.argument("path", default="/")
@fs_option
@read_disk_option
@json_option
def ls_cmd(selector: str, path: str, device: str | None, read_disk: bool, as_json: bool) -> None:
    """List a directory of a point (name, type, size, mode, mtime): from the point's file index
    when it has one (in a second), else from its disk (boots the appliance)."""
    entries, from_index = api.files_ls(open_archive(), selector, path, device, read_disk=read_disk)
    if as_json:
        emit_json(entries)
        return
    for e in entries:
        mode = "?????????" if e["mode"] is None else stat.filemode(e["mode"])[1:]
        click.echo(f"{e['type']} {mode} {e['size']:>12} {_when(e['mtime'])}  {e['name']}")
    if from_index:
        log("(from the point's file index; --read-disk reads its disk)")


@command(files_group, name="get")
@click.argument("selector", metavar="MACHINE[@WHEN]")
@click.argument("path")
@click.argument("dest", type=click.Path(path_type=Path))
@fs_option
@json_option
def get_cmd(selector: str, path: str, dest: Path, device: str | None, as_json: bool) -> None:
    """Copy one file or a directory tree of a point out to DEST (which must not exist)."""
    entry = api.files_get(open_archive(), selector, path, dest, device)
    if as_json:
        emit_json({"path": path, "dest": str(dest), **entry})
    else:
        log(f"copied {path} to {dest}")


@command(files_group, name="find")
@click.argument("machine")
@click.argument("pattern")
@json_option
def find_cmd(machine: str, pattern: str, as_json: bool) -> None:
    """Every point of MACHINE holding a path that matches PATTERN (shell-style; with a '/' it
    matches whole paths, else file names), from the file index alone."""
    matches, unindexed = api.files_find(open_archive(), machine, pattern)
    if as_json:
        emit_json({"matches": [m.to_json() for m in matches],
                   "unindexed": [p.point for p in unindexed]})
        return
    for m in matches:
        r = m.record
        click.echo(f"{m.point.point}  {m.point.time}  {m.device}  {_shown(m.mountpoint, r.path)}  "
                   f"{r.type} size={r.size} mtime={_when(r.mtime)}")
    if unindexed:
        log(f"{len(unindexed)} points have no file index (lifeboat files index {machine})")


def _shown(mountpoint: str, path: str) -> str:
    """A path as the guest sees it when its file system has a mountpoint."""
    if not mountpoint or mountpoint == "/":
        return path
    return mountpoint.rstrip("/") + path


@command(files_group, name="index")
@click.argument("selectors", metavar="MACHINE[@WHEN]...", nargs=-1, required=True)
@json_option
def index_cmd(selectors: tuple[str, ...], as_json: bool) -> None:
    """Record the file lists of points in the archive: MACHINE@WHEN that point, MACHINE alone every
    point of it without one (all in one appliance)."""
    done: list[dict[str, Any]] = api.files_index(open_archive(), list(selectors), log=log)
    if as_json:
        emit_json(done)
    elif not done:
        log("every point already has a file index")


@command(name="mount")
@click.argument("selector", metavar="MACHINE[@WHEN]")
@click.argument("directory", type=click.Path(path_type=Path))
@fs_option
def mount_cmd(selector: str, directory: Path, device: str | None) -> None:
    """Show a point's file systems read-only on DIR (FUSE) until it is unmounted
    (guestunmount DIR, or Ctrl-C here)."""
    def ready() -> None:
        log(f"mounted {selector} read-only on {directory}; unmount with: guestunmount {directory}")

    api.mount(open_archive(), selector, directory, device, on_ready=ready)
    log(f"unmounted {directory}")
