"""The runbook engine: a state machine persisted in SQLite that resumes where it stopped.

A run has three phases: ``recover`` (machines in parallel where their dependencies allow), then
``teardown`` (per the runbook's policy, dependents first), then ``done`` (reports written). Each
machine goes through fixed steps::

    resolve -> prepare -> export -> provision -> hooks.before_boot -> boot -> health
            -> hooks.after_healthy -> localize          (dependents start once it is healthy)
    teardown: hooks.before_teardown -> teardown

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
from pathlib import Path
from typing import Any

from lifeboat.archive import Archive
from lifeboat.archive.errors import Locked
from lifeboat.orchestrator.console import log as console_log
from lifeboat.orchestrator.exports import find_export, start_export, stop_export
from lifeboat.orchestrator.health import run_check
from lifeboat.orchestrator.hooks import HookFailed, run_hook
from lifeboat.orchestrator.runbook import Hook, Machine, Runbook
from lifeboat.orchestrator.state import DbResourceLog, Run, State
from lifeboat.plumbing.errors import LifeboatError, UsageError
from lifeboat.targets import driver_class
from lifeboat.targets.base import (
    BootsFromNbd,
    Disk,
    Guest,
    HasConsole,
    Localizes,
    NetworkSpec,
    TakesImage,
    Target,
    TargetContext,
    TargetError,
    capabilities,
)

RECOVER_STEPS = ["resolve", "prepare", "export", "provision", "boot", "health", "localize"]


class StepFailed(Exception):
    """A step of a machine failed; the message says which and why."""


class Interrupted(Exception):
    """The run was asked to stop (SIGINT/SIGTERM); it can be resumed."""


@dataclass
class Outcome:
    """What ``Engine.run`` did: the run, and whether it was resumed or only reported."""

    run: Run
    report: dict[str, Any]
    resumed: bool
    already_done: bool = False


class Engine:
    """Runs one runbook against one state directory (see the module docstring)."""

    def __init__(
        self,
        runbook: Runbook,
        state: State,
        *,
        archive: str | None = None,
        key_file: str | None = None,
        log: Callable[[str], None] = console_log,
    ) -> None:
        self.rb = runbook
        self.state = state
        self.archive = archive_location(runbook, archive)
        self.key_file = key_file or runbook.key_file
        self._log = log
        self.stop = threading.Event()
        self._targets: dict[str, Target] = {}
        self._targets_lock = threading.Lock()
        self.run_id = ""
        self._arc: Archive | None = None

    # -- helpers ------------------------------------------------------------------------------
    def event(self, message: str, machine: str = "", step: str = "", level: str = "info") -> None:
        """Record an event and show it on stderr."""
        self.state.event(self.run_id, message, machine, step, level)
        stamp = time.strftime("%H:%M:%S")
        who = f"{machine}: " if machine else ""
        self._log(f"[{stamp}] {self.rb.name}: {who}{message}")

    def target(self, machine: Machine) -> Target:
        """The driver instance for a machine (one per driver and settings)."""
        key = f"{machine.driver}:{sorted(machine.settings.items())!r}"
        with self._targets_lock:
            if key not in self._targets:
                cls = driver_class(machine.driver).variant(machine.settings)
                ctx = TargetContext(state_dir=self.state.dir, log=lambda msg: self.event(msg, level="debug"))
                self._targets[key] = cls(machine.settings, ctx)
            return self._targets[key]

    def archive_handle(self) -> Archive:
        """The archive, opened once."""
        if self._arc is None:
            self._arc = Archive.open(self.archive, key_file=self.key_file)
        return self._arc

    def guest(self, machine: Machine) -> Guest:
        """The Guest a driver sees for ``machine`` in this run."""
        ports = sorted({int(c.spec["port"]) for c in machine.health if c.kind == "tcp" and "host" not in c.spec})
        return Guest(
            name=machine.name,
            run_id=self.run_id,
            workdir=self.state.dir / "runs" / self.run_id / machine.name,
            network=NetworkSpec(self.rb.network_mode, dict(self.rb.mappings), ports),
            needs_agent=any(c.kind == "command" and c.spec.get("in", "guest") == "guest" for c in machine.health),
        )

    def engine_log(self, machine: str) -> DbResourceLog:
        """The engine's own resources for a machine (workdir, export)."""
        return DbResourceLog(self.state, self.run_id, machine, "engine")

    def driver_log(self, machine: Machine) -> DbResourceLog:
        """The driver's resources for a machine."""
        return DbResourceLog(self.state, self.run_id, machine.name, machine.driver)

    def env(self, machine: Machine | None) -> dict[str, str]:
        """``LIFEBOAT_*`` variables for hooks and host commands."""
        env = {
            "LIFEBOAT_RUNBOOK": self.rb.name,
            "LIFEBOAT_RUN_ID": self.run_id,
            "LIFEBOAT_KIND": self.rb.kind,
            "LIFEBOAT_ARCHIVE": self.archive,
        }
        if machine is not None:
            env["LIFEBOAT_MACHINE"] = machine.name
            res = self.state.step(self.run_id, machine.name, "resolve")
            if res and res.result:
                env["LIFEBOAT_POINT"] = res.result["point"]
                env["LIFEBOAT_POINT_TIME"] = res.result["time"]
            ex = self.state.step(self.run_id, machine.name, "export")
            if ex and ex.result and ex.result.get("url"):
                env["LIFEBOAT_NBD_URL"] = ex.result["url"]
            target = self.target(machine)
            console = (
                target.console_path(self.guest(machine), self.driver_log(machine))
                if isinstance(target, HasConsole)
                else None
            )
            if console is not None:
                env["LIFEBOAT_CONSOLE"] = str(console)
            for k, v in (machine.reip or {}).items():
                env[f"LIFEBOAT_REIP_{k.upper()}"] = ",".join(v) if isinstance(v, list) else str(v)
        return env

    def _step(self, machine: str, step: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        """Run ``fn`` as a recorded step, unless it is already done."""
        st = self.state.step(self.run_id, machine, step)
        if st is not None and st.status == "done":
            return st.result or {}
        if self.stop.is_set():
            raise Interrupted()
        again = st is not None and st.status in ("running", "failed")
        self.state.start_step(self.run_id, machine, step)
        self.event(f"{step}{' (again)' if again else ''}", machine, step)
        try:
            result = fn() or {}
        except Interrupted:
            raise
        except (LifeboatError, TargetError, HookFailed, StepFailed, OSError) as e:
            self.state.finish_step(self.run_id, machine, step, "failed", error=str(e))
            self.event(f"{step} failed: {e}", machine, step, "error")
            raise StepFailed(f"{machine or self.rb.name}: {step}: {e}") from e
        self.state.finish_step(self.run_id, machine, step, "done", result=result)
        return result

    def _hooks(self, machine: Machine | None, when: str, hooks: list[Hook]) -> None:
        name = machine.name if machine else ""
        workdir = self.state.dir / "runs" / self.run_id / (name or "_run")
        workdir.mkdir(parents=True, exist_ok=True)
        for i, hook in enumerate(hooks):

            def go(hook: Hook = hook, step: str = f"hook.{when}.{i}") -> dict[str, Any]:
                try:
                    return {"output": run_hook(hook, env=self.env(machine), base=self.rb.path.parent, workdir=workdir)}
                except HookFailed as e:
                    if hook.on_failure == "continue":
                        self.event(f"hook failed, continuing: {e}", name, step, "warning")
                        return {"failed": str(e)}
                    raise

            self._step(name, f"hook.{when}.{i}", go)

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
                self.run_id = latest.id
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
        from lifeboat.orchestrator.reports import build_report, write_reports

        lock = self._lock()
        try:
            run, resumed, done = self._choose()
            self.run_id = run.id
            if done:
                self.event(f"already done by run {run.id} (its machines were kept): nothing to do")
                return Outcome(run, run.report or build_report(self), False, True)
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
                current = self.state.run(run.id)
                assert current is not None
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
            current = self.state.run(run.id)
            assert current is not None
            if current.status != "interrupted":
                ok = all(s == "succeeded" for s in self.machine_statuses().values())
                status = "succeeded" if ok and current.phase == "done" else "failed"
                self.state.update_run(run.id, finished=time.time(), status=status)
            report = build_report(self)
            report["files"] = write_reports(self, report)
            self.state.update_run(run.id, report=report)
            current = self.state.run(run.id)
            assert current is not None
            return Outcome(current, report, resumed)
        finally:
            os.close(lock)

    def machine_statuses(self) -> dict[str, str]:
        """Each machine's status (succeeded, failed, blocked, incomplete) from its steps."""
        from lifeboat.orchestrator.reports import machine_status

        steps: dict[str, dict[str, Any]] = {}
        for st in self.state.steps(self.run_id):
            steps.setdefault(st.machine, {})[st.step] = st
        return {m.name: machine_status(steps.get(m.name, {}), self.rb.move_to_local) for m in self.rb.machines}

    def _recover(self) -> dict[str, str]:
        """Recover every machine, in parallel where dependencies allow; their final statuses."""
        self._hooks(None, "before_run", self.rb.hooks.get("before_run", []))
        status: dict[str, str] = {m.name: "pending" for m in self.rb.machines}
        healthy: set[str] = set()
        events: queue.Queue[tuple[str, str]] = queue.Queue()

        def work(m: Machine) -> None:
            try:
                self._recover_machine(m, lambda: events.put(("healthy", m.name)))
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
                            self.run_id,
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
        self._hooks(None, "after_run", self.rb.hooks.get("after_run", []))
        return status

    def _recover_machine(self, m: Machine, on_healthy: Callable[[], None]) -> None:
        target = self.target(m)
        guest = self.guest(m)
        elog = self.engine_log(m.name)
        tlog = self.driver_log(m)

        def resolve() -> dict[str, Any]:
            info = self.archive_handle().resolve(m.selector)
            return {"point": info.point, "time": info.time, "size": info.size, "machine": info.machine}

        point = self._step(m.name, "resolve", resolve)

        def prepare() -> dict[str, Any]:
            target.prepare()
            if not target.supports_network(self.rb.network_mode):
                raise TargetError(f"the {target.name} target cannot provide a {self.rb.network_mode!r} network")
            elog.record("dir", str(guest.workdir), {})
            guest.workdir.mkdir(parents=True, exist_ok=True)
            return {"workdir": str(guest.workdir)}

        self._step(m.name, "prepare", prepare)

        def export() -> dict[str, Any]:
            selector = f"{point['machine']}@{point['point']}"
            if isinstance(target, BootsFromNbd):
                local = target.local_disk_path(guest) or guest.workdir / "disk.raw"
                if not local.parent.exists():
                    elog.record("dir", str(local.parent), {})
                    local.parent.mkdir(parents=True, mode=0o755)
                ex = start_export(
                    selector,
                    archive=self.archive,
                    key_file=self.key_file,
                    token=guest.token,
                    workdir=guest.workdir,
                    hydrate_to=local,
                    log=elog,
                )
                return {"url": ex.url, "local_path": str(local), "pid": ex.pid}
            if isinstance(target, TakesImage):
                from lifeboat.exporters import writer

                fmt = target.image_formats()[0]
                image = guest.workdir / f"disk.{fmt}"
                elog.record("file", str(image), {})
                arc = self.archive_handle()
                info = arc.resolve(selector)
                writer(fmt).write(arc.reader(info), image, overwrite=True)
                return {"image_path": str(image), "image_format": fmt}
            raise TargetError(f"the {target.name} target neither boots from NBD nor takes an image")

        ex = self._step(m.name, "export", export)
        disk = Disk(
            size=int(point["size"]),
            nbd_url=ex.get("url"),
            image_path=Path(ex["image_path"]) if ex.get("image_path") else None,
            image_format=ex.get("image_format"),
            local_path=Path(ex["local_path"]) if ex.get("local_path") else None,
        )

        self._step(m.name, "provision", lambda: target.provision(guest, disk, tlog) or {})
        self._hooks(m, "before_boot", m.hooks.get("before_boot", []))

        def boot() -> dict[str, Any]:
            target.boot(guest, tlog)
            return {"booted_at": time.time()}

        self._step(m.name, "boot", boot)

        def health() -> dict[str, Any]:
            results = []
            poll = lambda: target.poll(guest, tlog)  # noqa: E731
            for check in m.health:
                r = run_check(check, target, guest, tlog, self.env(m), self.stop.is_set, poll)
                results.append(r.__dict__)
                self.event(
                    f"health check {check.name}: {'passed' if r.ok else 'FAILED'} ({r.detail})",
                    m.name,
                    "health",
                    "info" if r.ok else "error",
                )
                if self.stop.is_set() and not r.ok:
                    raise Interrupted()
                if not r.ok:
                    self.state.finish_step(
                        self.run_id,
                        m.name,
                        "health",
                        "failed",
                        result={"checks": results, "console_tail": self._console_tail(target, guest, tlog)},
                        error=f"health check {check.name} failed: {r.detail}",
                    )
                    raise StepFailed(f"health check {check.name} failed: {r.detail}")
            if not m.health:
                poll()
            passed = [r["passed_at"] for r in results if r["passed_at"]]
            return {
                "checks": results,
                "healthy_at": max(passed) if passed else time.time(),
                "console_tail": self._console_tail(target, guest, tlog),
            }

        self._step(m.name, "health", health)
        self._hooks(m, "after_healthy", m.hooks.get("after_healthy", []))
        on_healthy()

        def localize() -> dict[str, Any]:
            if not (self.rb.move_to_local and isinstance(target, Localizes)):
                return {"skipped": "move_to_local is off" if not self.rb.move_to_local else "not supported"}
            running = find_export(elog, guest.token)
            if running is None:
                raise TargetError("the NBD export is gone before the disk was hydrated")
            last = -1
            while not running.hydrated():
                if self.stop.is_set():
                    raise Interrupted()
                if not running.alive():
                    raise TargetError("lifeboat serve exited before hydration completed")
                done, total = running.hydration()
                pct = done * 100 // total
                if pct // 10 != last // 10:
                    self.event(f"hydrating the local disk: {pct}%", m.name, "localize")
                    last = pct
                time.sleep(0.5)
            target.move_to_local(guest, disk, tlog)
            stop_export(elog, guest.token)
            return {"local_disk": str(disk.local_path), "moved_at": time.time()}

        self._step(m.name, "localize", localize)

    @staticmethod
    def _console_tail(target: Target, guest: Guest, tlog: DbResourceLog, lines: int = 30) -> list[str]:
        from lifeboat.orchestrator.health import console_text

        if not isinstance(target, HasConsole):
            return []
        text = console_text(target.console_path(guest, tlog))
        return [ln for ln in text.splitlines() if ln.strip()][-lines:]

    # -- teardown ---------------------------------------------------------------------------------
    def teardown_run(self, run_id: str) -> None:
        """Tear down every machine of a run, dependents first; resumable like any step."""
        self.run_id = run_id
        order = [n for wave in reversed(self.rb.waves()) for n in wave]
        for name in order:
            self._teardown_machine(self.rb.machine(name))
        # machines that are no longer in the runbook (or disabled) but left resources behind
        for name in sorted(self._machines_with_resources() - set(order) - {""}):
            self._teardown_leftover(name)

    def _machines_with_resources(self) -> set[str]:
        return {
            row["machine"]
            for row in self.state._q(
                "SELECT DISTINCT machine FROM resources WHERE run_id = ? AND destroyed IS NULL", (self.run_id,)
            )
        }

    def _teardown_machine(self, m: Machine) -> None:
        resolve = self.state.step(self.run_id, m.name, "resolve")
        if resolve is None or resolve.status == "skipped":
            return  # never started: nothing to tear down
        try:
            self._hooks(m, "before_teardown", m.hooks.get("before_teardown", []))
        except StepFailed as e:
            self.event(f"before_teardown hook failed, tearing down all the same: {e}", m.name, level="warning")

        def teardown() -> dict[str, Any]:
            target = self.target(m)
            tlog = self.driver_log(m)
            n_driver = len(tlog.resources())
            target.teardown(tlog)
            elog = self.engine_log(m.name)
            n_engine = len(elog.resources())
            _teardown_engine(elog)
            return {"driver_resources": n_driver, "engine_resources": n_engine}

        self._step(m.name, "teardown", teardown)

    def _teardown_leftover(self, machine: str) -> None:
        """Resources of a machine the runbook no longer names: the drivers that made them are
        known from each resource's owner."""
        for owner in {r.owner for r in self.state.resources(self.run_id, machine)}:
            log = DbResourceLog(self.state, self.run_id, machine, owner)
            if owner == "engine":
                _teardown_engine(log)
            else:
                cls = driver_class(owner)
                ctx = TargetContext(state_dir=self.state.dir, log=lambda msg: self.event(msg, level="debug"))
                cls({}, ctx).teardown(log)



def archive_location(runbook: Runbook, archive: str | None) -> str:
    """``--archive``, else the runbook's ``archive:``, else ``$LIFEBOAT_ARCHIVE``, else
    ``./lifeboat-archive``; local paths made absolute (the export server runs elsewhere)."""
    loc = archive or runbook.archive or os.environ.get("LIFEBOAT_ARCHIVE") or "./lifeboat-archive"
    return loc if "://" in loc else str(Path(loc).resolve())


def plan(rb: Runbook, *, archive: str | None = None, key_file: str | None = None) -> dict[str, Any]:
    """What a run would do, resolving points if the archive can be opened; changes nothing (no
    state database is opened)."""
    location = archive_location(rb, archive)
    arc_note = None
    arc: Archive | None
    try:
        arc = Archive.open(location, key_file=key_file or rb.key_file)
    except LifeboatError as e:
        arc, arc_note = None, str(e)
    machines = []
    for m in rb.machines:
        entry: dict[str, Any] = {
            "name": m.name,
            "point": m.selector,
            "driver": m.driver,
            "depends_on": m.depends_on,
            "source": m.source_kind,
            "rto_objective": m.rto_objective,
            "health": [{"name": c.name, "kind": c.kind, **c.spec, "timeout": c.timeout} for c in m.health],
            "hooks": {w: [h.name for h in hs] for w, hs in m.hooks.items()},
        }
        if arc is not None:
            try:
                info = arc.resolve(m.selector)
                entry["resolved"] = {"point": info.point, "time": info.time, "size": info.size}
            except LifeboatError as e:
                entry["resolved"] = {"error": str(e)}
        cls = driver_class(m.driver).variant(m.settings)
        entry["capabilities"] = capabilities(cls)
        entry["settings"] = {
            **{k: v["default"] for k, v in cls.schema().get("properties", {}).items() if "default" in v},
            **m.settings,
        }
        entry["steps"] = [s for s in RECOVER_STEPS if s != "localize" or rb.move_to_local]
        machines.append(entry)
    return {
        "runbook": rb.name,
        "path": str(rb.path),
        "kind": rb.kind,
        "archive": location,
        "archive_error": arc_note,
        "network": rb.network_mode,
        "teardown": rb.teardown,
        "move_to_local": rb.move_to_local,
        "waves": rb.waves(),
        "machines": machines,
        "hooks": {w: [h.name for h in hs] for w, hs in rb.hooks.items()},
        "schedule": rb.schedule,
    }


def _teardown_engine(log: DbResourceLog) -> None:
    """Destroy the engine's resources of a machine (export server, its files, the workdir)."""
    from lifeboat.targets.base import destroy_generic

    for res in reversed(log.resources()):
        destroy_generic(res)
        log.forget(res)
