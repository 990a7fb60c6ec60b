"""Continuous protection: captures in a loop that keeps the newest point younger than the RPO.

Why the loop is shaped like this:
- The schedule is driven by the archive, not by a timer: the next capture is due when the
  newest point's age plus the expected capture time would reach the RPO. A restarted agent
  reads the newest point's time from the archive and goes on where it left off (and the source's
  change tracking, kept in the guest's bitmaps and named in the points, survives too).
- Errors back off exponentially (1 s doubling up to ``max_backoff``), reset by a success; the
  source and the archive are reopened after an error (a restarted guest or archive server).
- Work after each point that may take longer than a capture runs in threads of its own, woken
  after each capture (``background.Worker``): replication off-site (``offsite.Replicator``) and
  the file index (``indexer.Indexer``); their failures are reported, never fail a capture.
- The achieved RPO is the age of the newest point. It is reported continuously (JSON status
  file, Prometheus text on an HTTP endpoint and/or a textfile) and, per capture, the age the
  previous point had reached when the new one landed: the worst age of that cycle.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lifeboat.agent.indexer import Indexer
from lifeboat.agent.offsite import Replicator, prom_label
from lifeboat.agent.plan import capture
from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.points import now_utc
from lifeboat.plumbing.errors import LifeboatError, UsageError

PEAKS_KEPT = 10000


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


class Protector:
    """The capture loop of one machine; ``run(stop)`` until ``stop`` is set."""

    def __init__(self, open_archive: Callable[[], Archive], open_source: Callable[[str], Any], machine: str,
                 spec: str, rpo: float, *, status_file: Path | None = None, metrics_file: Path | None = None,
                 max_backoff: float = 300.0, log: Callable[[str], None] = lambda _m: None,
                 max_captures: int | None = None,
                 replicator: Callable[[Callable[[], datetime | None]], Replicator] | None = None,
                 indexer: Callable[[], Indexer] | None = None,
                 after_point: Callable[[PointInfo], None] | None = None) -> None:
        self.open_archive = open_archive
        self.open_source = open_source
        self.machine = machine
        self.spec = spec
        self.rpo = rpo
        self.status_file = status_file
        self.metrics_file = metrics_file
        self.max_backoff = max_backoff
        self.log = log
        self.max_captures = max_captures
        self.after_point = after_point  # e.g. staging the point at a target; its failure only logs
        self.lock = threading.Lock()
        self.newest_time: datetime | None = None
        self.newest_point: str | None = None
        self.captures = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.fallbacks = 0
        self.last_error: str | None = None
        self.last_capture: dict[str, Any] | None = None
        self.modes: dict[str, int] = {}
        self.bytes_read = 0
        self.bytes_new = 0
        self.peaks: deque[float] = deque(maxlen=PEAKS_KEPT)
        self.duration_est = 0.0
        self.state = "starting"
        self.started = now_utc()
        self._replicator_factory = replicator
        self.replicator: Replicator | None = None  # started by ``run``
        self._indexer_factory = indexer
        self.indexer: Indexer | None = None  # started by ``run``

    # -- reporting -----------------------------------------------------------------------------
    def age(self) -> float | None:
        """Seconds since the newest point's data was frozen: the achieved RPO right now."""
        if self.newest_time is None:
            return None
        return max(0.0, (now_utc() - self.newest_time).total_seconds())

    def status(self) -> dict[str, Any]:
        """The JSON status document."""
        off = {"replication": self.replicator.status()} if self.replicator else {}  # takes self.lock itself
        if self.indexer:
            off["index"] = self.indexer.status()
        with self.lock:
            age = self.age()
            peaks = list(self.peaks)
            return {
                "machine": self.machine,
                "source": self.spec,
                "state": self.state,
                "pid": os.getpid(),
                "updated": now_utc().isoformat(),
                "rpo_target_seconds": self.rpo,
                "rpo_seconds": None if age is None else round(age, 3),
                "rpo_met": age is not None and age <= self.rpo,
                "newest_point": self.newest_point,
                "newest_point_time": self.newest_time.isoformat() if self.newest_time else None,
                "captures": self.captures,
                "failures": self.failures,
                "consecutive_failures": self.consecutive_failures,
                "fallbacks": self.fallbacks,
                "captures_by_mode": dict(self.modes),
                "last_error": self.last_error,
                "last_capture": self.last_capture,
                "achieved": {
                    "cycles": len(peaks),
                    "median_seconds": round(statistics.median(peaks), 3) if peaks else None,
                    "p99_seconds": round(percentile(peaks, 99), 3) if peaks else None,
                    "max_seconds": round(max(peaks), 3) if peaks else None,
                },
            } | off

    def metrics(self) -> str:
        """The Prometheus text exposition of the loop's state."""
        doc = self.status()
        m = f'machine="{prom_label(self.machine)}"'
        age = doc["rpo_seconds"]
        lines = [
            "# HELP lifeboat_rpo_seconds Age of the newest recovery point (the achieved RPO now).",
            "# TYPE lifeboat_rpo_seconds gauge",
            f"lifeboat_rpo_seconds{{{m}}} {age if age is not None else 'NaN'}",
            "# HELP lifeboat_rpo_target_seconds The RPO asked for with --rpo.",
            "# TYPE lifeboat_rpo_target_seconds gauge",
            f"lifeboat_rpo_target_seconds{{{m}}} {self.rpo}",
            "# HELP lifeboat_newest_point_timestamp_seconds When the newest point's data was frozen.",
            "# TYPE lifeboat_newest_point_timestamp_seconds gauge",
            f"lifeboat_newest_point_timestamp_seconds{{{m}}} "
            f"{self.newest_time.timestamp() if self.newest_time else 'NaN'}",
            "# HELP lifeboat_captures_total Captures stored, by mode.",
            "# TYPE lifeboat_captures_total counter",
        ]
        for mode, n in sorted(doc["captures_by_mode"].items()):
            lines.append(f'lifeboat_captures_total{{{m},mode="{mode}"}} {n}')
        lines += [
            "# HELP lifeboat_capture_failures_total Captures that failed.",
            "# TYPE lifeboat_capture_failures_total counter",
            f"lifeboat_capture_failures_total{{{m}}} {self.failures}",
            "# HELP lifeboat_capture_fallbacks_total Captures that fell back to a full read (broken chain).",
            "# TYPE lifeboat_capture_fallbacks_total counter",
            f"lifeboat_capture_fallbacks_total{{{m}}} {self.fallbacks}",
            "# HELP lifeboat_consecutive_failures Failures since the last success.",
            "# TYPE lifeboat_consecutive_failures gauge",
            f"lifeboat_consecutive_failures{{{m}}} {self.consecutive_failures}",
            "# HELP lifeboat_capture_bytes_read_total Bytes read from the source.",
            "# TYPE lifeboat_capture_bytes_read_total counter",
            f"lifeboat_capture_bytes_read_total{{{m}}} {self.bytes_read}",
            "# HELP lifeboat_capture_bytes_new_total Bytes of chunks new to the archive.",
            "# TYPE lifeboat_capture_bytes_new_total counter",
            f"lifeboat_capture_bytes_new_total{{{m}}} {self.bytes_new}",
            "# HELP lifeboat_rpo_cycle_seconds Age the previous point reached when each new point landed.",
            "# TYPE lifeboat_rpo_cycle_seconds summary",
        ]
        ach = doc["achieved"]
        if ach["cycles"]:
            lines.append(f'lifeboat_rpo_cycle_seconds{{{m},quantile="0.5"}} {ach["median_seconds"]}')
            lines.append(f'lifeboat_rpo_cycle_seconds{{{m},quantile="0.99"}} {ach["p99_seconds"]}')
        lines.append(f"lifeboat_rpo_cycle_seconds_count{{{m}}} {ach['cycles']}")
        lines += [
            "# HELP lifeboat_protect_up 1 while the protect loop runs.",
            "# TYPE lifeboat_protect_up gauge",
            f"lifeboat_protect_up{{{m}}} {0 if self.state == 'stopped' else 1}",
        ]
        if self.replicator:
            lines += self.replicator.metrics(m)
        if self.indexer:
            lines += self.indexer.metrics(m)
        return "\n".join(lines) + "\n"

    def write_reports(self) -> None:
        """Status file and metrics textfile, each replaced atomically."""
        if self.status_file:
            _atomic_write(self.status_file, json.dumps(self.status(), indent=2) + "\n")
        if self.metrics_file:
            _atomic_write(self.metrics_file, self.metrics())

    # -- the loop ------------------------------------------------------------------------------
    def _due_in(self) -> float:
        age = self.age()
        if age is None:
            return 0.0
        return max(0.0, self.rpo - age - 1.5 * self.duration_est)

    def run(self, stop: threading.Event) -> None:
        """Capture until ``stop`` is set (the current capture always finishes or aborts cleanly)."""
        arc: Archive | None = None
        src: Any = None
        backoff = 1.0
        if self._replicator_factory is not None:
            self.replicator = self._replicator_factory(self._newest)
        if self._indexer_factory is not None:
            self.indexer = self._indexer_factory()
        try:
            while not stop.is_set():
                try:
                    if arc is None:
                        arc = self.open_archive()
                        pts = arc.points(self.machine)
                        if pts and (self.newest_time is None or pts[-1].when > self.newest_time):
                            with self.lock:
                                self.newest_time, self.newest_point = pts[-1].when, pts[-1].point
                    with self.lock:
                        self.state = "waiting"
                    while not stop.is_set() and (wait := self._due_in()) > 0:
                        self.write_reports()
                        stop.wait(min(wait, 1.0))
                    if stop.is_set():
                        break
                    if src is None:
                        src = self.open_source(self.spec)
                    with self.lock:
                        self.state = "capturing"
                    t0 = time.monotonic()
                    info, plan = capture(arc, self.machine, src)
                    elapsed = time.monotonic() - t0
                    landed = now_utc()
                    with self.lock:
                        if self.newest_time is not None:
                            self.peaks.append((landed - self.newest_time).total_seconds())
                        self.newest_time, self.newest_point = info.when, info.point
                        self.captures += 1
                        self.consecutive_failures = 0
                        self.modes[plan.mode] = self.modes.get(plan.mode, 0) + 1
                        if plan.fallback_reason:
                            self.fallbacks += 1
                        self.bytes_read += info.bytes_read
                        self.bytes_new += info.bytes_new
                        self.duration_est = elapsed if self.captures == 1 else 0.7 * self.duration_est + 0.3 * elapsed
                        self.last_capture = {"point": info.point, "time": info.time, "mode": plan.mode,
                                             "fallback_reason": plan.fallback_reason, "seconds": round(elapsed, 3),
                                             "bytes_read": info.bytes_read, "bytes_new": info.bytes_new,
                                             "notes": plan.notes}
                    backoff = 1.0
                    if plan.fallback_reason:
                        self.log(f"protect {self.machine}: full read instead of an incremental: {plan.fallback_reason}")
                    self.log(f"protect {self.machine}: {plan.mode} point {info.point} in {elapsed:.2f} s, "
                             f"{info.bytes_read} bytes read")
                    if self.replicator:
                        self.replicator.request()
                    if self.indexer:
                        self.indexer.request_point(info)
                    self.write_reports()
                    if self.after_point is not None:
                        try:
                            self.after_point(info)
                        except LifeboatError as e:  # the point is stored; the next one tries again
                            self.log(f"protect {self.machine}: after point {info.point}: {e}")
                    if self.max_captures is not None and self.captures >= self.max_captures:
                        break
                except Exception as e:  # keep protecting: report, back off, reopen
                    if isinstance(e, UsageError) and self.captures == 0:
                        raise  # no such source, a malformed one: waiting will not fix the command line
                    with self.lock:
                        self.failures += 1
                        self.consecutive_failures += 1
                        self.last_error = f"{type(e).__name__}: {e}"
                        self.state = "backing-off"
                    self.log(f"protect {self.machine}: capture failed ({e}); retrying in {backoff:.0f} s")
                    for closing in (src, arc):
                        close = getattr(getattr(closing, "backend", closing), "close", None)
                        if close is not None:
                            try:
                                close()
                            except Exception:  # noqa: S110 - already failing; the next open reports
                                pass
                    src, arc = None, None
                    self.write_reports()
                    stop.wait(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
        finally:
            if src is not None:
                src.close()
            if self.replicator:
                self.replicator.close()
            if self.indexer:
                if self.indexer.status()["waiting"]:
                    self.log(f"protect {self.machine}: indexing the last points before stopping")
                self.indexer.close()
            with self.lock:
                self.state = "stopped"
            self.write_reports()

    def _newest(self) -> datetime | None:
        with self.lock:
            return self.newest_time


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /status`` (JSON) on a loopback port by default."""

    def __init__(self, protector: Protector, host: str, port: int) -> None:
        prot = protector

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                if self.path.startswith("/metrics"):
                    body, ctype = prot.metrics().encode(), "text/plain; version=0.0.4"
                elif self.path.startswith("/status"):
                    body, ctype = json.dumps(prot.status()).encode(), "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="metrics")
        self.thread.start()

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
