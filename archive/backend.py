"""The storage backend interface: every byte of an archive is stored through it.

Archive logic names objects by slash-separated keys (``packs/ab/abcd…``, ``points/web01/…``)
and never touches file paths, so the same archive can live in a local directory, an object
store or behind the archive server. ``tests/archive/test_backend_conformance.py`` is the suite
every backend must pass.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence

from lifeboat.plumbing.errors import UsageError
from lifeboat.plumbing.registry import Registry


class Backend(abc.ABC):
    """Key/value storage of immutable objects with atomic, durable writes.

    Contract:
    - ``put`` is atomic and durable: when it returns, the object is fully stored and survives a
      crash; a crash during ``put`` leaves either no object or the old one, never a partial one.
    - ``put`` of an existing key replaces it atomically (used only for point manifests).
    - ``list(prefix)`` yields keys of completed objects only, in no particular order.
    - ``get_range`` reads part of an object; reading past its end returns fewer bytes.
    - ``lock`` guards archive-wide operations (backup shares, prune is exclusive).
    """

    location: str

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; ``KeyError`` if absent."""

    @abc.abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end); ``KeyError`` if absent."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` atomically and durably under ``key``."""

    def put_parts(self, key: str, parts: Sequence[bytes]) -> None:
        """``put`` of the parts' concatenation; a backend that can write them without joining
        them first (a 32 MiB copy per pack) overrides this."""
        self.put(key, b"".join(parts))

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are not an error."""

    def exists(self, key: str) -> bool:
        """Whether a completed object is stored under ``key`` (by default: whether ``size``
        finds it; a backend with a cheaper test overrides this)."""
        try:
            self.size(key)
        except KeyError:
            return False
        return True

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Length of the object in bytes; ``KeyError`` if absent."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys of completed objects starting with ``prefix``."""

    def change_stamps(self, prefix: str) -> dict[str, Hashable] | None:
        """For each folder directly under ``prefix`` (``points/``: each machine), a value that
        changes whenever an object in it is added, replaced or removed, so that a cache of what a
        folder holds stays valid while its stamp is equal; ``None`` when the backend cannot tell
        without listing every key (the caller then lists them)."""
        return None

    @abc.abstractmethod
    def lock(self, exclusive: bool, wait: bool = True) -> contextlib.AbstractContextManager[None]:
        """A shared or exclusive archive-wide lock, released when the process dies."""

    @abc.abstractmethod
    def cleanup_incomplete(self) -> int:
        """Remove leftovers of interrupted ``put`` calls; returns how many were removed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release cached handles."""


# By URL scheme (``plumbing/registry.py``; ``LIFEBOAT_PLUGINS=backends:SCHEME=module:Class`` adds
# one): each class is built from the whole location. A plain path is a local directory.
BACKENDS: Registry[Callable[[str], Backend]] = Registry(
    "backends",
    "archive backend",
    {
        "file": "lifeboat.archive.local:LocalBackend",
        "http": "lifeboat.archive.remote:RemoteBackend",  # an archive server (lifeboat archive serve)
        "https": "lifeboat.archive.remote:RemoteBackend",
        "s3": "lifeboat.archive.s3:S3Backend",  # s3://bucket/prefix, any S3-compatible store
    },
    base=Backend,
)


def open_backend(location: str) -> Backend:
    """The backend for a location: a URL's scheme picks it, a plain path is a local directory."""
    scheme, sep, rest = location.partition("://")
    if not sep:
        scheme, rest = "file", location
    try:
        cls = BACKENDS.get(scheme)
    except UsageError as e:
        raise UsageError(f"archive location {location!r}: {e}") from None
    return cls(rest if scheme == "file" else location)
