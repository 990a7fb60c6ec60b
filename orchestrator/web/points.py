"""What the pane does with one point: export it as a download, serve it over NBD.

- **Export.** A raw image streams straight from the archive (the point's bytes in order, no file
  in between). The other formats are written with positional writes (their tables come before
  the data they describe), so the image is made by the same exporter as ``lifeboat export`` in a
  scratch folder of the state folder, streamed, and removed once sent or abandoned.
- **Serve.** ``lifeboat serve MACHINE@POINT`` as a child process on a free loopback port,
  read-only; its first line is the ``nbd://`` URL the page shows. The pane stops it on request and
  when the pane itself stops.
"""

from __future__ import annotations

import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from starlette.background import BackgroundTask
from starlette.responses import FileResponse, Response, StreamingResponse

from lifeboat.archive import Archive, PointInfo
from lifeboat.exporters import EXPORTERS
from lifeboat.plumbing.errors import LifeboatError

SUFFIXES = {"raw": "img", "qcow2": "qcow2", "vmdk": "vmdk", "vmdk-stream": "vmdk", "vhdx": "vhdx"}
STREAM_PIECE = 4 * 1024 * 1024  # bytes read from the archive per piece of a raw download
SERVE_START_SECONDS = 60  # how long a started `lifeboat serve` may take to print its URL
SERVE_STOP_SECONDS = 10


class PointActionError(LifeboatError):
    """A point action that cannot be done as asked (a format too small for the point, a serve that
    did not start): the page says why."""


def export_formats() -> list[str]:
    """The formats a download may take: every registered exporter."""
    return EXPORTERS.names()


def download_name(info: PointInfo, fmt: str) -> str:
    """``web01-3f2a…-20261130T0102Z.qcow2``: machine, point and time in the file name."""
    when = info.when.strftime("%Y%m%dT%H%MZ")
    return f"{info.machine}-{info.point}-{when}.{SUFFIXES.get(fmt, fmt)}"


def export_response(archive: Archive, info: PointInfo, fmt: str, scratch: Path) -> Response:
    """The download of ``info`` as a ``fmt`` image (see the module's docstring). Blocking: call it
    from a worker thread."""
    exporter = EXPORTERS.get(fmt)()
    exporter.check_size(info.size)
    name = download_name(info, fmt)
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    reader = archive.reader(info)
    if fmt == "raw":
        def pieces() -> Iterator[bytes]:
            for offset in range(0, info.size, STREAM_PIECE):
                yield reader.read(offset, min(STREAM_PIECE, info.size - offset))

        headers["Content-Length"] = str(info.size)
        return StreamingResponse(pieces(), media_type="application/octet-stream", headers=headers)
    scratch.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=scratch, prefix="export-"))
    try:
        exporter.write(reader, folder / name)  # the name goes into formats that record it (VMDK)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return FileResponse(folder / name, media_type="application/octet-stream", filename=name,
                        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True))


@dataclass
class Serving:
    """A point served by a ``lifeboat serve`` child of the pane."""

    machine: str
    point: str
    url: str
    started: float
    child: subprocess.Popen[bytes]


class Serves:
    """The NBD exports this pane started, by ``MACHINE@POINT``."""

    def __init__(self, archive_args: list[str], logs: Path) -> None:
        self.archive_args = archive_args  # --archive/--key-file as the pane was given them
        self.logs = logs
        self._lock = threading.Lock()
        self._starting = threading.Lock()
        self._serving: dict[str, Serving] = {}

    def current(self) -> dict[str, Serving]:
        """The exports still running (one whose child ended is forgotten)."""
        with self._lock:
            for key, s in list(self._serving.items()):
                if s.child.poll() is not None:
                    del self._serving[key]
            return dict(self._serving)

    def start(self, info: PointInfo) -> Serving:
        """Serve ``info`` read-only on a free loopback port (or return its running export)."""
        with self._starting:  # two clicks on Serve start one child
            return self._start(info)

    def _start(self, info: PointInfo) -> Serving:
        key = f"{info.machine}@{info.point}"
        running = self.current().get(key)
        if running is not None:
            return running
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"serve-{info.machine}-{info.point}.log"
        cmd = [sys.executable, "-m", "lifeboat", "serve", key, "--listen", "127.0.0.1:0",
               "--name", f"{info.machine}-{info.point}", *self.archive_args]
        with log_path.open("wb") as err:
            child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert child.stdout is not None
        deadline = time.monotonic() + SERVE_START_SECONDS
        line = b""
        while time.monotonic() < deadline and child.poll() is None:
            ready, _, _ = select.select([child.stdout], [], [], 0.2)
            if ready:
                line = child.stdout.readline()
                break
        url = line.decode(errors="replace").strip()
        if not url.startswith("nbd://"):
            stop_child(child)
            tail = log_path.read_text(errors="replace")[-1500:]
            raise PointActionError(f"lifeboat serve {key} did not start: {tail or 'no output'}")
        serving = Serving(info.machine, info.point, url, time.time(), child)
        with self._lock:
            self._serving[key] = serving
        return serving

    def stop(self, machine: str, point: str) -> bool:
        """Stop the export of ``MACHINE@POINT``; whether there was one."""
        with self._lock:
            serving = self._serving.pop(f"{machine}@{point}", None)
        if serving is None:
            return False
        stop_child(serving.child)
        return True

    def stop_all(self) -> None:
        """Stop every export (the pane is stopping)."""
        with self._lock:
            every, self._serving = list(self._serving.values()), {}
        for s in every:
            stop_child(s.child)


def stop_child(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM (``lifeboat serve`` closes its clients and exits), then SIGKILL if it lingers."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(SERVE_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if child.stdout is not None:
        child.stdout.close()
