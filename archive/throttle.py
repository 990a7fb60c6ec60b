"""A Backend wrapper that limits read bandwidth, for benchmarks and tests.

Recovery from an off-site archive is bounded by the link to it; ``ThrottledBackend`` makes a
local archive behave like one behind a link of ``rate`` bytes per second (plus an optional
per-request latency), so that demand-first hydration can be measured and tested on one machine.
Transfers share the link first come, first served: each read reserves its slot under a lock
and sleeps until its bytes would have arrived, so concurrent readers split the bandwidth.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from lifeboat.archive.backend import Backend


class ThrottledBackend(Backend):
    """``inner`` with reads limited to ``rate`` bytes/s (writes are not throttled)."""

    def __init__(self, inner: Backend, rate: float, latency: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.inner = inner
        self.rate = float(rate)
        self.latency = latency
        self.location = inner.location
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._free_at = 0.0

    def _transfer(self, nbytes: int) -> None:
        """Sleep as long as ``nbytes`` take on the shared link."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + nbytes / self.rate
            self.bytes_read += nbytes
            done = self._free_at + self.latency
        delay = done - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        self._transfer(len(data))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = self.inner.get_range(key, offset, length)
        self._transfer(len(data))
        return data

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def lock(self, exclusive: bool, wait: bool = True) -> contextlib.AbstractContextManager[None]:
        return self.inner.lock(exclusive, wait)

    def cleanup_incomplete(self) -> int:
        return self.inner.cleanup_incomplete()

    def close(self) -> None:
        self.inner.close()
