"""Assembling an export from an archive point, and running the server until told to stop."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.local import LocalBackend
from lifeboat.nbdserver.hydrate import HydrateVolume, ProgressCallback
from lifeboat.nbdserver.overlay import CowVolume
from lifeboat.nbdserver.server import CLIENT_MEMORY, SERVER_MEMORY, Export, NBDServer, _default_log
from lifeboat.nbdserver.volume import PointVolume, Volume
from lifeboat.plumbing.errors import LifeboatError, UsageError

OVERLAY_DIR = "overlays"


def identity(arc: Archive, info: PointInfo) -> dict[str, Any]:
    """What an overlay or hydration state must match: archive, machine, point, size."""
    return {"archive": arc.config.get("id"), "machine": info.machine, "point": info.point, "size": info.size}


def default_overlay(arc: Archive, info: PointInfo) -> Path | None:
    """``<archive>/overlays/<machine>-<point>.cow`` for a local archive, else None."""
    backend = arc.backend
    while not isinstance(backend, LocalBackend) and hasattr(backend, "inner"):
        backend = backend.inner
    if isinstance(backend, LocalBackend):
        return backend.root / OVERLAY_DIR / f"{info.machine}-{info.point}.cow"
    return None


def open_volume(arc: Archive, info: PointInfo, *, writable: bool = False, overlay: str | Path | None = None,
                hydrate_to: str | Path | None = None, progress: ProgressCallback | None = None,
                log: Callable[[str], None] = _default_log) -> Volume:
    """The volume ``lifeboat serve`` exports for a point.

    - read-only: the point itself;
    - ``writable``: a copy-on-write overlay over the point (``overlay`` or the default path);
    - ``hydrate_to``: a local copy completed in the background (writes land there when
      ``writable``); an existing overlay of the point is its base, so earlier writes carry over.
    """
    when = info.time
    base: Volume = PointVolume(arc.reader(info), f"lifeboat {info.machine}@{info.point} ({when})")
    ident = identity(arc, info)
    ov = Path(overlay) if overlay else default_overlay(arc, info)
    try:
        if hydrate_to is not None:
            if ov is not None and ov.exists():
                log(f"hydration starts from the point plus the writes in overlay {ov}")
                base = CowVolume(base, ov, ident)
            vol = HydrateVolume(base, hydrate_to, ident, chunk_size=info.chunk_size, writable=writable,
                                progress=progress, log=log)
            vol.start()
            return vol
        if writable:
            if ov is None:
                raise UsageError("--writable with a remote archive needs --overlay PATH (a local file for the writes)")
            return CowVolume(base, ov, ident)
    except BaseException:
        base.close()
        raise
    return base


async def serve_until_signal(exports: list[Export], host: str, port: int, *, tls: ssl.SSLContext | None = None,
                             on_listening: Callable[[str, int], None] | None = None,
                             log: Callable[[str], None] = _default_log,
                             stop: asyncio.Event | None = None, memory: int = SERVER_MEMORY,
                             client_memory: int = CLIENT_MEMORY) -> None:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set); then finish in-flight requests and
    close every volume, flushing overlays and hydration progress. ``memory`` and
    ``client_memory`` bound the request and reply data held (``server`` module docstring)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = NBDServer(exports, tls=tls, log=log, memory=memory, client_memory=client_memory)
    try:
        try:
            bound_host, bound_port = await server.start(host, port)
        except OSError as e:
            raise LifeboatError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        if on_listening:
            on_listening(bound_host, bound_port)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.close()
        for export in exports:
            await loop.run_in_executor(None, export.volume.close)
