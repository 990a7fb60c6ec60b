"""The scheduler: runs rehearsals on their ``schedule:`` (cron, UTC), and ``lifeboat stage`` of a
runbook on its ``stage: {schedule:}`` (failovers to targets that stage ahead), and writes systemd
timers. Each such schedule is a job of its own (``Scheduled.job``: ``run`` or ``stage``).

``lifeboat scheduler`` is a long-running process. For each runbook with a schedule it remembers,
in the state database, the scheduled time of the last run it started. When it starts (or wakes)
and one or more fire times have passed since then (the host was down, the scheduler was stopped),
it runs the runbook *once* to catch up — a rehearsal missed three times needs one new proof, not
three — and then follows the schedule. A runbook seen for the first time starts its schedule from
now. Each run is a separate ``lifeboat run`` process, so a crash of one run cannot take the
scheduler down, and the same runbook is never started twice at once.

Cron parsing and iteration come from ``croniter`` (well kept, the de-facto Python cron library).

For production without a resident process, ``lifeboat scheduler --systemd-units DIR`` writes a
``.service`` + ``.timer`` pair per scheduled runbook; ``Persistent=true`` gives systemd's own
catch-up after downtime. Cron's rule that a restricted day-of-month and day-of-week match
*either* becomes two ``OnCalendar=`` lines (systemd requires both within one line).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from croniter import croniter

from lifeboat.orchestrator.console import SELF_COMMAND
from lifeboat.orchestrator.runbook import InvalidRunbook, Runbook, load
from lifeboat.orchestrator.state import StateStore

DOW = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]


@dataclass
class Scheduled:
    """A runbook with a schedule: its runs (``job`` ``run``), or its staging (``stage``)."""

    path: Path
    runbook: Runbook
    job: str = "run"

    @property
    def expr(self) -> str:
        """The cron expression."""
        expr = self.runbook.schedule if self.job == "run" else self.runbook.stage_schedule
        assert expr is not None
        return expr

    @property
    def key(self) -> str:
        """Where the state store keeps this job's last fire time: the runbook's path for its runs."""
        return str(self.path) if self.job == "run" else f"{self.path}#{self.job}"

    @property
    def name(self) -> str:
        """The job's name in messages and systemd unit names."""
        return self.runbook.name if self.job == "run" else f"{self.runbook.name}-{self.job}"

    def command(self, state_dir: Path, extra_args: list[str]) -> list[str]:
        """The ``lifeboat run`` (or ``lifeboat stage``, which keeps no state) command of this job."""
        state = ["--state", str(state_dir)] if self.job == "run" else []
        return [*SELF_COMMAND, self.job, str(self.path), *state, *extra_args]


def find_runbooks(paths: list[Path], log: Callable[[str], None]) -> list[Scheduled]:
    """Valid runbooks with a schedule, from files and folders (``*.yaml``, ``*.yml``)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
        elif p.exists():
            files.append(p)
        else:
            log(f"scheduler: {p}: no such file or folder")
    out = []
    for f in files:
        try:
            rb = load(f)
        except InvalidRunbook as e:
            log(f"scheduler: skipping invalid runbook {f}:")
            for problem in e.problems:
                log(f"  {problem}")
            continue
        if rb.schedule:
            out.append(Scheduled(f.resolve(), rb))
        if rb.stage_schedule:
            out.append(Scheduled(f.resolve(), rb, "stage"))
    return out


def next_fire(expr: str, after: float) -> float:
    """The first fire time of ``expr`` strictly after ``after`` (Unix seconds, UTC)."""
    return float(croniter(expr, datetime.fromtimestamp(after, UTC)).get_next(float))


def last_fire_at_or_before(expr: str, now: float) -> float:
    """The newest fire time of ``expr`` at or before ``now``."""
    it = croniter(expr, datetime.fromtimestamp(now + 1e-6, UTC))
    return float(it.get_prev(float))


def missed(expr: str, last: float, now: float, limit: int = 10000) -> int:
    """How many fire times fell in (last, now] (capped at ``limit``)."""
    it = croniter(expr, datetime.fromtimestamp(last, UTC))
    n = 0
    while n < limit and it.get_next(float) <= now:
        n += 1
    return n


class Scheduler:
    """Runs scheduled runbooks until stopped (see the module docstring)."""

    def __init__(
        self,
        paths: list[Path],
        state: StateStore,
        *,
        extra_args: list[str] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.paths = paths
        self.state = state
        self.extra_args = extra_args or []
        self.log = log
        self.stop = threading.Event()
        self.running: dict[str, subprocess.Popen[bytes]] = {}  # by Scheduled.key
        self.results: dict[str, int] = {}

    def due(self, now: float) -> list[Scheduled]:
        """Scheduled runbooks whose next fire time has come (recording first sightings)."""
        out = []
        for s in find_runbooks(self.paths, self.log):
            last = self.state.last_fire(s.key)
            if last is None:
                self.state.set_last_fire(s.key, s.runbook.name, now)
                self.log(
                    f"scheduler: {s.name}: schedule {s.expr!r} starts now; "
                    f"next run {datetime.fromtimestamp(next_fire(s.expr, now), UTC).isoformat()}"
                )
                continue
            if next_fire(s.expr, last) <= now:
                out.append(s)
        return out

    def start(self, s: Scheduled, now: float) -> None:
        """Start a run (catching up when more than one fire time was missed)."""
        last = self.state.last_fire(s.key) or now
        n = missed(s.expr, last, now)
        fire = last_fire_at_or_before(s.expr, now)
        if s.key in self.running and self.running[s.key].poll() is None:
            self.log(f"scheduler: {s.name}: still running from its last start; skipping this one")
            self.state.set_last_fire(s.key, s.runbook.name, fire)
            return
        note = f" (catching up: {n} scheduled runs were missed, running once)" if n > 1 else ""
        self.log(
            f"scheduler: {s.name}: starting the {s.job} scheduled for "
            f"{datetime.fromtimestamp(fire, UTC).isoformat()}{note}"
        )
        self.state.set_last_fire(s.key, s.runbook.name, fire)
        self.running[s.key] = subprocess.Popen(s.command(self.state.dir, self.extra_args), stdin=subprocess.DEVNULL)

    def reap(self) -> None:
        """Collect finished runs."""
        for key, proc in list(self.running.items()):
            rc = proc.poll()
            if rc is not None:
                self.results[key] = rc
                self.log(f"scheduler: {Path(key).name}: finished with exit status {rc}")
                del self.running[key]

    def run_once(self) -> int:
        """Start whatever is due (or missed), wait for those runs; exit status 1 if any failed."""
        for s in self.due(time.time()):
            self.start(s, time.time())
        for proc in self.running.values():
            proc.wait()
        self.reap()
        return 1 if any(rc != 0 for rc in self.results.values()) else 0

    def run_forever(self) -> None:
        """Follow the schedules until ``stop`` is set (SIGINT/SIGTERM)."""
        self.log(f"scheduler: watching {', '.join(map(str, self.paths))} (state {self.state.dir})")
        while not self.stop.is_set():
            now = time.time()
            for s in self.due(now):
                self.start(s, now)
            self.reap()
            upcoming = [
                next_fire(s.expr, self.state.last_fire(s.key) or now)
                for s in find_runbooks(self.paths, lambda _msg: None)
            ]
            wait = min([u - time.time() for u in upcoming] + [60.0])
            self.stop.wait(max(wait, 0.5))
        for proc in self.running.values():
            proc.terminate()  # each run handles SIGTERM: it stops and can be resumed
        for proc in self.running.values():
            proc.wait()
        self.reap()


# --------------------------------------------------------------------------- systemd


def on_calendar(expr: str) -> list[str]:
    """systemd ``OnCalendar=`` values equivalent to a 5-field cron expression (UTC)."""
    fields, _ = croniter.expand(expr)
    minute, hour, dom, month, dow = ([v for v in f] for f in fields)

    def part(values: Sequence[int | str], width: int = 2) -> str:
        if values == ["*"]:
            return "*"
        return ",".join(f"{int(v):0{width}d}" for v in sorted({int(v) for v in values}))

    def days(values: Sequence[int | str]) -> str:
        return ",".join(DOW[d] for d in sorted({int(v) % 7 for v in values}))

    time_part = f"{part(hour)}:{part(minute)}:00"
    date_dom = f"*-{part(month)}-{part(dom)}"
    if dom != ["*"] and dow != ["*"]:
        return [f"{date_dom} {time_part} UTC", f"{days(dow)} *-{part(month)}-* {time_part} UTC"]
    if dow != ["*"]:
        return [f"{days(dow)} *-{part(month)}-* {time_part} UTC"]
    return [f"{date_dom} {time_part} UTC"]


def write_systemd_units(
    scheduled: list[Scheduled], out: Path, *, state_dir: Path, extra_args: list[str] | None = None
) -> list[Path]:
    """A ``lifeboat-NAME.service`` and ``lifeboat-NAME.timer`` per scheduled job (``NAME-stage``
    for a runbook's staging)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for s in scheduled:
        unit = f"lifeboat-{s.name}"
        cmd = " ".join(_quote(a) for a in s.command(state_dir, extra_args or []))
        service = (
            "[Unit]\n"
            f"Description=lifeboat {s.runbook.kind if s.job == 'run' else 'staging of'} {s.runbook.name}\n"
            f"Documentation=file://{s.path}\n"
            "After=network-online.target libvirtd.service\n"
            "Wants=network-online.target\n\n"
            "[Service]\n"
            "Type=oneshot\n"
            f"ExecStart={cmd}\n"
            "# a run stopped by systemd resumes at the next start\n"
            "KillSignal=SIGTERM\n"
            "TimeoutStopSec=120\n"
        )
        calendars = "".join(f"OnCalendar={c}\n" for c in on_calendar(s.expr))
        timer = (
            "[Unit]\n"
            f"Description=lifeboat schedule {s.expr!r} of {s.name}\n\n"
            "[Timer]\n"
            f"{calendars}"
            "# run once at boot if a scheduled run was missed while the host was down\n"
            "Persistent=true\n"
            f"Unit={unit}.service\n\n"
            "[Install]\n"
            "WantedBy=timers.target\n"
        )
        for suffix, text in ((".service", service), (".timer", timer)):
            path = out / f"{unit}{suffix}"
            path.write_text(text)
            written.append(path)
    return written


def _quote(arg: str) -> str:
    """Quote an argument for a systemd ExecStart= line."""
    if arg and all(c.isalnum() or c in "/._-=:@+" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
