"""``lifeboat mount``: a point's file systems as a read-only FUSE view, until unmounted.

``guestmount`` (libguestfs' FUSE front-end, its own appliance) reads the point over NBD from
lifeboat's read-only server (the caller serves it) with ``--no-fork --fd``: it stays a child of
lifeboat, says through the pipe when the view is ready, and exits when the view is unmounted
(``guestunmount DIR`` or ``fusermount -u DIR``); SIGINT/SIGTERM to lifeboat unmounts it too.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from lifeboat.filerestore.session import GUESTFS_ENV, FileRestoreError
from lifeboat.plumbing.errors import UsageError


class MountError(FileRestoreError):
    """guestmount could not present the point (no operating system found, a bad --fs, ...)."""


def check_mountpoint(directory: Path) -> None:
    """DIR must be an empty directory that nothing is mounted on."""
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    if os.path.ismount(directory) or any(directory.iterdir()):
        raise UsageError(f"{directory}: not an empty directory (or already a mount point)")


def mount_command(nbd_url: str, directory: Path, device: str | None, ready_fd: int) -> list[str]:
    """The guestmount command line: the operating system's mounts (``-i``), or one file system."""
    where = ["-m", device] if device else ["-i"]
    return ["guestmount", "--ro", "--format=raw", "-a", nbd_url, *where, "--no-fork", f"--fd={ready_fd}",
            str(directory)]


def mount_until_unmounted(nbd_url: str, directory: Path, device: str | None,
                          on_ready: Callable[[], None], timeout: float = 600.0) -> None:
    """Run guestmount on ``directory`` until the view is unmounted; ``on_ready`` once it is usable."""
    check_mountpoint(directory)
    rfd, wfd = os.pipe()
    errors = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe no one reads while it runs
    try:
        proc = subprocess.Popen(mount_command(nbd_url, directory, device, wfd), pass_fds=(wfd,),
                                env={**os.environ, **GUESTFS_ENV}, stderr=errors)
    finally:
        os.close(wfd)

    def unmount(signum: int, frame: FrameType | None) -> None:
        subprocess.run(["guestunmount", "--quiet", str(directory)], check=False)

    old = {s: signal.signal(s, unmount) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + timeout
        ready = False
        while not ready and proc.poll() is None and time.monotonic() < deadline:
            ready = bool(select.select([rfd], [], [], 0.5)[0]) and os.read(rfd, 1) != b""
        if ready:
            on_ready()
        elif proc.poll() is None:
            proc.kill()
        proc.wait()
        errors.seek(0)
        err = errors.read()
        if not ready or proc.returncode != 0:
            raise MountError(f"guestmount could not mount the point on {directory}: "
                             f"{err.strip()[-1500:] or f'exit status {proc.returncode}'}"
                             + ("" if device else " (no operating system found? choose a file system with --fs; "
                                                  "see 'lifeboat files fs')"))
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(rfd)
        errors.close()
