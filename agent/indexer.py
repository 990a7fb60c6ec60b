"""The file index after each point of ``lifeboat protect`` (unless ``--no-index``).

Indexing a point boots a libguestfs appliance (20-50 s on a loaded machine) and walks its file
systems: far longer than an incremental capture. ``Indexer`` does it from a thread of its own
(``background.Worker``; ``lifeboat protect`` makes each run a ``lifeboat files index`` child
process), so it never delays a capture and its failures never fail one: they are logged, counted
in protect's status and metrics, and retried after a back-off.

When points come faster than they are indexed, the newest waits alone: the next run indexes the
newest point, and the points skipped meanwhile (the backlog) are caught up when the agent is idle,
that is after a run during which no new point came, a batch of ``batch`` points in one appliance,
newest first. A point that failed ``attempts`` times is left to ``lifeboat files index MACHINE``
(which indexes every point without an index), as are the points captured before this agent
started. ``close()`` (protect stopping) finishes the run in progress, then indexes the newest point
and a batch of the backlog in one last run (one appliance); older points of the backlog are left to
``files index`` (logged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lifeboat.agent.background import Worker
from lifeboat.archive import PointInfo

ATTEMPTS = 3
BATCH = 4

# index these points of one machine; returns a row per point indexed (points pruned meanwhile are
# left out: they are not failures)
IndexPoints = Callable[[list[PointInfo]], list[dict[str, Any]]]


class Indexer(Worker):
    """Indexes protect's points in the background; ``request(info)`` after each capture."""

    what = "file index"

    def __init__(self, index: IndexPoints, *, batch: int = BATCH, attempts: int = ATTEMPTS,
                 max_backoff: float = 300.0, log: Callable[[str], None] = lambda _m: None) -> None:
        super().__init__("index", max_backoff=max_backoff, log=log)
        self._index = index
        self.batch = batch
        self.attempts = attempts
        self._newest: PointInfo | None = None  # the newest point not yet indexed
        self._backlog: list[PointInfo] = []  # older points skipped meanwhile, oldest first
        self._tries: dict[str, int] = {}
        self.runs = 0
        self.points_indexed = 0
        self.files = 0
        self.given_up: list[str] = []  # points left to ``files index`` after ``attempts`` failures
        self.last_point: str | None = None
        self.start()

    def request_point(self, info: PointInfo) -> None:
        """Index ``info`` (the newest point) soon; the point it displaces waits in the backlog."""
        with self.lock:
            if self._newest is not None:
                self._backlog.append(self._newest)
            self._newest = info
        self.request()

    def work(self) -> None:
        """Index the newest point; when there is none, a batch of the backlog (all of it when closing)."""
        with self.lock:
            if self.closing:  # one last appliance: the newest point and a batch of the backlog
                todo = [p for p in (self._newest, *self._backlog[::-1][:self.batch]) if p is not None]
                left = self._backlog[:-self.batch] if self.batch else self._backlog
                if left:
                    self.log(f"file index: {len(left)} older points left to 'lifeboat files index "
                             f"{left[0].machine}'")
                self._newest, self._backlog = None, []
            elif self._newest is not None:
                todo, self._newest = [self._newest], None
            else:
                todo = self._backlog[-self.batch:][::-1]
                del self._backlog[len(self._backlog) - len(todo):]
        if not todo:
            return
        try:
            done = self._index(todo)
        except Exception:
            self._retry(todo)
            raise
        with self.lock:
            self.runs += 1
            self.points_indexed += len(done)
            self.files += sum(d["files"] for d in done)
            if done:
                self.last_point = done[0]["point"]
            self.last_error = None
            idle = self._newest is None and bool(self._backlog)
        if idle:
            self.request()  # no new point came during this run: catch up

    def _retry(self, failed: list[PointInfo]) -> None:
        """Put ``failed`` back in the backlog, but those that failed ``attempts`` times."""
        with self.lock:
            for info in reversed(failed):  # oldest first, as the backlog is
                self._tries[info.point] = self._tries.get(info.point, 0) + 1
                if self._tries[info.point] >= self.attempts:
                    self.given_up.append(info.point)
                    self.log(f"file index: {info.machine}@{info.point} failed {self.attempts} times: left to "
                             f"'lifeboat files index {info.machine}'")
                else:
                    self._backlog.append(info)
            self._backlog.sort(key=lambda p: (p.when, p.point))

    def status(self) -> dict[str, Any]:
        """The ``index`` part of protect's JSON status."""
        with self.lock:
            waiting = len(self._backlog) + (self._newest is not None)
            return {"runs": self.runs, "points_indexed": self.points_indexed, "files": self.files,
                    "failures": self.failures, "waiting": waiting, "given_up": list(self.given_up),
                    "last_point": self.last_point, "last_error": self.last_error}

    def metrics(self, labels: str) -> list[str]:
        """Prometheus lines, ``labels`` being the machine's."""
        doc = self.status()
        return [
            "# HELP lifeboat_index_points_total Points whose file index the agent stored.",
            "# TYPE lifeboat_index_points_total counter",
            f"lifeboat_index_points_total{{{labels}}} {doc['points_indexed']}",
            "# HELP lifeboat_index_failures_total Indexing runs that failed (retried after a back-off).",
            "# TYPE lifeboat_index_failures_total counter",
            f"lifeboat_index_failures_total{{{labels}}} {doc['failures']}",
            "# HELP lifeboat_index_waiting_points Points captured but not indexed yet.",
            "# TYPE lifeboat_index_waiting_points gauge",
            f"lifeboat_index_waiting_points{{{labels}}} {doc['waiting']}",
            "# HELP lifeboat_index_given_up_points Points left to 'lifeboat files index' after repeated failures.",
            "# TYPE lifeboat_index_given_up_points gauge",
            f"lifeboat_index_given_up_points{{{labels}}} {len(doc['given_up'])}",
        ]
