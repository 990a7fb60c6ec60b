"""The remote backend: an archive served by ``lifeboat archive serve``, as ``--archive https://HOST:PORT``.

The archive logic runs here, on the agent: chunks are hashed, compressed and (if the archive is
encrypted) encrypted before they leave the machine. At the start of each backup the archive
reloads its chunk index; through this backend that is one listing plus one bulk request for the
pack indexes the agent has not seen yet (cached for the life of the process), so the agent knows
which chunks the archive lacks and uploads only packs of those. Each object is uploaded in pieces
that resume at the server's offset after a dropped connection; the server checks size and
SHA-256 and stores the object atomically (``archive/server.py``), and the point manifest is the
last object sent, so a point commits atomically.

Configuration (environment, since ``--archive`` is one URL):
``LIFEBOAT_ARCHIVE_TOKEN`` or ``LIFEBOAT_ARCHIVE_TOKEN_FILE`` (bearer token);
``LIFEBOAT_ARCHIVE_CA`` (CA file to check the server's certificate; default: the system's);
``LIFEBOAT_ARCHIVE_CERT`` + ``LIFEBOAT_ARCHIVE_KEY`` (client certificate);
``LIFEBOAT_ARCHIVE_RETRY_SECONDS`` (how long to keep retrying a lost connection, default 60).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import http.client
import json
import os
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

from lifeboat.archive.backend import Backend
from lifeboat.archive.errors import Locked, StorageError
from lifeboat.plumbing.errors import UsageError
from lifeboat.plumbing.periodic import repeating
from lifeboat.plumbing.tls import client_context

PIECE = 8 * 1024 * 1024
TAIL_BATCH = 2000
_RETRYABLE = (OSError, http.client.HTTPException, ssl.SSLError)


class RemoteBackend(Backend):
    """Objects stored by an archive server over HTTP(S), with resumable uploads and lock leases."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise UsageError(f"archive location {url!r}: expected https://HOST:PORT")
        self.location = f"{parts.scheme}://{parts.netloc}"
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.token = _token()
        self.retry_seconds = float(os.environ.get("LIFEBOAT_ARCHIVE_RETRY_SECONDS", "60"))
        self.ssl = _client_tls() if parts.scheme == "https" else None
        self._local = threading.local()
        self._tails: dict[str, tuple[int, int, bytes]] = {}  # pack key -> (size, tail offset, tail)
        self._sizes: dict[str, int] = {}
        self._heads: dict[str, tuple[int, bytes]] = {}  # point key -> (size, first bytes), from the last listing
        self._lease: str | None = None
        self.bytes_sent = 0
        self.reconnects = 0

    # -- HTTP ----------------------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self.ssl is not None:
                conn = http.client.HTTPSConnection(self.host, self.port, context=self.ssl, timeout=60)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _once(self, method: str, path: str, body: bytes | None,
              headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        hdrs = {"Content-Length": str(len(body or b"")), **headers}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        if self._lease and method in ("PUT", "POST", "DELETE"):
            hdrs["X-Lifeboat-Lock"] = self._lease
        conn = self._conn()
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self._drop()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request, retried on a lost connection (every request of this protocol is idempotent)."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.1
        while True:
            try:
                status, hdrs, data = self._once(method, path, body, headers or {})
            except _RETRYABLE as e:
                self._drop()
                if time.monotonic() + delay > deadline:
                    raise StorageError(f"remote archive {self.location}: {method} {path.split('?')[0]} failed: "
                                       f"{e or type(e).__name__} (gave up after {self.retry_seconds:.0f} s)") from None
                self.reconnects += 1
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if status == 401 or status == 403:
                raise UsageError(f"remote archive {self.location} refused us: {_message(data)} "
                                 "(set LIFEBOAT_ARCHIVE_TOKEN or LIFEBOAT_ARCHIVE_TOKEN_FILE)")
            if status == 423:
                raise Locked(f"remote archive {self.location}: {_message(data)}")
            if status >= 500:
                raise StorageError(f"remote archive {self.location}: {method} {path.split('?')[0]}: {_message(data)}")
            return status, hdrs, data

    def _obj(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/") or ".tmp-" in key:
            raise ValueError(f"invalid object key {key!r}")
        return "/v1/objects/" + quote(key)

    # -- Backend -------------------------------------------------------------------------------
    def get(self, key: str) -> bytes:
        status, _, data = self.request("GET", self._obj(key))
        if status == 404:
            raise KeyError(key)
        _check(status, data, self.location)
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        cached = self._tails.get(key)
        if cached is not None:
            size, tail_off, tail = cached
            if offset >= tail_off and offset + length <= size:
                return tail[offset - tail_off: offset - tail_off + length]
        head = self._heads.pop(key, None)
        if head is not None and (offset + length <= len(head[1]) or len(head[1]) == head[0]):
            return head[1][offset:offset + length]
        if length <= 0:
            return b""
        rng = {"Range": f"bytes={offset}-{offset + length - 1}"}
        status, _, data = self.request("GET", self._obj(key), headers=rng)
        if status == 404:
            raise KeyError(key)
        _check(status, data, self.location)
        return data

    def put(self, key: str, data: bytes) -> None:
        """Upload in pieces, resuming at the server's offset after a lost connection, then commit."""
        self._obj(key)  # checks the key
        sha = hashlib.sha256(data).hexdigest()
        upload_id = hashlib.sha256(f"{key}\0{len(data)}\0{sha}".encode()).hexdigest()[:32]
        begin = json.dumps({"id": upload_id, "key": key, "size": len(data), "sha256": sha}).encode()
        for _attempt in range(3):
            status, _, body = self.request("POST", "/v1/uploads", begin, {"Content-Type": "application/json"})
            _check(status, body, self.location)
            doc = json.loads(body)
            if doc.get("committed"):
                break
            offset = int(doc["offset"])
            view = memoryview(data)
            while offset < len(data):
                piece = bytes(view[offset:offset + PIECE])
                try:
                    status, _, body = self._once("PUT", f"/v1/uploads/{upload_id}?offset={offset}", piece, {})
                except _RETRYABLE:
                    # the connection dropped: ask where the server is and go on from there
                    self._drop()
                    self.reconnects += 1
                    status, _, body = self.request("GET", f"/v1/uploads/{upload_id}")
                    if status == 404:
                        break  # the upload vanished (server cleanup): begin again
                    _check(status, body, self.location)
                    offset = int(json.loads(body)["offset"])
                    continue
                if status in (200, 409):
                    if status == 200:
                        self.bytes_sent += len(piece)
                    offset = int(json.loads(body)["offset"])
                    continue
                if status == 404:
                    break
                _check(status, body, self.location)
            else:
                status, _, body = self.request("POST", f"/v1/uploads/{upload_id}/commit")
                if status == 200:
                    break
                if status == 404:  # committed by an earlier try whose answer was lost, or gone
                    continue
                if status == 422:  # damaged on the way: the server reset it, send again
                    continue
                if status == 409:
                    raise StorageError(f"remote archive {self.location}: {_message(body)}")
                _check(status, body, self.location)
            continue
        else:
            raise StorageError(f"remote archive {self.location}: upload of {key} did not complete after 3 tries")
        if key.startswith("packs/"):
            self._sizes[key] = len(data)

    def delete(self, key: str) -> None:
        status, _, body = self.request("DELETE", self._obj(key))
        if status not in (204, 404):
            _check(status, body, self.location)
        self._tails.pop(key, None)
        self._sizes.pop(key, None)

    def size(self, key: str) -> int:
        if key in self._sizes:
            return self._sizes[key]
        status, hdrs, body = self.request("HEAD", self._obj(key))
        if status == 404:
            raise KeyError(key)
        _check(status, body, self.location)
        return int(hdrs["x-object-size"])

    def list(self, prefix: str = "") -> Iterator[str]:  # noqa: A003 - the Backend interface
        status, _, body = self.request("GET", "/v1/list?prefix=" + quote(prefix))
        _check(status, body, self.location)
        keys: builtins.list[str] = []
        sizes: dict[str, int] = {}
        for line in body.decode().splitlines():
            key, _, size = line.rpartition(" ")
            keys.append(key)
            sizes[key] = int(size)
        if prefix.startswith("points/"):
            self._prefetch_heads(keys)  # the catalog reads every manifest's header next
        if prefix.startswith("packs/") or prefix == "packs":
            # packs are immutable: their sizes and index tails can be cached for good
            self._sizes = {k: v for k, v in self._sizes.items() if not k.startswith("packs/")} | sizes
            self._tails = {k: v for k, v in self._tails.items() if k in sizes}
            self._prefetch_tails([k for k in keys if k not in self._tails])
        return iter(keys)

    def _prefetch_heads(self, keys: builtins.list[str], length: int = 65536) -> None:
        """The first bytes of many objects in one request per batch, each used by the next read of it."""
        self._heads = {}
        for i in range(0, len(keys), TAIL_BATCH):
            batch = keys[i:i + TAIL_BATCH]
            status, _, body = self.request("POST", f"/v1/heads?length={length}", "\n".join(batch).encode())
            _check(status, body, self.location)
            for key, size, data in _records(body):
                if size >= 0:
                    self._heads[key] = (size, data)

    def _prefetch_tails(self, keys: builtins.list[str]) -> None:
        """Fetch the index part of many packs in one request per batch (the agent's chunk index)."""
        for i in range(0, len(keys), TAIL_BATCH):
            batch = keys[i:i + TAIL_BATCH]
            status, _, body = self.request("POST", "/v1/tails", "\n".join(batch).encode())
            _check(status, body, self.location)
            for key, size, tail in _records(body):
                if size >= 0 and tail:
                    self._tails[key] = (size, size - len(tail), tail)

    @contextlib.contextmanager
    def lock(self, exclusive: bool, wait: bool = True) -> Iterator[None]:
        """A lease on the server's archive lock, renewed in the background while held."""
        body = json.dumps({"exclusive": exclusive}).encode()
        delay = 0.2
        while True:
            try:
                status, _, resp = self.request("POST", "/v1/locks", body, {"Content-Type": "application/json"})
                break
            except Locked:
                if not wait:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        _check(status, resp, self.location)
        doc = json.loads(resp)
        lease, ttl = doc["id"], float(doc["ttl"])
        previous, self._lease = self._lease, lease
        try:
            with repeating(ttl / 3, self._renewer(lease), "lock-renew"):
                yield
        finally:
            self._lease = previous
            with contextlib.suppress(StorageError):
                self.request("DELETE", f"/v1/locks/{lease}")

    def _renewer(self, lease: str) -> Callable[[], None]:
        """A renewal of the lease over a connection of its own (same settings)."""
        backend = RemoteBackend.__new__(RemoteBackend)
        backend.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_local"})
        backend._local = threading.local()
        backend._lease = None

        def renew() -> None:
            with contextlib.suppress(StorageError, UsageError):
                backend.request("POST", f"/v1/locks/{lease}")

        return renew

    def cleanup_incomplete(self) -> int:
        status, _, body = self.request("POST", "/v1/cleanup")
        _check(status, body, self.location)
        return int(json.loads(body)["removed"])

    def close(self) -> None:
        self._drop()


def _records(body: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(key, size, bytes) records of a bulk answer: u16 key length, key, i64 size, u32 length, bytes."""
    pos = 0
    while pos < len(body):
        (klen,) = struct.unpack_from("<H", body, pos)
        key = body[pos + 2:pos + 2 + klen].decode()
        size, n = struct.unpack_from("<qI", body, pos + 2 + klen)
        pos += 2 + klen + 12
        yield key, size, bytes(body[pos:pos + n])
        pos += n


def _message(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode(errors="replace")


def _check(status: int, data: bytes, location: str) -> None:
    if not 200 <= status < 300:
        raise StorageError(f"remote archive {location}: HTTP {status}: {_message(data)}")


def _token() -> str | None:
    token = os.environ.get("LIFEBOAT_ARCHIVE_TOKEN")
    path = os.environ.get("LIFEBOAT_ARCHIVE_TOKEN_FILE")
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise UsageError(f"token file {path}: {e.strerror}") from None
    return token or None


def _client_tls() -> ssl.SSLContext:
    """The agent's TLS: the server checked against $LIFEBOAT_ARCHIVE_CA, and the client certificate
    of $LIFEBOAT_ARCHIVE_CERT/KEY presented to a server that requires one."""
    env = os.environ.get
    return client_context(env("LIFEBOAT_ARCHIVE_CA"), env("LIFEBOAT_ARCHIVE_CERT"), env("LIFEBOAT_ARCHIVE_KEY"))

