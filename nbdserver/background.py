"""An NBD server on a thread of the calling process, for callers that read a point themselves.

File-level restore serves a point read-only to libguestfs for the length of one command: a child
``lifeboat serve`` would cost an interpreter start and a port handshake for nothing. The server
runs its own event loop on a daemon thread; leaving the ``with`` block stops it and closes the
exports' volumes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType

from lifeboat.nbdserver.server import Export, NBDServer, _default_log


class BackgroundServer:
    """``with BackgroundServer(exports) as srv:`` serves ``exports`` on ``srv.host``:``srv.port``."""

    def __init__(self, exports: list[Export], host: str = "127.0.0.1", port: int = 0,
                 log: Callable[[str], None] = _default_log) -> None:
        self.exports = exports
        self.host = host
        self.port = port
        self.log = log
        self._loop = asyncio.new_event_loop()
        self._server: NBDServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="nbd-background", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        try:
            self.host, self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        except BaseException:
            self._stop()
            raise
        return self

    async def _start(self) -> tuple[str, int]:
        self._server = NBDServer(self.exports, log=self.log)
        return await self._server.start(self.host, self.port)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        for export in self.exports:
            export.volume.close()
