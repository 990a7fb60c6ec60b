"""The shape of protect's background work (replication, indexing): a thread of its own, woken after
each capture, so that the work never delays a capture and its failures never fail one.

``Worker`` runs its ``work()`` when woken; requests made while it runs coalesce into one more run.
A failure is counted and logged, and the work is tried again after a back-off (1 s doubling up to
``max_backoff``, reset by a success). ``close()`` lets the run in progress and a pending one
finish, then stops the thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Worker:
    """A background thread running ``work()`` on request (subclasses define ``work``)."""

    what = "background work"  # named in the log of a failure

    def __init__(self, name: str, *, max_backoff: float = 300.0, log: Callable[[str], None] = lambda _m: None) -> None:
        self.max_backoff = max_backoff
        self.log = log
        self.lock = threading.Lock()
        self.failures = 0
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)

    def start(self) -> None:
        """Start the thread (a subclass starts it once its own state is set)."""
        self._thread.start()

    def request(self) -> None:
        """Run soon (after a capture): at most one run is pending."""
        self._wake.set()

    @property
    def closing(self) -> bool:
        """``close()`` was called: the pending run is the last."""
        return self._closing.is_set()

    def work(self) -> None:
        """One run; an exception counts as a failure and is retried after the back-off."""
        raise NotImplementedError

    def _loop(self) -> None:
        backoff = 1.0
        while True:
            if not self._wake.wait(0.5):
                if self._closing.is_set():
                    return  # nothing is pending
                continue
            self._wake.clear()
            try:
                self.work()
            except Exception as e:  # keep protecting: report, back off, try again
                with self.lock:
                    self.failures += 1
                    self.last_error = f"{type(e).__name__}: {e}"
                if self._closing.is_set():
                    self.log(f"{self.what} failed ({e}); stopping")
                    continue
                self.log(f"{self.what} failed ({e}); retrying in {backoff:.0f} s")
                if not self._closing.wait(backoff):
                    self._wake.set()
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 1.0

    def close(self) -> None:
        """Finish the run in progress and the pending one (the one after the last capture), then stop."""
        self._closing.set()
        self._thread.join()
