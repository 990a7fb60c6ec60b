"""Recovery points: their catalog entries, manifests and the ``MACHINE@WHEN`` selector.

The catalog is the set of point manifests under ``points/<machine>/<point-id>``: each one is
written atomically after all its chunks are durable, so a listed point is always complete.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from lifeboat.archive.errors import BadSelector
from lifeboat.plumbing.errors import UsageError

POINT_PREFIX = "points/"
PRUNED_PREFIX = "pruned/"  # ``pruned/<machine>/<point>``: an empty tombstone per point prune removed
_MACHINE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_machine(name: str) -> str:
    """A machine name is a safe path component: letters, digits, '.', '_', '-'."""
    if not _MACHINE_RE.match(name):
        raise UsageError(
            f"machine name {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def new_point_id() -> str:
    """A short random id (12 hex digits)."""
    return secrets.token_hex(6)


def now_utc() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class PointInfo:
    """A catalog entry: what ``lifeboat points`` lists."""

    machine: str
    point: str
    time: str
    parent: str | None
    size: int
    chunk_size: int
    bytes_read: int
    bytes_new: int
    bytes_stored: int
    source: str

    @property
    def key(self) -> str:
        """The manifest's object key."""
        return f"{POINT_PREFIX}{self.machine}/{self.point}"

    @property
    def when(self) -> datetime:
        """The point's time as a datetime."""
        return datetime.fromisoformat(self.time)

    def to_json(self) -> dict[str, Any]:
        """The document printed by ``--json``."""
        return asdict(self)

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> PointInfo:
        """Rebuild from a manifest's JSON header."""
        fields = {k: header[k] for k in cls.__dataclass_fields__ if k in header}
        return cls(**fields)


def parse_selector(selector: str) -> tuple[str, str]:
    """Split ``MACHINE[@WHEN]``; WHEN defaults to ``latest``."""
    machine, _, when = selector.partition("@")
    if "@" in selector and not when:
        raise BadSelector(f"selector {selector!r}: nothing after '@' (use a point id, 'latest' or an ISO time)")
    try:
        check_machine(machine)
    except UsageError as e:
        raise BadSelector(f"selector {selector!r}: {e}") from None
    return machine, when or "latest"


def parse_when(selector: str, when: str) -> datetime:
    """An ISO-8601 time; a time without zone is taken as UTC."""
    try:
        t = datetime.fromisoformat(when)
    except ValueError:
        raise BadSelector(
            f"selector {selector!r}: {when!r} is not a point id, 'latest' or an ISO-8601 time"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def select(selector: str, machine: str, when: str, points: list[PointInfo]) -> PointInfo:
    """The point a selector names among ``points`` (sorted oldest first)."""
    if not points:
        raise BadSelector(f"selector {selector!r}: machine {machine!r} has no points in this archive")
    if when == "latest":
        return points[-1]
    matches = [p for p in points if p.point == when]
    if matches:
        return matches[0]
    t = parse_when(selector, when)
    before = [p for p in points if p.when <= t]
    if not before:
        raise BadSelector(
            f"selector {selector!r}: no point of {machine!r} at or before {t.isoformat()} "
            f"(the oldest is {points[0].time})"
        )
    return before[-1]
