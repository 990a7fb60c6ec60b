"""Retention policy: which points to keep, the rules borg and restic users know.

``keep_last`` keeps the N newest; ``keep_hourly``/``daily``/``weekly``/``monthly``/``yearly``
keep the newest point of each of the N most recent periods that have one. The newest point of
a machine is always kept. An empty policy keeps everything.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from lifeboat.archive.points import PointInfo
from lifeboat.plumbing.errors import UsageError

_BUCKETS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "keep_hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "keep_daily": lambda t: (t.year, t.month, t.day),
    "keep_weekly": lambda t: tuple(t.isocalendar()[:2]),
    "keep_monthly": lambda t: (t.year, t.month),
    "keep_yearly": lambda t: (t.year,),
}
RULES = ("keep_last", *_BUCKETS)


def check_policy(policy: dict[str, int]) -> dict[str, int]:
    """A policy with known rules and non-negative counts."""
    for rule, n in policy.items():
        if rule not in RULES:
            raise UsageError(f"retention rule {rule!r} is unknown (known: {', '.join(RULES)})")
        if not isinstance(n, int) or n < 0:
            raise UsageError(f"retention rule {rule}: {n!r} is not a whole number >= 0")
    return policy


def keep(points: list[PointInfo], policy: dict[str, int]) -> set[str]:
    """Ids of the points (of one machine, any order) that the policy keeps."""
    if not points:
        return set()
    newest_first = sorted(points, key=lambda p: (p.when, p.point), reverse=True)
    if not any(policy.values()):
        return {p.point for p in points}
    kept = {newest_first[0].point}
    kept.update(p.point for p in newest_first[: policy.get("keep_last", 0)])
    for rule, bucket in _BUCKETS.items():
        want = policy.get(rule, 0)
        seen: set[tuple[int, ...]] = set()
        for p in newest_first:
            if len(seen) >= want:
                break
            b = bucket(p.when)
            if b not in seen:
                seen.add(b)
                kept.add(p.point)
    return kept
