"""The archive server: any storage backend offered to remote agents over HTTPS.

The server is a thin, dumb store in front of a ``Backend``: it never needs the archive's key (an
encrypted archive stays encrypted end to end) and holds no catalog of its own. Agents run the
archive logic themselves (``archive/remote.py`` is their ``Backend``): they fetch the pack
indexes once to learn which chunks the archive holds, send only the packs of new chunks, then the
point manifest. What the server adds to plain object storage:

- resumable uploads: an object is sent in pieces to a spool file whose offset the client can ask
  for after a dropped connection; ``commit`` checks length and SHA-256 end to end and only then
  stores the object with the backend's atomic ``put``, so a point appears whole or not at all;
- pack tails and point headers in bulk: one request returns the indexes of many packs (the chunk
  index), one the headers of many point manifests (the catalog);
- lock leases: the backend's archive lock held on a client's behalf, released when the client
  releases it or stops renewing it (it died), so prune never collects chunks of a backup in flight.

Protocol (JSON unless said; every request carries ``Authorization: Bearer TOKEN`` when a token
is configured; writes made under a lock carry ``X-Lifeboat-Lock: ID`` and fail with 409 if that
lease was lost):

| request | answer |
| --- | --- |
| ``GET /v1/objects/KEY`` (``Range: bytes=A-B``) | the bytes (200/206), 404 |
| ``HEAD /v1/objects/KEY`` | ``X-Object-Size``, 404 |
| ``DELETE /v1/objects/KEY`` | 204 |
| ``GET /v1/list?prefix=P`` | lines ``KEY SIZE`` |
| ``POST /v1/tails`` (keys, one a line) | per key: u16 key length, key, i64 size, u32 tail length, tail |
| ``POST /v1/heads?length=N`` (keys) | the same with each object's first N bytes (point headers, in bulk) |
| ``POST /v1/uploads`` ``{"id","key","size","sha256"}`` | ``{"offset"}`` (an existing upload resumes) |
| ``GET /v1/uploads/ID`` | ``{"offset"}``, 404 |
| ``PUT /v1/uploads/ID?offset=N`` (bytes) | ``{"offset"}``; 409 with the real offset if N is wrong |
| ``POST /v1/uploads/ID/commit`` | 200 once stored (again 200 if already stored); 422 if the bytes are wrong |
| ``POST /v1/locks`` ``{"exclusive"}`` | ``{"id","ttl"}``, 423 when held by another |
| ``POST /v1/locks/ID`` / ``DELETE /v1/locks/ID`` | renew (404 if lost) / release |
| ``POST /v1/cleanup`` | ``{"removed"}``: interrupted puts and stale uploads |

Why the standard library (``http.server`` + ``ssl``): the protocol is a dozen small requests,
OpenSSL through ``ssl`` gives TLS and client-certificate checks, and no framework or ASGI server
has to be installed and kept up to date on every archive host.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import ssl
import struct
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socket import socket
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from lifeboat.archive.backend import Backend
from lifeboat.archive.errors import Locked
from lifeboat.archive.formats import PACK_TRAILER
from lifeboat.plumbing.errors import LifeboatError

LOCK_TTL = 30.0
MAX_PIECE = 64 * 1024 * 1024
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
_KEY = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class _Lease:
    """One lock held for one client, until released or not renewed for ``ttl`` seconds."""

    def __init__(self, cm: contextlib.AbstractContextManager[None], exclusive: bool, ttl: float) -> None:
        self.cm = cm
        self.exclusive = exclusive
        self.ttl = ttl
        self.expires = time.monotonic() + ttl


class ArchiveService:
    """The state behind the HTTP handler: backend, spool of uploads, lock leases, token."""

    def __init__(self, backend: Backend, spool: Path, token: str | None, lock_ttl: float = LOCK_TTL) -> None:
        self.backend = backend
        self.spool = spool
        self.spool.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.lock_ttl = lock_ttl
        self.leases: dict[str, _Lease] = {}
        self.leases_lock = threading.Lock()
        self.upload_locks: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="lease-reaper", daemon=True)
        self._reaper.start()

    # -- leases ------------------------------------------------------------------------------
    def acquire(self, exclusive: bool) -> tuple[str, float]:
        """Take the backend's lock without waiting; ``Locked`` if another holder has it."""
        cm = self.backend.lock(exclusive=exclusive, wait=False)
        cm.__enter__()
        lease_id = secrets.token_hex(16)
        with self.leases_lock:
            self.leases[lease_id] = _Lease(cm, exclusive, self.lock_ttl)
        return lease_id, self.lock_ttl

    def renew(self, lease_id: str) -> bool:
        """Extend a lease; False when it was lost."""
        with self.leases_lock:
            lease = self.leases.get(lease_id)
            if lease is None:
                return False
            lease.expires = time.monotonic() + lease.ttl
            return True

    def release(self, lease_id: str) -> None:
        """Give a lock back."""
        with self.leases_lock:
            lease = self.leases.pop(lease_id, None)
        if lease is not None:
            lease.cm.__exit__(None, None, None)

    def holds(self, lease_id: str | None) -> bool:
        """Whether a write's lease is still held (no lease given: nothing to check)."""
        if not lease_id:
            return True
        with self.leases_lock:
            return lease_id in self.leases

    def _reap(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self.leases_lock:
                dead = [k for k, v in self.leases.items() if v.expires < now]
            for k in dead:
                self.release(k)

    def close(self) -> None:
        """Release every lease."""
        self._stop.set()
        with self.leases_lock:
            ids = list(self.leases)
        for k in ids:
            self.release(k)

    # -- uploads -----------------------------------------------------------------------------
    def _upload_lock(self, upload_id: str) -> threading.Lock:
        with self.leases_lock:
            return self.upload_locks.setdefault(upload_id, threading.Lock())

    def _paths(self, upload_id: str) -> tuple[Path, Path]:
        # ".tmp-" in the names: a local backend's list() never shows them, its cleanup removes them
        return self.spool / f"{upload_id}.tmp-part", self.spool / f"{upload_id}.tmp-meta"

    def begin_upload(self, upload_id: str, key: str, size: int, sha256: str) -> int:
        """Create an upload, or return the offset of the existing one with the same id."""
        part, meta = self._paths(upload_id)
        with self._upload_lock(upload_id):
            if meta.exists():
                return part.stat().st_size if part.exists() else 0
            tmp = meta.with_name(meta.name + "-new")
            tmp.write_text(json.dumps({"key": key, "size": size, "sha256": sha256}))
            part.touch()
            os.replace(tmp, meta)
            return 0

    def upload_offset(self, upload_id: str) -> int | None:
        """Bytes received so far, or None for an unknown upload."""
        part, meta = self._paths(upload_id)
        if not meta.exists():
            return None
        return part.stat().st_size if part.exists() else 0

    def write_piece(self, upload_id: str, offset: int, data: bytes) -> tuple[bool, int]:
        """Append a piece at ``offset``; (False, real offset) if the client is out of step."""
        part, meta = self._paths(upload_id)
        with self._upload_lock(upload_id):
            if not meta.exists():
                raise KeyError(upload_id)
            size = json.loads(meta.read_text())["size"]
            have = part.stat().st_size
            if offset != have or offset + len(data) > size:
                return False, have
            with part.open("ab") as f:
                f.write(data)
            return True, have + len(data)

    def commit_upload(self, upload_id: str) -> tuple[int, str]:
        """Check the upload end to end and store it atomically; (HTTP status, message)."""
        part, meta = self._paths(upload_id)
        with self._upload_lock(upload_id):
            if not meta.exists():
                return HTTPStatus.NOT_FOUND, "unknown upload (committed already, or never begun)"
            m = json.loads(meta.read_text())
            data = part.read_bytes()
            if len(data) != m["size"] or hashlib.sha256(data).hexdigest() != m["sha256"]:
                part.unlink()
                part.touch()
                return HTTPStatus.UNPROCESSABLE_ENTITY, "upload damaged (size or SHA-256 differ): send it again"
            self.backend.put(m["key"], data)
            meta.unlink()
            part.unlink()
        with self.leases_lock:
            self.upload_locks.pop(upload_id, None)
        return HTTPStatus.OK, m["key"]

    def committed(self, key: str, sha256: str) -> bool:
        """Whether ``key`` holds exactly the bytes with this SHA-256 (a commit whose answer was lost)."""
        try:
            return hashlib.sha256(self.backend.get(key)).hexdigest() == sha256
        except KeyError:
            return False

    def cleanup(self) -> int:
        """Interrupted puts of the backend plus every upload in the spool."""
        removed = self.backend.cleanup_incomplete()
        for p in self.spool.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
        return removed

    # -- pack tails --------------------------------------------------------------------------
    def tail(self, key: str) -> tuple[int, bytes]:
        """(object size, bytes from the pack's index to its end); empty tail if not a pack."""
        size = self.backend.size(key)
        if size < PACK_TRAILER.size:
            return size, b""
        trailer = self.backend.get_range(key, size - PACK_TRAILER.size, PACK_TRAILER.size)
        index_offset = struct.unpack_from("<Q", trailer, 0)[0]
        if not 0 < index_offset < size:
            return size, b""
        return size, self.backend.get_range(key, index_offset, size - index_offset)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        if self.server.verbose:
            super().log_message(format, *args)

    # -- plumbing ----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", ctype: str = "application/octet-stream",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_PIECE + 1024 * 1024:
            raise ValueError(f"request body of {n} bytes is too large")
        return self.rfile.read(n) if n else b""

    def _authorized(self) -> bool:
        token = self.server.service.token
        if token is None:
            return True
        got = self.headers.get("Authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), token.encode())

    def _dispatch(self) -> None:
        if not self._authorized():
            self._body()
            self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong token")
            return
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if len(parts) < 2 or parts[0] != "v1":
            self._body()
            self._error(HTTPStatus.NOT_FOUND, "unknown path")
            return
        handler: Callable[[list[str], dict[str, str]], None] | None = getattr(
            self, f"_{self.command.lower()}_{parts[1]}", None)
        if handler is None:
            self._body()
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} {parts[1]} is not supported")
            return
        try:
            handler(parts[2:], query)
        except KeyError:
            self._error(HTTPStatus.NOT_FOUND, "no such object")
        except Locked as e:
            self._error(HTTPStatus.LOCKED, str(e))
        except (ValueError, LifeboatError) as e:
            self._error(HTTPStatus.BAD_REQUEST if isinstance(e, ValueError) else HTTPStatus.INTERNAL_SERVER_ERROR,
                        str(e))

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _dispatch

    def _key(self, rest: list[str]) -> str:
        key = "/".join(rest)
        if not _KEY.match(key) or ".." in rest:
            raise ValueError(f"invalid object key {key!r}")
        return key

    def _check_lease(self) -> bool:
        if self.server.service.holds(self.headers.get("X-Lifeboat-Lock")):
            return True
        self._error(HTTPStatus.CONFLICT, "the archive lock of this client was lost (it expired)")
        return False

    # -- objects -----------------------------------------------------------------------------
    def _get_ping(self, rest: list[str], query: dict[str, str]) -> None:
        self._json(HTTPStatus.OK, {"lifeboat": "archive", "version": 1})

    def _get_objects(self, rest: list[str], query: dict[str, str]) -> None:
        key = self._key(rest)
        backend = self.server.service.backend
        rng = re.match(r"bytes=(\d+)-(\d+)$", self.headers.get("Range", ""))
        if rng:
            start, end = int(rng.group(1)), int(rng.group(2))
            data = backend.get_range(key, start, end - start + 1)
            self._send(HTTPStatus.PARTIAL_CONTENT, data)
        else:
            self._send(HTTPStatus.OK, backend.get(key))

    def _head_objects(self, rest: list[str], query: dict[str, str]) -> None:
        size = self.server.service.backend.size(self._key(rest))
        self._send(HTTPStatus.OK, headers={"X-Object-Size": str(size)})

    def _delete_objects(self, rest: list[str], query: dict[str, str]) -> None:
        if self._check_lease():
            self.server.service.backend.delete(self._key(rest))
            self._send(HTTPStatus.NO_CONTENT)

    def _get_list(self, rest: list[str], query: dict[str, str]) -> None:
        backend = self.server.service.backend
        lines = []
        for key in backend.list(query.get("prefix", "")):
            try:
                lines.append(f"{key} {backend.size(key)}\n")
            except KeyError:
                continue  # deleted while listing
        self._send(HTTPStatus.OK, "".join(lines).encode(), "text/plain")

    def _post_tails(self, rest: list[str], query: dict[str, str]) -> None:
        service = self.server.service
        out = bytearray()
        for key in self._body().decode().split():
            try:
                size, tail = service.tail(self._key([key]))
            except KeyError:
                size, tail = -1, b""
            k = key.encode()
            out += struct.pack("<H", len(k)) + k + struct.pack("<qI", size, len(tail)) + tail
        self._send(HTTPStatus.OK, bytes(out))

    def _post_heads(self, rest: list[str], query: dict[str, str]) -> None:
        backend = self.server.service.backend
        length = min(int(query.get("length", "65536")), 1024 * 1024)
        out = bytearray()
        for key in self._body().decode().split():
            try:
                size, head = backend.size(self._key([key])), backend.get_range(key, 0, length)
            except KeyError:
                size, head = -1, b""
            k = key.encode()
            out += struct.pack("<H", len(k)) + k + struct.pack("<qI", size, len(head)) + head
        self._send(HTTPStatus.OK, bytes(out))

    # -- uploads -----------------------------------------------------------------------------
    def _post_uploads(self, rest: list[str], query: dict[str, str]) -> None:
        service = self.server.service
        if not rest:
            doc = json.loads(self._body() or b"{}")
            upload_id, key, size, sha = doc["id"], self._key([doc["key"]]), int(doc["size"]), doc["sha256"]
            if not _UPLOAD_ID.match(upload_id):
                raise ValueError("invalid upload id")
            if service.committed(key, sha):
                self._json(HTTPStatus.OK, {"offset": size, "committed": True})
                return
            self._json(HTTPStatus.OK, {"offset": service.begin_upload(upload_id, key, size, sha)})
            return
        self._body()
        if len(rest) != 2 or rest[1] != "commit" or not _UPLOAD_ID.match(rest[0]):
            raise ValueError("expected /v1/uploads/ID/commit")
        if not self._check_lease():
            return
        status, message = service.commit_upload(rest[0])
        if status == HTTPStatus.OK:
            self._json(status, {"key": message})
        else:
            self._error(status, message)

    def _get_uploads(self, rest: list[str], query: dict[str, str]) -> None:
        if len(rest) != 1 or not _UPLOAD_ID.match(rest[0]):
            raise ValueError("expected /v1/uploads/ID")
        offset = self.server.service.upload_offset(rest[0])
        if offset is None:
            raise KeyError(rest[0])
        self._json(HTTPStatus.OK, {"offset": offset})

    def _put_uploads(self, rest: list[str], query: dict[str, str]) -> None:
        data = self._body()
        if len(rest) != 1 or not _UPLOAD_ID.match(rest[0]):
            raise ValueError("expected /v1/uploads/ID")
        ok, offset = self.server.service.write_piece(rest[0], int(query.get("offset", "-1")), data)
        self._json(HTTPStatus.OK if ok else HTTPStatus.CONFLICT, {"offset": offset})

    # -- locks -------------------------------------------------------------------------------
    def _post_locks(self, rest: list[str], query: dict[str, str]) -> None:
        service = self.server.service
        body = self._body()
        if not rest:
            lease_id, ttl = service.acquire(bool(json.loads(body or b"{}").get("exclusive")))
            self._json(HTTPStatus.OK, {"id": lease_id, "ttl": ttl})
        elif service.renew(rest[0]):
            self._json(HTTPStatus.OK, {"id": rest[0]})
        else:
            self._error(HTTPStatus.NOT_FOUND, "lock lease lost")

    def _delete_locks(self, rest: list[str], query: dict[str, str]) -> None:
        if rest:
            self.server.service.release(rest[0])
        self._send(HTTPStatus.NO_CONTENT)

    def _post_cleanup(self, rest: list[str], query: dict[str, str]) -> None:
        self._body()
        if self._check_lease():
            self._json(HTTPStatus.OK, {"removed": self.server.service.cleanup()})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: ArchiveService, tls: ssl.SSLContext | None,
                 verbose: bool) -> None:
        self.service = service
        self.tls = tls
        self.verbose = verbose
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS handshake in the connection's own thread, so a slow client never blocks accept."""
        if self.tls is not None:
            assert isinstance(request, socket)
            request.settimeout(30)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                request.close()
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished mid-request is normal (it will resume): no traceback."""


class ArchiveServer:
    """An HTTP(S) server for one archive: ``start()`` in a thread or ``serve_forever()``."""

    def __init__(self, backend: Backend, host: str, port: int, *, token: str | None,
                 tls: ssl.SSLContext | None, spool: Path, verbose: bool = False,
                 lock_ttl: float = LOCK_TTL) -> None:
        self.service = ArchiveService(backend, spool, token, lock_ttl)
        try:
            self.httpd = _Server((host, port), self.service, tls, verbose)
        except OSError as e:
            raise LifeboatError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.host, self.port = str(self.httpd.server_address[0]), int(self.httpd.server_address[1])
        self.scheme = "https" if tls is not None else "http"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The URL agents give as ``--archive``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until ``shutdown``."""
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> ArchiveServer:
        """Serve from a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="archive-server", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving, release every lease."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.service.close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def default_spool(location: str) -> Path:
    """Where uploads wait: inside a local archive (same file system, so ``put`` is a cheap copy)."""
    if "://" not in location or location.startswith("file://"):
        root = Path(location.split("://", 1)[-1])
        return root / "uploads.tmp-spool"
    digest = hashlib.sha256(location.encode()).hexdigest()[:12]
    return Path(os.environ.get("TMPDIR", "/var/tmp")) / f"lifeboat-spool-{digest}"

