"""The NBD server of a recovery: ``lifeboat serve`` run as a child process, behind a small interface.

The child serves one export (the machine's point, copy-on-write, hydrating to a local disk); this
module starts, adopts, watches and stops that process (``NbdServerProcess``).

The engine depends only on the CLI contract of ``lifeboat serve`` (``shared/CLI.md``): it starts
``lifeboat serve MACHINE@POINT --listen 127.0.0.1:0 --writable --hydrate-to PATH``, and reads the
``nbd://HOST:PORT/EXPORT`` line it prints. Its standard output and error go to files, not pipes,
so the server outlives a killed orchestrator without dying of SIGPIPE, and a resumed run finds the
URL again and adopts the server. The export name carries the run's token, which is how teardown
recognises the process as ours.

Hydration progress is read with ``nbdserver.hydrate.hydration_progress`` from the state file
that the server keeps beside PATH.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lifeboat.nbdserver.hydrate import hydration_progress
from lifeboat.orchestrator.console import SELF_COMMAND
from lifeboat.plumbing.nbd import NbdUrl
from lifeboat.plumbing.proc import log_tail, process_matches, stop_process
from lifeboat.targets.base import ResourceLog, TargetError


@dataclass
class NbdServerProcess:
    """A running ``lifeboat serve`` child: the URL of its export, its pid, and where it hydrates to."""

    url: str
    pid: int
    token: str
    hydrate_to: Path

    def hydration(self) -> tuple[int, int]:
        """(chunks copied, chunks in all) from the hydration state file; (0, 1) until it exists."""
        return hydration_progress(self.hydrate_to)

    def hydrated(self) -> bool:
        """Every chunk of the point (plus the guest's writes) is in ``hydrate_to``."""
        done, total = self.hydration()
        return done >= total

    def alive(self) -> bool:
        """The server process is still running."""
        return process_matches(self.pid, self.token)


def serve_command(
    selector: str, *, archive: str | None, key_file: str | None, name: str, hydrate_to: Path, overlay: Path
) -> list[str]:
    """The ``lifeboat serve`` command line that serves one machine's point."""
    cmd = [
        *SELF_COMMAND,
        "serve",
        selector,
        "--listen",
        "127.0.0.1:0",
        "--name",
        name,
        "--writable",
        "--hydrate-to",
        str(hydrate_to),
        "--overlay",
        str(overlay),
    ]
    if archive:
        cmd += ["--archive", archive]
    if key_file:
        cmd += ["--key-file", key_file]
    return cmd


def start_server(
    selector: str,
    *,
    archive: str | None,
    key_file: str | None,
    token: str,
    workdir: Path,
    hydrate_to: Path,
    log: ResourceLog,
    timeout: float = 120.0,
) -> NbdServerProcess:
    """Start (or adopt, after a crash) the server of ``selector``'s export; the process and its
    files are recorded in ``log`` before they exist."""
    out, err = workdir / "serve.out", workdir / "serve.log"
    overlay = workdir / "unused-overlay.cow"  # never another run's overlay: writes go to hydrate_to
    res = log.record("process", token, {"token": token, "hydrate_to": str(hydrate_to), "stdout": str(out)})
    pid = res.data.get("pid")
    if pid and process_matches(int(pid), token):
        url = _read_url(out)
        if url:
            return NbdServerProcess(url, int(pid), token, hydrate_to)
        stop_process(int(pid), token)
    for path in (out, err, hydrate_to, Path(f"{hydrate_to}.hydrate"), overlay):
        log.record("file", str(path), {})
    out.unlink(missing_ok=True)
    cmd = serve_command(
        selector, archive=archive, key_file=key_file, name=token, hydrate_to=hydrate_to, overlay=overlay
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(out, "wb") as fo, open(err, "ab") as fe:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, start_new_session=True, env=env)
    log.update(res, {"pid": proc.pid, "command": cmd})
    deadline = time.monotonic() + timeout
    while True:
        url = _read_url(out)
        if url:
            return NbdServerProcess(url, proc.pid, token, hydrate_to)
        if proc.poll() is not None:
            raise TargetError(f"lifeboat serve exited with status {proc.returncode}: {log_tail(err)}")
        if time.monotonic() > deadline:
            stop_process(proc.pid, token)
            raise TargetError(f"lifeboat serve printed no nbd:// URL in {timeout:.0f} s: {log_tail(err)}")
        time.sleep(0.05)


def find_server(log: ResourceLog, token: str) -> NbdServerProcess | None:
    """The running server recorded in ``log``, if its process is still alive."""
    for res in log.resources():
        if res.kind == "process" and res.ident == token and res.data.get("pid"):
            url = _read_url(Path(res.data["stdout"]))
            if url and process_matches(int(res.data["pid"]), token):
                return NbdServerProcess(url, int(res.data["pid"]), token, Path(res.data["hydrate_to"]))
    return None


def stop_server(log: ResourceLog, token: str) -> None:
    """Stop the server (its files stay: the hydrated disk may now be the machine's)."""
    for res in log.resources():
        if res.kind == "process" and res.ident == token:
            if res.data.get("pid"):
                stop_process(int(res.data["pid"]), token)
            log.forget(res)


def _read_url(path: Path) -> str | None:
    """The URL ``lifeboat serve`` printed into ``path``; only a whole line counts, since the file
    may be read while the server writes it."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines(keepends=True):
        if line.startswith("nbd://") and line.endswith("\n"):
            return str(NbdUrl.parse(line))
    return None
