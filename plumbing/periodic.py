"""Work repeated in the background while a block runs: lease renewals of the archive's locks
(``archive/s3.py``, ``archive/remote.py``), which must keep going while the holder is busy."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def repeating(interval: float, action: Callable[[], None], name: str) -> Iterator[None]:
    """Call ``action`` every ``interval`` seconds in a daemon thread until the block ends; the
    thread is joined on the way out, so no call outlives the block. ``action`` handles its own
    errors (a renewal that fails is simply tried again at the next turn)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            action()

    worker = threading.Thread(target=loop, daemon=True, name=name)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
