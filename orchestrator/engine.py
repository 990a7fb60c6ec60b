"""The run loop: a state machine persisted in the state store that resumes where it stopped.

A run has three phases: ``recover`` (machines in parallel where their dependencies allow), then
``teardown`` (per the runbook's policy, dependents first), then ``done`` (reports written). Each
machine goes through the fixed steps of ``orchestrator/steps.py``; this module chooses the run,
orders the machines in waves, runs them in parallel, and handles interruption.

Every step is recorded (``orchestrator/state.py``) before and after it runs, and is idempotent: a
step recorded as done is skipped, and a step that was running when the orchestrator died runs
again and adopts what it finds (a running QEMU, a listening ``lifeboat serve``) through the
resources recorded for it. So ``lifeboat run`` of an interrupted runbook (even after ``kill -9``)
continues the same run, and ``lifeboat failover`` can simply be run again.

Which run a command continues: the newest run of the runbook (by name) if it is still open (its
phase is not ``done``); a finished run whose machines were kept (failover, recovery) makes the
command report that run again instead of recovering twice; otherwise a new run starts. A changed
runbook file does not silently continue an open run: an open rehearsal is torn down and a new run
starts; an open failover stops with an error (exit 2) until the operator decides.
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lifeboat.archive.errors import Locked
from lifeboat.orchestrator.context import Interrupted, RunContext, StepFailed, archive_location
from lifeboat.orchestrator.reports import build_report, steps_by_machine, write_reports
from lifeboat.orchestrator.runbook import Machine, Runbook
from lifeboat.orchestrator.state import Run, StateStore
from lifeboat.orchestrator.steps import machine_status, recover_machine, teardown_leftover, teardown_machine
from lifeboat.plumbing.errors import UsageError


@dataclass
class Outcome:
    """What ``Engine.run`` did: the run, and whether it was resumed or only reported."""

    run: Run
    report: dict[str, Any]
    resumed: bool
    already_done: bool = False


class Engine:
    """Runs one runbook against one state store (see the module docstring)."""

    def __init__(
        self,
        runbook: Runbook,
        state: StateStore,
        *,
        archive: str | None,
        key_file: str | None,
        stop: threading.Event,
        log: Callable[[str], None],
    ) -> None:
        self.rb = runbook
        self.state = state
        self.stop = stop
        self.ctx = RunContext(
            runbook,
            state,
            archive=archive_location(runbook, archive),
            key_file=key_file or runbook.key_file,
            stop=stop,
            log=log,
        )

    def event(self, message: str, machine: str = "", level: str = "info") -> None:
        """Record an event of the run and show it on stderr."""
        self.ctx.event(message, machine, level=level)

    # -- choosing the run -----------------------------------------------------------------------
    def _lock(self) -> int:
        locks = self.state.dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{self.rb.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Locked(f"runbook {self.rb.name!r} is being run by another lifeboat process") from None
        return fd

    def _choose(self) -> tuple[Run, bool, bool]:
        """(run, resumed, already_done)."""
        latest = self.state.latest_run(self.rb.name)
        if latest is not None and latest.phase != "done":
            if latest.digest == self.rb.digest:
                return latest, True, False
            if self.rb.kind == "rehearsal":
                self.ctx.run_id = latest.id
                self.event(
                    "the runbook changed since this run was interrupted: tearing it down, starting anew",
                    level="warning",
                )
                self.teardown_run(latest.id)
                self.state.update_run(latest.id, status="abandoned", phase="done", finished=time.time())
            else:
                raise UsageError(
                    f"runbook {self.rb.name!r} changed since run {latest.id} began, and that run is still open "
                    f"(its machines may be running): restore the file to resume it, or run "
                    f"'lifeboat teardown {self.rb.path}' to remove what it created first"
                )
        elif (
            latest is not None
            and latest.status == "succeeded"
            and self.rb.teardown == "never"
            and latest.digest == self.rb.digest
        ):
            return latest, False, True
        return self.state.new_run(self.rb.name, str(self.rb.path), self.rb.digest, self.rb.kind), False, False

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> Outcome:
        """Run (or resume) the runbook to the end; see the module docstring."""
        lock = self._lock()
        try:
            run, resumed, done = self._choose()
            self.ctx.run_id = run.id
            if done:
                self.event(f"already done by run {run.id} (its machines were kept): nothing to do")
                return Outcome(run, run.report or self.report(run), False, True)
            if resumed:
                self.state.update_run(run.id, resumes=run.resumes + 1, status="running", pid=os.getpid())
                self.event(f"resuming run {run.id} (phase {run.phase})", level="warning")
            else:
                self.event(f"run {run.id} started ({self.rb.kind}, {len(self.rb.machines)} machines)")
            try:
                if run.phase == "recover":
                    statuses = self._recover()
                    ok = all(s == "succeeded" for s in statuses.values())
                    policy = self.rb.teardown
                    if policy == "always" or (policy == "on-success" and ok):
                        self.state.update_run(run.id, phase="teardown")
                    elif ok or policy == "on-success":
                        self.state.update_run(run.id, phase="done", status="succeeded" if ok else "failed")
                    else:
                        self.state.update_run(run.id, status="failed")  # stays open: a re-run retries
                current = self._current()
                if current.phase == "teardown":
                    try:
                        self.teardown_run(run.id)
                        self.state.update_run(run.id, phase="done")
                    except StepFailed as e:  # stays in phase teardown: running again retries it
                        self.state.update_run(run.id, status="failed")
                        self.event(f"teardown incomplete ({e}); run the command again to retry", level="error")
            except Interrupted:
                self.state.update_run(run.id, status="interrupted")
                self.event(
                    "interrupted: run the same command again to resume, or 'lifeboat teardown' to remove "
                    "what was created",
                    level="warning",
                )
            current = self._current()
            if current.status != "interrupted":
                ok = all(s == "succeeded" for s in self.machine_statuses().values())
                status = "succeeded" if ok and current.phase == "done" else "failed"
                self.state.update_run(run.id, finished=time.time(), status=status)
            report = self.report(self._current())
            report["files"] = write_reports(
                self.rb, report, self.state.dir, lambda msg, level: self.event(msg, level=level)
            )
            self.state.update_run(run.id, report=report)
            return Outcome(self._current(), report, resumed)
        finally:
            os.close(lock)

    def _current(self) -> Run:
        run = self.state.run(self.ctx.run_id)
        assert run is not None
        return run

    def report(self, run: Run) -> dict[str, Any]:
        """The report document of ``run``, from the state store."""
        return build_report(self.rb, run, self.state.steps(run.id), self.state.events(run.id), self.ctx.archive)

    def machine_statuses(self) -> dict[str, str]:
        """Each machine's status (succeeded, failed, blocked, incomplete) from its steps."""
        steps = steps_by_machine(self.state.steps(self.ctx.run_id))
        return {m.name: machine_status(steps.get(m.name, {}), self.rb.move_to_local) for m in self.rb.machines}

    def _recover(self) -> dict[str, str]:
        """Recover every machine, in parallel where dependencies allow; their final statuses."""
        self.ctx.hooks(None, "before_run")
        status: dict[str, str] = {m.name: "pending" for m in self.rb.machines}
        healthy: set[str] = set()
        events: queue.Queue[tuple[str, str]] = queue.Queue()

        def work(m: Machine) -> None:
            try:
                recover_machine(self.ctx.machine(m), lambda: events.put(("healthy", m.name)))
                events.put(("succeeded", m.name))
            except Interrupted:
                events.put(("interrupted", m.name))
            except StepFailed:
                events.put(("failed", m.name))
            except Exception as e:  # a bug, not a failure of the machine: record it all the same
                self.event(f"internal error: {e!r}", m.name, level="error")
                events.put(("failed", m.name))

        running = 0
        with ThreadPoolExecutor(max_workers=self.rb.max_parallel, thread_name_prefix="machine") as pool:
            while True:
                for m in self.rb.machines:
                    if status[m.name] != "pending":
                        continue
                    if any(status[d] in ("failed", "blocked") for d in m.depends_on):
                        status[m.name] = "blocked"
                        bad = [d for d in m.depends_on if status[d] in ("failed", "blocked")]
                        self.state.finish_step(
                            self.ctx.run_id,
                            m.name,
                            "resolve",
                            "skipped",
                            error=f"blocked: {', '.join(bad)} did not recover",
                        )
                        self.event(
                            f"not recovered: depends on {', '.join(bad)}, which did not recover", m.name, level="error"
                        )
                    elif all(d in healthy for d in m.depends_on) and not self.stop.is_set():
                        status[m.name] = "running"
                        running += 1
                        pool.submit(work, m)
                if running == 0:
                    break
                try:
                    kind, name = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "healthy":
                    healthy.add(name)
                    continue
                running -= 1
                status[name] = kind
                if kind == "succeeded":
                    healthy.add(name)
        if self.stop.is_set() or "interrupted" in status.values():
            raise Interrupted()
        self.ctx.hooks(None, "after_run")
        return status

    # -- teardown ---------------------------------------------------------------------------------
    def teardown_run(self, run_id: str) -> None:
        """Tear down every machine of a run, dependents first; resumable like any step."""
        self.ctx.run_id = run_id
        order = [n for wave in reversed(self.rb.waves()) for n in wave]
        for name in order:
            teardown_machine(self.ctx, self.rb.machine(name))
        # machines that are no longer in the runbook (or disabled) but left resources behind
        for name in sorted(self.state.machines_with_resources(run_id) - set(order) - {""}):
            teardown_leftover(self.ctx, name)
