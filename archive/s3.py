"""The S3 backend: an archive as objects in a bucket (``s3://bucket/prefix``), on boto3.

Endpoint, region and credentials come from boto3's default chain (``AWS_*`` variables,
``~/.aws/config`` and ``~/.aws/credentials``); ``LIFEBOAT_S3_ENDPOINT`` points at another
S3-compatible store (path-style addressing then). A PUT is atomic on S3, so no temporary
objects exist; packs go up as multipart uploads, aborted when they fail. Every write is
conditional (``If-None-Match: *`` to create, ``If-Match: ETAG`` to replace an object this
process read), so two writers never silently overwrite each other; locks are lease objects.
``archive/FORMAT.md`` ("The S3 backend") describes the model and its clock assumptions.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import os
import random
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from lifeboat.archive.backend import Backend
from lifeboat.archive.errors import Locked, StorageError
from lifeboat.plumbing.errors import UsageError
from lifeboat.plumbing.periodic import repeating

ENDPOINT_ENV = "LIFEBOAT_S3_ENDPOINT"
LOCK_TTL_ENV = "LIFEBOAT_S3_LOCK_TTL"
DEFAULT_LOCK_TTL = 60.0
LOCK_PREFIX = ".locks/"  # lease objects, below the archive's prefix; never listed
DEFAULT_ATTEMPTS = 8  # tries per request (AWS_MAX_ATTEMPTS sets it): rides out a minute of faults
PART_SIZE = 16 * 1024 * 1024  # multipart part size (S3 wants >= 5 MiB but for the last)
_MAX_ETAGS = 65536
_MISSING = ("NoSuchKey", "404", "NotFound")
_BAD_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                    "ExpiredToken", "403", "Forbidden")
_CALLER_HANDLES = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "InvalidRange", "416")
_T = TypeVar("_T")


class S3Backend(Backend):
    """Objects under ``prefix`` in ``bucket``; keys map to object names below the prefix."""

    def __init__(self, location: str) -> None:
        rest = location.split("://", 1)[1]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UsageError(f"archive location {location!r}: give s3://BUCKET[/PREFIX]")
        self.location = location
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = os.environ.get(ENDPOINT_ENV) or None
        mode = os.environ.get("AWS_RETRY_MODE") or "standard"
        attempts = os.environ.get("AWS_MAX_ATTEMPTS") or str(DEFAULT_ATTEMPTS)
        if mode not in ("standard", "adaptive", "legacy") or not attempts.isdigit() or int(attempts) < 1:
            raise UsageError(f"archive {location}: AWS_RETRY_MODE={mode!r} or AWS_MAX_ATTEMPTS={attempts!r} is not "
                             "valid (standard or adaptive; a count of at least 1)")
        config = botocore.config.Config(
            # back-off with jitter on dropped connections, 500/503 and throttling (SlowDown);
            # AWS_RETRY_MODE=adaptive also paces requests after throttling answers
            retries={"mode": mode, "total_max_attempts": int(attempts)},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=32,
            s3={"addressing_style": "path"} if self.endpoint else None,
        )
        try:
            self._s3: Any = boto3.session.Session().client("s3", endpoint_url=self.endpoint, config=config)
        except (botocore.exceptions.BotoCoreError, ValueError) as e:
            raise UsageError(f"archive {location}: cannot set up the S3 client: {e}") from None
        self._where = f"bucket {bucket!r}" + (f" at {self.endpoint}" if self.endpoint else "")
        self._etags: OrderedDict[str, str] = OrderedDict()  # ETags of the objects last read or written
        self._etag_lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------
    def _name(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/") or key.startswith(LOCK_PREFIX):
            raise ValueError(f"invalid object key {key!r}")
        return self.prefix + key

    @contextlib.contextmanager
    def _errors(self, what: str, key: str = "") -> Iterator[None]:
        """S3 failures become lifeboat errors naming the bucket and endpoint: ``KeyError`` for a
        missing object; a failed precondition (412, 409) or a range past the end (416) stay
        ``ClientError`` for the caller, which knows what they mean."""
        try:
            yield
        except botocore.exceptions.ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in _MISSING:
                raise KeyError(key) from None
            if code in _CALLER_HANDLES:
                raise
            if code == "NoSuchBucket":
                raise UsageError(f"archive {self.location}: {self._where} does not exist") from None
            if code in _BAD_CREDENTIALS:
                raise UsageError(f"archive {self.location}: {self._where} refused the credentials "
                                 f"({code}: {err.get('Message', '')}); check AWS_ACCESS_KEY_ID, "
                                 f"AWS_SECRET_ACCESS_KEY or ~/.aws/credentials") from None
            raise StorageError(f"archive {self.location}: {what} failed on {self._where}: "
                               f"{code} {err.get('Message', '')}") from None
        except botocore.exceptions.NoCredentialsError:
            raise UsageError(f"archive {self.location}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                             f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials)") from None
        except botocore.exceptions.EndpointConnectionError:
            raise StorageError(f"archive {self.location}: cannot reach the S3 endpoint "
                               f"{self.endpoint or '(AWS default)'} for {self._where}") from None
        except botocore.exceptions.BotoCoreError as e:
            raise StorageError(f"archive {self.location}: {what} failed on {self._where}: {e}") from None

    def _call(self, what: str, fn: Callable[..., _T], key: str = "", **kwargs: Any) -> _T:
        """One S3 request on this bucket, through ``_errors``."""
        with self._errors(what, key):
            return fn(Bucket=self.bucket, **kwargs)

    def _remember(self, key: str, etag: str | None) -> None:
        with self._etag_lock:
            if etag is None:
                self._etags.pop(key, None)
                return
            self._etags[key] = etag
            self._etags.move_to_end(key)
            if len(self._etags) > _MAX_ETAGS:  # a forgotten one only makes a replace refuse, safely
                self._etags.popitem(last=False)

    def _condition(self, key: str) -> dict[str, str]:
        """Replace only the version this process last saw; create only when absent."""
        with self._etag_lock:
            etag = self._etags.get(key)
        return {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}

    def _conflict(self, key: str, cond: dict[str, str]) -> StorageError:
        self._remember(key, None)
        if "IfMatch" in cond:
            return StorageError(f"archive {self.location}: {key} was changed by another writer; nothing "
                                f"was overwritten, run the command again")
        return StorageError(f"archive {self.location}: {key} was created by another writer meanwhile; "
                            f"nothing was overwritten, run the command again")

    # -- Backend -------------------------------------------------------------------------
    def get(self, key: str) -> bytes:
        with self._errors(f"reading {key}", key):
            resp = self._s3.get_object(Bucket=self.bucket, Key=self._name(key))
            data: bytes = resp["Body"].read()
        self._remember(key, resp.get("ETag"))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            self.size(key)
            return b""
        try:
            with self._errors(f"reading {key}", key):
                resp = self._s3.get_object(Bucket=self.bucket, Key=self._name(key),
                                           Range=f"bytes={offset}-{offset + length - 1}")
                data: bytes = resp["Body"].read()
        except botocore.exceptions.ClientError:  # 416: the range starts past the end
            return b""
        self._remember(key, resp.get("ETag"))
        return data

    def put(self, key: str, data: bytes) -> None:
        name, cond = self._name(key), self._condition(key)
        try:
            etag = self._call(f"writing {key}", self._s3.put_object, key, Key=name, Body=data, **cond)["ETag"]
        except botocore.exceptions.ClientError:
            etag = self._landed(key, data)
            if etag is None:
                raise self._conflict(key, cond) from None
        self._remember(key, etag)

    def _landed(self, key: str, data: bytes) -> str | None:
        """The stored ETag when the object holds exactly ``data``: a retried request whose first
        try had landed fails its condition, and is a success (a single-part ETag is the MD5)."""
        try:
            etag: str = self._call(f"reading {key}", self._s3.head_object, key, Key=self._name(key))["ETag"]
        except KeyError:
            return None
        return etag if etag.strip('"') == hashlib.md5(data, usedforsecurity=False).hexdigest() else None

    def _landed_parts(self, key: str, done: list[dict[str, Any]]) -> str | None:
        """The stored ETag when the object is the multipart upload of these parts (its ETag is
        the MD5 of the parts' MD5s, a dash, and their count)."""
        md5s = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in done)
        want = f"{hashlib.md5(md5s, usedforsecurity=False).hexdigest()}-{len(done)}"
        try:
            etag: str = self._call(f"reading {key}", self._s3.head_object, key, Key=self._name(key))["ETag"]
        except KeyError:
            return None
        return etag if etag.strip('"') == want else None

    def put_parts(self, key: str, parts: Sequence[bytes]) -> None:
        """A multipart upload of ``PART_SIZE`` pieces when the object is larger than one, so a
        pack is never joined whole in memory; aborted when anything fails."""
        if sum(len(p) for p in parts) <= PART_SIZE:
            self.put(key, b"".join(parts))
            return
        name, cond = self._name(key), self._condition(key)
        upload = self._call(f"writing {key}", self._s3.create_multipart_upload, key, Key=name)["UploadId"]
        try:
            done: list[dict[str, Any]] = []
            for piece in _pieces(parts, PART_SIZE):
                resp = self._call(f"writing {key}", self._s3.upload_part, key, Key=name, UploadId=upload,
                                  PartNumber=len(done) + 1, Body=piece)
                done.append({"PartNumber": len(done) + 1, "ETag": resp["ETag"]})
            try:
                resp = self._call(f"writing {key}", self._s3.complete_multipart_upload, key, Key=name,
                                  UploadId=upload, MultipartUpload={"Parts": done}, **cond)
            except (botocore.exceptions.ClientError, StorageError) as e:
                # a retried completion whose first try had landed finds no upload (or fails its
                # condition): a success when the object is that upload
                etag = self._landed_parts(key, done)
                if etag is None:
                    raise self._conflict(key, cond) if isinstance(e, botocore.exceptions.ClientError) else e from None
                resp = {"ETag": etag}
        except BaseException:
            with contextlib.suppress(Exception):
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload)
            raise
        self._remember(key, resp.get("ETag"))

    def delete(self, key: str) -> None:
        self._call(f"deleting {key}", self._s3.delete_object, key, Key=self._name(key))
        self._remember(key, None)

    def size(self, key: str) -> int:
        resp = self._call(f"reading {key}", self._s3.head_object, key, Key=self._name(key))
        self._remember(key, resp.get("ETag"))
        return int(resp["ContentLength"])

    def _pages(self, what: str, operation: str, prefix: str) -> Iterator[dict[str, Any]]:
        """The pages of a listing operation under ``prefix``."""
        with self._errors(what):
            yield from self._s3.get_paginator(operation).paginate(Bucket=self.bucket, Prefix=prefix)

    def list(self, prefix: str = "") -> Iterator[str]:
        for page in self._pages("listing", "list_objects_v2", self.prefix + prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix):]
                if not key.startswith(LOCK_PREFIX):
                    yield key

    # -- locks ---------------------------------------------------------------------------
    def _leases(self) -> Iterator[tuple[str, bool, bool]]:
        """Every lease as (object name, exclusive, live), judged by the store's clock: a lease
        lives while its last rewrite (LastModified) is younger than its ttl."""
        for page in self._pages("reading the locks", "list_objects_v2", self.prefix + LOCK_PREFIX):
            now = _server_time(page)
            for obj in page.get("Contents", []):
                mode, ttl = _lease_mode(obj["Key"])
                # LastModified and Date have whole seconds: one more second of slack
                yield obj["Key"], mode == "ex", now - obj["LastModified"].timestamp() <= ttl + 1

    def _holder(self, name: str) -> str:
        """Who holds a lease, for the message of ``Locked``."""
        try:
            body = json.loads(self._s3.get_object(Bucket=self.bucket, Key=name)["Body"].read())
            return f"pid {body['pid']} on {body['host']}"
        except Exception:  # gone meanwhile: the message just says less
            return "a process that has just released it"

    @contextlib.contextmanager
    def lock(self, exclusive: bool, wait: bool = True) -> Iterator[None]:
        """A lease object per holder, renewed in the background; see FORMAT.md."""
        ttl = float(os.environ.get(LOCK_TTL_ENV, DEFAULT_LOCK_TTL))
        name = f"{self.prefix}{LOCK_PREFIX}{'ex' if exclusive else 'sh'}-{int(ttl * 1000)}-{secrets.token_hex(8)}"
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
        delay = 0.2
        while True:
            try:
                etag = self._call("taking the lock", self._s3.put_object, Key=name, Body=body, IfNoneMatch="*")["ETag"]
            except botocore.exceptions.ClientError:  # the name is random: a retry found its first try
                etag = self._call("taking the lock", self._s3.head_object, Key=name)["ETag"]
            blockers = [n for n, ex, live in self._leases() if live and n != name and (exclusive or ex)]
            if not blockers:
                break
            self._call("releasing the lock", self._s3.delete_object, Key=name)
            if not wait:
                raise Locked(f"archive {self.location} is locked by another lifeboat process "
                             f"({self._holder(blockers[0])})")
            time.sleep(delay * (0.5 + random.random()))  # jitter: two exclusive takers do not keep colliding
            delay = min(delay * 2, max(ttl / 3, 0.2))

        def renew() -> None:
            """Rewrite the lease, which moves its LastModified; a failed renewal is tried again at
            the next turn (the lease lapses if none succeeds within the ttl)."""
            nonlocal etag
            with contextlib.suppress(Exception):
                etag = self._s3.put_object(Bucket=self.bucket, Key=name, Body=body, IfMatch=etag)["ETag"]

        try:
            with repeating(ttl / 3, renew, "s3-lease-renew"):
                yield
        finally:
            with contextlib.suppress(Exception):
                self._s3.delete_object(Bucket=self.bucket, Key=name)

    def cleanup_incomplete(self) -> int:
        """Abort the multipart uploads left under this prefix (run under the exclusive lock, so
        no writer has one in flight) and remove lapsed leases (not counted)."""
        removed = 0
        for page in self._pages("listing uploads", "list_multipart_uploads", self.prefix):
            for up in page.get("Uploads", []):
                self._call("aborting an upload", self._s3.abort_multipart_upload, Key=up["Key"],
                           UploadId=up["UploadId"])
                removed += 1
        for name, _, live in [*self._leases()]:  # listed whole before deleting
            if not live:
                self._call("removing a lapsed lease", self._s3.delete_object, Key=name)
        return removed

    def close(self) -> None:
        self._s3.close()


def _lease_mode(name: str) -> tuple[str, float]:
    """A lease's mode ("ex" or "sh") and ttl in seconds, from its name ``ex-TTLMS-ID``."""
    mode, _, rest = name.rsplit("/", 1)[-1].partition("-")
    try:
        return mode, int(rest.split("-", 1)[0]) / 1000
    except ValueError:
        return "ex", DEFAULT_LOCK_TTL  # not ours to read: counted as exclusive, safe side


def _pieces(parts: Sequence[bytes], size: int) -> Iterator[bytes]:
    """The parts' concatenation cut into ``size`` pieces (the last may be shorter)."""
    buf = bytearray()
    for part in parts:
        view = memoryview(part)
        while view:
            take = min(size - len(buf), len(view))
            buf += view[:take]
            view = view[take:]
            if len(buf) == size:
                yield bytes(buf)
                buf.clear()
    if buf:
        yield bytes(buf)


def _server_time(page: dict[str, Any]) -> float:
    """The store's clock from a response's Date header (leases are judged by it, not ours)."""
    date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
