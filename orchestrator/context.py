"""What the steps of one run share: ``RunContext`` (the runbook, the state store, the archive, the
stop event, the driver instances) and ``MachineContext`` (one machine's target, guest and resource
logs), and how a step is recorded: ``RunContext.record`` skips a step already done, marks it
running, runs it, and stores its result or error (``orchestrator/state.py``).

Steps get a context instead of an engine object, so each is a plain function of one job
(``orchestrator/steps.py``) and the run loop (``orchestrator/engine.py``) only orders them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifeboat.archive import Archive
from lifeboat.orchestrator.hooks import HookFailed, run_hook
from lifeboat.orchestrator.runbook import Hook, Machine, Runbook
from lifeboat.orchestrator.state import DbResourceLog, StateStore
from lifeboat.plumbing.errors import LifeboatError
from lifeboat.targets import TARGETS
from lifeboat.targets.base import Disk, Guest, HasConsole, NetworkSpec, Target, TargetContext


class StepFailed(LifeboatError):
    """A step of a machine failed; the message says which and why (``lifeboat teardown`` shows it)."""


class Interrupted(Exception):
    """The run was asked to stop (SIGINT/SIGTERM); it can be resumed."""


def archive_location(runbook: Runbook, archive: str | None) -> str:
    """``--archive``, else the runbook's ``archive:``, else ``$LIFEBOAT_ARCHIVE``, else
    ``./lifeboat-archive``; local paths made absolute (the NBD server runs elsewhere)."""
    loc = archive or runbook.archive or os.environ.get("LIFEBOAT_ARCHIVE") or "./lifeboat-archive"
    return loc if "://" in loc else str(Path(loc).resolve())


class RunContext:
    """One run of one runbook, as its steps see it; ``run_id`` is set once the run is chosen."""

    def __init__(
        self,
        runbook: Runbook,
        state: StateStore,
        *,
        archive: str,
        key_file: str | None,
        stop: threading.Event,
        log: Callable[[str], None],
    ) -> None:
        self.rb = runbook
        self.state = state
        self.archive = archive
        self.key_file = key_file
        self.stop = stop
        self.run_id = ""
        self._log = log
        self._targets: dict[str, Target] = {}
        self._targets_lock = threading.Lock()
        self._arc: Archive | None = None

    def event(self, message: str, machine: str = "", step: str = "", level: str = "info") -> None:
        """Record an event and show it on stderr."""
        self.state.event(self.run_id, message, machine, step, level)
        stamp = time.strftime("%H:%M:%S")
        who = f"{machine}: " if machine else ""
        self._log(f"[{stamp}] {self.rb.name}: {who}{message}")

    def target_context(self) -> TargetContext:
        """What a driver instance gets from the engine (its messages become debug events)."""
        return TargetContext(log=lambda msg: self.event(msg, level="debug"), archive=self.archive_handle)

    def target(self, machine: Machine) -> Target:
        """The driver instance for a machine (one per driver and settings)."""
        key = f"{machine.driver}:{sorted(machine.settings.items())!r}"
        with self._targets_lock:
            if key not in self._targets:
                cls = TARGETS.get(machine.driver).variant(machine.settings)
                self._targets[key] = cls(machine.settings, self.target_context())
            return self._targets[key]

    def archive_handle(self) -> Archive:
        """The archive, opened once."""
        if self._arc is None:
            self._arc = Archive.open(self.archive, key_file=self.key_file)
        return self._arc

    def workdir(self, machine: str) -> Path:
        """Where a machine's work files go (``_run`` for run-level hooks)."""
        return self.state.dir / "runs" / self.run_id / (machine or "_run")

    def machine(self, machine: Machine) -> MachineContext:
        """The context of one machine of this run."""
        ports = sorted({int(c.spec["port"]) for c in machine.health if c.kind == "tcp" and "host" not in c.spec})
        guest = Guest(
            name=machine.name,
            run_id=self.run_id,
            workdir=self.workdir(machine.name),
            runbook=self.rb.name,
            network=NetworkSpec(self.rb.network_mode, dict(self.rb.mappings), ports),
            needs_agent=any(c.kind == "command" and c.spec.get("in", "guest") == "guest" for c in machine.health),
        )
        return MachineContext(
            run=self,
            machine=machine,
            target=self.target(machine),
            guest=guest,
            engine_log=DbResourceLog(self.state, self.run_id, machine.name, "engine"),
            driver_log=DbResourceLog(self.state, self.run_id, machine.name, machine.driver),
        )

    def env(self, mc: MachineContext | None) -> dict[str, str]:
        """``LIFEBOAT_*`` variables for hooks and host commands."""
        env = {
            "LIFEBOAT_RUNBOOK": self.rb.name,
            "LIFEBOAT_RUN_ID": self.run_id,
            "LIFEBOAT_KIND": self.rb.kind,
            "LIFEBOAT_ARCHIVE": self.archive,
        }
        if mc is not None:
            env["LIFEBOAT_MACHINE"] = mc.name
            point = mc.result("resolve")
            if point:
                env["LIFEBOAT_POINT"] = point["point"]
                env["LIFEBOAT_POINT_TIME"] = point["time"]
            url = mc.result("export").get("url")
            if url:
                env["LIFEBOAT_NBD_URL"] = url
            console = mc.target.console_path(mc.guest, mc.driver_log) if isinstance(mc.target, HasConsole) else None
            if console is not None:
                env["LIFEBOAT_CONSOLE"] = str(console)
            for k, v in (mc.machine.reip or {}).items():
                env[f"LIFEBOAT_REIP_{k.upper()}"] = ",".join(v) if isinstance(v, list) else str(v)
        return env

    def record(self, machine: str, step: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        """Run ``fn`` as a recorded step, unless it is already done; its result."""
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
        except (LifeboatError, OSError) as e:
            self.state.finish_step(self.run_id, machine, step, "failed", error=str(e))
            self.event(f"{step} failed: {e}", machine, step, "error")
            raise StepFailed(f"{machine or self.rb.name}: {step}: {e}") from e
        self.state.finish_step(self.run_id, machine, step, "done", result=result)
        return result

    def hooks(self, mc: MachineContext | None, when: str) -> None:
        """Run the hooks of one moment (``before_boot``, …; the run's own with ``mc`` None), each
        a recorded step ``hook.WHEN.I``."""
        name = mc.name if mc else ""
        hooks = (mc.machine.hooks if mc else self.rb.hooks).get(when, [])
        workdir = self.workdir(name)
        workdir.mkdir(parents=True, exist_ok=True)
        for i, hook in enumerate(hooks):
            step = f"hook.{when}.{i}"

            def go(hook: Hook = hook, step: str = step) -> dict[str, Any]:
                try:
                    return {"output": run_hook(hook, env=self.env(mc), base=self.rb.path.parent, workdir=workdir)}
                except HookFailed as e:
                    if hook.on_failure == "continue":
                        self.event(f"hook failed, continuing: {e}", name, step, "warning")
                        return {"failed": str(e)}
                    raise

            self.record(name, step, go)


@dataclass
class MachineContext:
    """One machine of a run: its driver instance, the guest the driver sees, and the resource logs
    of the engine and of the driver."""

    run: RunContext
    machine: Machine
    target: Target
    guest: Guest
    engine_log: DbResourceLog
    driver_log: DbResourceLog

    @property
    def name(self) -> str:
        """The machine's name."""
        return self.machine.name

    def result(self, step: str) -> dict[str, Any]:
        """The stored result of one of this machine's steps ({} if it has none)."""
        st = self.run.state.step(self.run.run_id, self.name, step)
        return (st.result if st else None) or {}

    def disk(self) -> Disk:
        """The machine's disk as the ``resolve`` and ``export`` steps left it."""
        return disk_of(int(self.result("resolve")["size"]), self.result("export"), self.run.archive_handle)

    def step(self, step: str, fn: Callable[[MachineContext], dict[str, Any] | None]) -> dict[str, Any]:
        """Run one step function for this machine, recorded."""
        return self.run.record(self.name, step, lambda: fn(self))


def disk_of(size: int, export: dict[str, Any], open_archive: Callable[[], Archive] | None = None) -> Disk:
    """The ``Disk`` a driver sees, from the point's size and the ``export`` step's result (a
    streamed image is made from the point read through ``open_archive``)."""
    selector = export.get("stream_point")

    def open_image() -> Iterator[bytes]:
        from lifeboat.exporters import image_stream

        assert open_archive is not None and selector is not None
        arc = open_archive()
        return image_stream(str(export["image_format"]), arc.reader(arc.resolve(selector)))

    return Disk(
        open_image=open_image if selector and open_archive is not None else None,
        size=size,
        nbd_url=export.get("url"),
        image_path=Path(export["image_path"]) if export.get("image_path") else None,
        image_format=export.get("image_format"),
        local_path=Path(export["local_path"]) if export.get("local_path") else None,
        point=export.get("point"),
    )
