"""The pane's file browser (single-item restore): one libguestfs appliance per pane.

The appliance boots in 20 s or more, so the pane starts it on the first file request, not at
start-up, and keeps it for the requests that follow: it holds one point's disk (drives are fixed
when an appliance boots), and a request for another point shuts it down and boots one for that
point. Requests take turns on it (its helper answers one request at a time). A download is copied
out of the point into a scratch folder of the state folder by ``PointFiles.get``, streamed, and
removed once sent or abandoned.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from starlette.background import BackgroundTask
from starlette.responses import FileResponse

from lifeboat.archive import Archive, PointInfo
from lifeboat.filerestore import EncryptedVolume, FileRestoreError, NoFileSystem, PointFiles
from lifeboat.orchestrator import api
from lifeboat.plumbing.errors import LifeboatError, UsageError


class NotAFile(UsageError):
    """A download names a directory, a link or a device: only regular files download."""


def error_status(e: LifeboatError) -> int:
    """The HTTP status of a file request's refusal: 400 for a wrong request (no such path or file
    system), 422 for a file system lifeboat does not open (encrypted, unrecognised), 500 else."""
    if isinstance(e, UsageError):
        return 400
    return 422 if isinstance(e, EncryptedVolume | NoFileSystem) else 500


class Appliance:
    """The pane's one appliance, booted lazily for the point asked for and reused while that point
    is browsed."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self._lock = threading.Lock()
        self._key: str | None = None
        self._stack: ExitStack | None = None
        self._files: PointFiles | None = None

    @contextmanager
    def disk(self, info: PointInfo) -> Iterator[PointFiles]:
        """``info``'s files, for this caller alone until the block ends. Blocking (the first use of a
        point boots the appliance): call it from a worker thread."""
        with self._lock:
            key = f"{info.machine}@{info.point}"
            if self._key != key or self._files is None:
                self._close()
                stack = ExitStack()
                try:
                    (self._files,) = stack.enter_context(api.point_files(self.archive, [info]))
                except BaseException:
                    stack.close()
                    raise
                self._stack, self._key = stack, key
            try:
                yield self._files
            except FileRestoreError as e:
                if type(e) is FileRestoreError:  # the helper itself failed: boot a new one next time
                    self._close()
                raise

    def _close(self) -> None:
        stack, self._stack, self._files, self._key = self._stack, None, None, None
        if stack is not None:
            stack.close()

    def close(self) -> None:
        """Shut the appliance down (the pane is stopping)."""
        with self._lock:
            self._close()


def file_download(files: PointFiles, path: str, device: str | None, scratch: Path) -> FileResponse:
    """One regular file of the point as a download named as in the point; its copy in ``scratch``
    is removed once sent."""
    entry = files.stat(path, device)
    if entry["type"] != "f":
        raise NotAFile(f"{path} is not a regular file: only files download")
    name = path.rstrip("/").rsplit("/", 1)[-1]
    scratch.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=scratch, prefix="file-"))
    try:
        files.get(path, folder / name, device)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return FileResponse(folder / name, media_type="application/octet-stream", filename=name,
                        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True))
