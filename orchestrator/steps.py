"""The steps of one machine's run, each a function of a ``MachineContext`` with one job::

    resolve -> prepare -> export -> provision -> hooks.before_boot -> boot -> health
            -> hooks.after_healthy -> localize          (dependents start once it is healthy)
    teardown: hooks.before_teardown -> teardown

A step returns its result (stored in the state database); a later step reads what it needs from
the results of earlier ones (``MachineContext.result``), so each step also works when the run is
resumed in a new process. ``export`` gives the target the point's disk: an NBD export served by a
``lifeboat serve`` child (``orchestrator/serving.py``) for targets that boot from NBD, or an image
file written by an exporter for targets that take an image. The stored step name is ``export`` in
both cases, as in state databases written before this module existed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lifeboat.orchestrator.context import Interrupted, MachineContext, RunContext, StepFailed
from lifeboat.orchestrator.health import console_text, run_check
from lifeboat.orchestrator.runbook import Machine
from lifeboat.orchestrator.serving import find_server, start_server, stop_server
from lifeboat.orchestrator.state import DbResourceLog, Step
from lifeboat.targets import TARGETS
from lifeboat.targets.base import (
    BootsFromNbd,
    FillsLocalDisk,
    Guest,
    HasConsole,
    Localizes,
    ResourceLog,
    StagesAhead,
    TakesImage,
    Target,
    TargetError,
    Uploads,
    destroy_generic,
)

if TYPE_CHECKING:
    from lifeboat.archive import Archive

RECOVER_STEPS = ["resolve", "prepare", "export", "provision", "boot", "health", "localize"]


def resolve(ctx: MachineContext) -> dict[str, Any]:
    """Choose the point the machine's selector names."""
    info = ctx.run.archive_handle().resolve(ctx.machine.selector)
    return {"point": info.point, "time": info.time, "size": info.size, "machine": info.machine}


def prepare(ctx: MachineContext) -> dict[str, Any]:
    """Check the target can host the machine on the runbook's network; make its work folder."""
    ctx.target.prepare()
    mode = ctx.run.rb.network_mode
    if not ctx.target.supports_network(mode):
        raise TargetError(f"the {ctx.target.name} target cannot provide a {mode!r} network")
    ctx.engine_log.record("dir", str(ctx.guest.workdir), {})
    ctx.guest.workdir.mkdir(parents=True, exist_ok=True)
    return {"workdir": str(ctx.guest.workdir)}


def export(ctx: MachineContext) -> dict[str, Any]:
    """Give the target the point's disk: serve it over NBD, or write it as an image file."""
    point = ctx.result("resolve")
    return give_disk(
        ctx.target,
        ctx.guest,
        ctx.engine_log,
        f"{point['machine']}@{point['point']}",
        archive=ctx.run.archive,
        key_file=ctx.run.key_file,
        open_archive=ctx.run.archive_handle,
    )


def give_disk(
    target: Target,
    guest: Guest,
    elog: ResourceLog,
    selector: str,
    *,
    archive: str,
    key_file: str | None,
    open_archive: Callable[[], Archive],
) -> dict[str, Any]:
    """The point's disk as ``target`` takes it, its resources recorded in ``elog``: an NBD export
    hydrating a local disk (``BootsFromNbd``), only the point's name for a driver that starts from
    its staged copy (``StagesAhead.starts_from_stage``), the point itself for an ``Uploads`` driver
    that streams its image (raw, qcow2), or an image file in the driver's first format
    (``TakesImage``). The driver suite calls this too, so it tests what the engine does."""
    if isinstance(target, BootsFromNbd):
        local = target.local_disk_path(guest) or guest.workdir / "disk.raw"
        if not local.parent.exists():
            elog.record("dir", str(local.parent), {})
            local.parent.mkdir(parents=True, mode=0o755)
        server = start_server(
            selector,
            archive=archive,
            key_file=key_file,
            token=guest.token,
            workdir=guest.workdir,
            hydrate_to=local,
            log=elog,
        )
        return {"url": server.url, "local_path": str(local), "pid": server.pid, "point": selector}
    if isinstance(target, StagesAhead) and target.starts_from_stage():
        return {"point": selector}
    from lifeboat.exporters import STREAM_FORMATS

    if isinstance(target, Uploads) and target.image_formats()[0] in STREAM_FORMATS:
        return {"stream_point": selector, "image_format": target.image_formats()[0], "point": selector}
    if isinstance(target, TakesImage):
        from lifeboat.exporters import EXPORTERS

        fmt = target.image_formats()[0]
        image = guest.workdir / f"disk.{fmt}"
        elog.record("file", str(image), {})
        arc = open_archive()
        EXPORTERS.get(fmt)().write(arc.reader(arc.resolve(selector)), image, overwrite=True)
        return {"image_path": str(image), "image_format": fmt, "point": selector}
    raise TargetError(f"the {target.name} target neither boots from NBD nor takes an image")


def provision(ctx: MachineContext) -> dict[str, Any]:
    """Create the machine on the target, on the disk of the ``export`` step."""
    return ctx.target.provision(ctx.guest, ctx.disk(), ctx.driver_log) or {}


def boot(ctx: MachineContext) -> dict[str, Any]:
    """Start the machine."""
    ctx.target.boot(ctx.guest, ctx.driver_log)
    return {"booted_at": time.time()}


def health(ctx: MachineContext) -> dict[str, Any]:
    """Run the machine's health checks in order; the first that fails fails the step (its results
    and the console's last lines are stored all the same)."""
    run, m, target, guest, tlog = ctx.run, ctx.machine, ctx.target, ctx.guest, ctx.driver_log
    results = []

    def poll() -> None:
        target.poll(guest, tlog)

    for check in m.health:
        r = run_check(check, target, guest, tlog, run.env(ctx), run.stop.is_set, poll)
        results.append(r.__dict__)
        run.event(
            f"health check {check.name}: {'passed' if r.ok else 'FAILED'} ({r.detail})",
            m.name,
            "health",
            "info" if r.ok else "error",
        )
        if run.stop.is_set() and not r.ok:
            raise Interrupted()
        if not r.ok:
            run.state.finish_step(
                run.run_id,
                m.name,
                "health",
                "failed",
                result={"checks": results, "console_tail": console_tail(ctx)},
                error=f"health check {check.name} failed: {r.detail}",
            )
            raise StepFailed(f"health check {check.name} failed: {r.detail}")
    if not m.health:
        poll()
    passed = [r["passed_at"] for r in results if r["passed_at"]]
    return {
        "checks": results,
        "healthy_at": max(passed) if passed else time.time(),
        "console_tail": console_tail(ctx),
    }


def localize(ctx: MachineContext) -> dict[str, Any]:
    """Wait until the NBD server has hydrated the local disk, move the running machine onto it,
    stop the server (when the runbook asks and the target can); or wait for a driver that fills
    the machine's disk itself (``FillsLocalDisk``)."""
    run, guest = ctx.run, ctx.guest
    if run.rb.move_to_local and isinstance(ctx.target, FillsLocalDisk):  # the driver serves and follows it
        while not ctx.target.filled(guest, ctx.driver_log):
            if run.stop.is_set():
                raise Interrupted()
            ctx.target.poll(guest, ctx.driver_log)
            time.sleep(1)
        return {"local_disk": "filled", "moved_at": time.time()}
    if not (run.rb.move_to_local and isinstance(ctx.target, Localizes)):
        return {"skipped": "move_to_local is off" if not run.rb.move_to_local else "not supported"}
    server = find_server(ctx.engine_log, guest.token)
    if server is None:
        raise TargetError("the NBD server is gone before the disk was hydrated")
    last = -1
    while not server.hydrated():
        if run.stop.is_set():
            raise Interrupted()
        if not server.alive():
            raise TargetError("lifeboat serve exited before hydration completed")
        done, total = server.hydration()
        pct = done * 100 // total
        if pct // 10 != last // 10:
            run.event(f"hydrating the local disk: {pct}%", ctx.name, "localize")
            last = pct
        time.sleep(0.5)
    disk = ctx.disk()
    ctx.target.move_to_local(guest, disk, ctx.driver_log)
    stop_server(ctx.engine_log, guest.token)
    return {"local_disk": str(disk.local_path), "moved_at": time.time()}


def teardown(ctx: MachineContext) -> dict[str, Any]:
    """Remove what the driver and the engine created for the machine, newest first."""
    n_driver = len(ctx.driver_log.resources())
    ctx.target.teardown(ctx.driver_log)
    n_engine = len(ctx.engine_log.resources())
    teardown_engine(ctx.engine_log)
    return {"driver_resources": n_driver, "engine_resources": n_engine}


def console_tail(ctx: MachineContext, lines: int = 30) -> list[str]:
    """The last non-blank lines of the machine's serial console (none without a console)."""
    if not isinstance(ctx.target, HasConsole):
        return []
    text = console_text(ctx.target.console_path(ctx.guest, ctx.driver_log))
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


def teardown_engine(log: DbResourceLog) -> None:
    """Destroy the engine's resources of a machine (NBD server, its files, the workdir)."""
    for res in reversed(log.resources()):
        destroy_generic(res)
        log.forget(res)


# -- the sequences ------------------------------------------------------------------------------
def recover_machine(ctx: MachineContext, on_healthy: Callable[[], None]) -> None:
    """Every recovery step of one machine, in order; ``on_healthy`` once its health passed."""
    for name, fn in (("resolve", resolve), ("prepare", prepare), ("export", export), ("provision", provision)):
        ctx.step(name, fn)
    ctx.run.hooks(ctx, "before_boot")
    ctx.step("boot", boot)
    ctx.step("health", health)
    ctx.run.hooks(ctx, "after_healthy")
    on_healthy()
    ctx.step("localize", localize)


def teardown_machine(run: RunContext, m: Machine) -> None:
    """The ``before_teardown`` hooks (a failure only warns), then the machine's teardown."""
    resolved = run.state.step(run.run_id, m.name, "resolve")
    if resolved is None or resolved.status == "skipped":
        return  # never started: nothing to tear down
    ctx = run.machine(m)
    try:
        run.hooks(ctx, "before_teardown")
    except StepFailed as e:
        run.event(f"before_teardown hook failed, tearing down all the same: {e}", m.name, level="warning")
    ctx.step("teardown", teardown)


def teardown_leftover(run: RunContext, machine: str) -> None:
    """Resources of a machine the runbook no longer names: the drivers that made them are known
    from each resource's owner."""
    for owner in {r.owner for r in run.state.resources(run.run_id, machine)}:
        log = DbResourceLog(run.state, run.run_id, machine, owner)
        if owner == "engine":
            teardown_engine(log)
        else:
            TARGETS.get(owner)({}, run.target_context()).teardown(log)


def machine_status(steps: dict[str, Step], move_to_local: bool) -> str:
    """succeeded | failed | blocked | incomplete, from a machine's step records (by step name)."""
    if "resolve" in steps and steps["resolve"].status == "skipped":
        return "blocked"
    if any(
        s.status == "failed"
        for name, s in steps.items()
        if name in RECOVER_STEPS or name.startswith("hook.") and not name.startswith("hook.before_teardown")
    ):
        return "failed"
    needed = [s for s in RECOVER_STEPS if s != "localize" or move_to_local]
    if all(n in steps and steps[n].status == "done" for n in needed if n != "localize") and (
        "localize" not in needed or ("localize" in steps and steps["localize"].status == "done")
    ):
        return "succeeded"
    return "incomplete"
