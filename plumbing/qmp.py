"""One QMP client for lifeboat: the ``qemu`` target drives its machines with it, the agent captures
running guests with it.

Synchronous, on the ``qemu.qmp`` library's blocking wrapper (``qemu.qmp.legacy``): each user holds
a connection only as long as it needs one, because QEMU's monitor takes one client at a time.
Errors are ``QmpError`` (the connection failed or broke: connect again) and its subclass
``QmpCommandError`` (QEMU refused one command: the connection is still usable); callers that have
typed errors of their own wrap these.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from lifeboat.plumbing.errors import LifeboatError


class QmpError(LifeboatError):
    """The QMP connection could not be made or broke (QEMU gone, socket closed, timeout)."""


class QmpCommandError(QmpError):
    """QEMU refused a command (its error text is in the message); the connection stays usable."""


class QmpClient:
    """A QMP connection to the monitor socket at ``path``.

    ``wait``: keep trying to connect for this many seconds (QEMU may still be creating its socket),
    and give up early once ``alive()`` says the process is gone. ``timeout``: how long one command
    may take."""

    def __init__(self, path: str, *, timeout: float = 10.0, wait: float = 0.0,
                 alive: Callable[[], bool] | None = None) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.path = path
        self._mon: QEMUMonitorProtocol | None = QEMUMonitorProtocol(path)
        deadline = time.monotonic() + wait
        while True:
            try:
                self._mon.connect()
                break
            except Exception as e:  # qemu.qmp raises ConnectError wrapping OSError
                if time.monotonic() >= deadline or (alive is not None and not alive()):
                    self.close()
                    raise QmpError(f"cannot connect to QMP at {path}: {e}") from None
                time.sleep(0.1)
        self._mon.settimeout(timeout)

    def cmd(self, name: str, /, **args: Any) -> Any:
        """Run one QMP command and return its result. A refusal is ``QmpCommandError``; anything
        else (connection lost, timeout) closes this client and is ``QmpError``."""
        from qemu.qmp import ExecuteError

        if self._mon is None:
            raise QmpError(f"QEMU at {self.path}: {name} failed: the QMP connection is closed")
        try:
            return self._mon.cmd(name, **args)
        except ExecuteError as e:
            raise QmpCommandError(f"QEMU at {self.path}: {name} failed: {e}") from None
        except Exception as e:
            self.close()
            raise QmpError(f"QEMU at {self.path}: {name} failed: {e or type(e).__name__}") from None

    def close(self) -> None:
        """Disconnect (idempotent; QEMU may already have closed its end)."""
        mon, self._mon = self._mon, None
        if mon is not None:
            with contextlib.suppress(Exception):
                mon.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
