"""A fault-injecting HTTP proxy in front of an S3 server, for the fault tests.

Each request is forwarded to the upstream server as received (the Host header is kept, so the
client's signature still holds), unless the schedule picks a fault for it:

- ``drop``: the connection is closed before the request is forwarded (no answer);
- ``drop-after``: the request is forwarded (it takes effect upstream) and the connection is
  closed before the answer (the client cannot know it landed);
- ``500``, ``503``: an S3 error answer (``InternalError``, ``ServiceUnavailable``), not forwarded;
- ``slowdown``: 503 ``SlowDown``, S3's throttling answer;
- ``slow``: forwarded after ``delay`` seconds.

With ``rate`` (bytes/s), answers share a link of that speed, first come first served (the
bench's slow off-site link).

The schedule: every ``every``-th request (counted across all connections; only those ``when``
accepts, given method and path) gets the next fault of ``faults`` in turn, so a test sees each
kind and no request fails on every try; at most ``limit`` faults in all. ``counts`` says how many
of each were injected.
"""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("drop", "drop-after", "500", "503", "slowdown", "slow")
_ERRORS = {"500": (500, "InternalError"), "503": (503, "ServiceUnavailable"), "slowdown": (503, "SlowDown")}
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "expect"}


class FaultProxy:
    """Listens on a free loopback port; ``endpoint`` is its URL. ``every=0`` injects nothing."""

    def __init__(self, upstream: str, faults: tuple[str, ...] = FAULTS, every: int = 5,
                 delay: float = 0.5, rate: float | None = None,
                 when: Callable[[str, str], bool] | None = None, limit: int | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults = faults
        self.every = every
        self.delay = delay
        self.rate = rate
        self.when = when  # (method, path) -> whether the request counts for the schedule
        self.limit = limit  # faults injected at most
        self._free_at = 0.0
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self._turn = itertools.cycle(faults)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815 - the base's names

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="faultproxy")
        self._thread.start()

    def _pick(self, method: str, path: str) -> str | None:
        if self.when is not None and not self.when(method, path):
            return None
        with self._lock:
            self.requests += 1
            if not self.every or self.requests % self.every:
                return None
            if self.limit is not None and sum(self.counts.values()) >= self.limit:
                return None
            fault = next(self._turn)
            self.counts[fault] += 1
            return fault

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self._pick(h.command, h.path)
        if fault == "drop":
            h.close_connection = True
            return
        if fault in _ERRORS:
            status, code = _ERRORS[fault]
            doc = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                   f"<Message>injected by the fault proxy</Message></Error>").encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(doc)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(doc)
            return
        if fault == "slow":
            time.sleep(self.delay)
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for name, value in h.headers.items():
                if name.lower() not in _HOP:
                    conn.putheader(name, value)
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if fault == "drop-after":
            h.close_connection = True
            return
        if self.rate:
            self._transfer(len(data))
        h.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP and (name.lower() != "content-length" or h.command == "HEAD"):
                h.send_header(name, value)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _transfer(self, nbytes: int) -> None:
        """Sleep as long as ``nbytes`` take on the shared link."""
        assert self.rate
        with self._lock:
            now = time.monotonic()
            self._free_at = max(now, self._free_at) + nbytes / self.rate
            done = self._free_at
        time.sleep(max(0.0, done - time.monotonic()))

    def close(self) -> None:
        """Stop listening."""
        self._server.shutdown()
        self._server.server_close()
