"""Replication after each point of ``lifeboat protect --replicate-to DEST``.

A disaster that takes the backup server takes its points too: what counts is how old the newest
point is that is *off-site*. ``Replicator`` runs ``archive.replicate`` of the protected machine
in a thread of its own (``background.Worker``), woken after each capture, so a slow link never
delays the next capture (several captures during one replication are copied together by the next
run). Failures back off exponentially (1 s doubling up to ``max_backoff``), reset by a success.

The lag it reports is the age of the newest point not yet off-site (0 when the destination has
the newest point): the same figure as ``lifeboat replicate --json``'s ``lag_seconds``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from lifeboat.agent.background import Worker
from lifeboat.archive.points import now_utc
from lifeboat.archive.replicate import ReplicationReport, offsite_lag

Newest = Callable[[], datetime | None]  # when the newest point of the machine was frozen


class Replicator(Worker):
    """Replicates on request in a background thread; ``close()`` finishes a pending run."""

    def __init__(self, to: str, run: Callable[[], ReplicationReport], newest: Newest, *,
                 max_backoff: float = 300.0, log: Callable[[str], None] = lambda _m: None) -> None:
        super().__init__("replicate", max_backoff=max_backoff, log=log)
        self.what = f"replicate to {to}"
        self.to = to
        self._run = run
        self._newest = newest
        self.offsite_time: datetime | None = None  # the newest point known to be at ``to``
        self.runs = 0
        self.bytes_copied = 0
        self.last_report: dict[str, Any] | None = None
        self.request()  # catch up once at start
        self.start()

    def lag(self) -> float | None:
        """Seconds: the age of the newest point not yet off-site; 0 in step; None without points."""
        newest = self._newest()
        if newest is None:
            return None
        with self.lock:
            offsite = self.offsite_time is not None and newest <= self.offsite_time
        return offsite_lag([] if offsite else [newest], now_utc())

    def work(self) -> None:
        """One replication of the machine's points."""
        target = self._newest()
        if target is None:
            return  # no point yet: nothing to copy
        report = self._run()
        with self.lock:
            self.runs += 1
            self.bytes_copied += report.bytes_copied
            self.last_report = report.to_json()
            if report.ok:
                self.offsite_time = max(self.offsite_time or target, target)
            self.last_error = None if report.ok else f"refused: {report.refused}"
        if report.points_published:
            self.log(f"replicate to {self.to}: {', '.join(report.points_published)} off-site")

    def status(self) -> dict[str, Any]:
        """The ``replication`` part of protect's JSON status."""
        lag = self.lag()
        with self.lock:
            return {
                "to": self.to,
                "lag_seconds": None if lag is None else round(lag, 3),
                "offsite_point_time": self.offsite_time.isoformat() if self.offsite_time else None,
                "runs": self.runs,
                "failures": self.failures,
                "bytes_copied": self.bytes_copied,
                "last_error": self.last_error,
            }

    def metrics(self, labels: str) -> list[str]:
        """Prometheus lines, ``labels`` being the machine's (``to`` is added)."""
        doc = self.status()
        m = f'{labels},to="{prom_label(self.to)}"'
        lag = doc["lag_seconds"]
        return [
            "# HELP lifeboat_replication_lag_seconds Age of the newest point not yet off-site (0 in step).",
            "# TYPE lifeboat_replication_lag_seconds gauge",
            f"lifeboat_replication_lag_seconds{{{m}}} {lag if lag is not None else 'NaN'}",
            "# HELP lifeboat_replications_total Replication runs that ended.",
            "# TYPE lifeboat_replications_total counter",
            f"lifeboat_replications_total{{{m}}} {doc['runs']}",
            "# HELP lifeboat_replication_failures_total Replication runs that failed.",
            "# TYPE lifeboat_replication_failures_total counter",
            f"lifeboat_replication_failures_total{{{m}}} {doc['failures']}",
            "# HELP lifeboat_replication_bytes_total Bytes copied off-site.",
            "# TYPE lifeboat_replication_bytes_total counter",
            f"lifeboat_replication_bytes_total{{{m}}} {doc['bytes_copied']}",
        ]


def prom_label(value: str) -> str:
    """``value`` escaped for a Prometheus label."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
