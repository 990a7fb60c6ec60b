"""Runbook commands: ``run``, ``failover``, ``teardown``, ``validate``, ``runs``, ``scheduler``.

Thin: load and validate the runbook (``orchestrator/runbook.py``), hand it to the orchestrator's
facade (``orchestrator/api.py``), print. A runbook with mistakes prints one line per mistake
(``FILE:LINE:COLUMN: FIELD: message``), runs nothing and exits 2.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from lifeboat.orchestrator import api
from lifeboat.orchestrator.cli import (
    archive_location,
    command,
    emit_json,
    json_option,
    key_file_option,
    parse_size,
)
from lifeboat.orchestrator.console import log
from lifeboat.orchestrator.engine import Outcome
from lifeboat.orchestrator.runbook import InvalidRunbook, Runbook, load, with_points
from lifeboat.orchestrator.state import default_state_dir
from lifeboat.plumbing.errors import UsageError

state_option = click.option(
    "--state",
    "state_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="State folder: state.db, work files, reports (else $LIFEBOAT_STATE_DIR, else ~/.local/state/lifeboat).",
)


def load_or_exit(path: str) -> Runbook:
    """The validated runbook, or each problem on its own line and exit status 2."""
    try:
        return load(path)
    except InvalidRunbook as e:
        for problem in e.problems:
            log(str(problem))
        n = len(e.problems)
        log(f"lifeboat: runbook {path} has {n} mistake{'s' if n != 1 else ''}; nothing was run")
        sys.exit(2)


def _signals(stop: threading.Event) -> None:
    """SIGINT/SIGTERM ask the engine to stop between steps (the run can be resumed); a second
    SIGINT stops at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log(f"lifeboat: {signal.Signals(signum).name}: stopping after the current step (run again to resume)")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def summary(outcome: Outcome) -> dict[str, Any]:
    """The ``--json`` document of ``run``/``failover`` (``shared/CLI.md``)."""
    r = outcome.report
    return {
        "runbook": r["runbook"],
        "run_id": r["run_id"],
        "kind": r["kind"],
        "status": r["status"],
        "resumed": outcome.resumed,
        "already_done": outcome.already_done,
        "machines": [
            {
                k: m[k]
                for k in (
                    "name",
                    "status",
                    "point",
                    "point_time",
                    "rto_seconds",
                    "rpo_seconds",
                    "rto_objective_seconds",
                    "rto_met",
                    "error",
                )
            }
            for m in r["machines"]
        ],
        "report": r.get("files", {}),
    }


def _replicate(rb: Runbook, *, dry_run: bool, as_json: bool, state_dir: str | None) -> None:
    """A replication runbook: ``replicate`` to its ``to``, recorded as a run; exit 1 unless every
    point is off-site."""
    spec = rb.replicate or {}
    rate = parse_size(spec["bwlimit"], f"{rb.path}: replicate.bwlimit") if "bwlimit" in spec else None
    if dry_run:
        doc = {"runbook": rb.name, "kind": rb.kind, "path": str(rb.path), "replicate": spec}
        if as_json:
            emit_json(doc)
        else:
            click.echo(f"runbook {rb.name} (replication): {rb.path}")
            click.echo(f"  replicate {' '.join(spec.get('machines', [])) or 'every machine'} to {spec['to']}"
                       + (f" at most {spec['bwlimit']}/s" if rate else ""))
        return
    run, report = api.replicate(rb, api.open_state(state_dir), archive=archive_location(),
                                key_file=key_file_option(), bwlimit=rate)
    if as_json:
        emit_json({"runbook": rb.name, "run_id": run.id, "kind": rb.kind, "status": run.status,
                   "replication": report.to_json() if report else None,
                   "error": (run.report or {}).get("error")})
    else:
        click.echo(f"{rb.name}: {run.status} (run {run.id})")
    if run.status != "succeeded":
        sys.exit(1)


def _execute(path: str, *, dry_run: bool, as_json: bool, state_dir: str | None, yes: bool, on_call: bool,
             points: tuple[str, ...] = ()) -> None:
    rb = with_points(load_or_exit(path), point_options(points))
    if rb.kind == "replication":
        if on_call:
            raise UsageError(f"{path}: this runbook is a replication; run it with 'lifeboat run'")
        _replicate(rb, dry_run=dry_run, as_json=as_json, state_dir=state_dir)
        return
    if on_call and rb.kind == "rehearsal":
        raise UsageError(f"{path}: this runbook is a rehearsal; run it with 'lifeboat run'")
    if rb.kind == "failover" and not dry_run and not yes:
        raise UsageError(
            f"{path}: a failover brings production machines up elsewhere; confirm with --yes (or try --dry-run first)"
        )
    if dry_run:
        doc = api.plan(rb, archive=archive_location(), key_file=key_file_option())
        if as_json:
            emit_json(doc)
        else:
            print_plan(doc)
        api.check_drivers(rb)  # the plan is shown; the exit status says the run would not start here
        return
    stop = threading.Event()
    _signals(stop)
    outcome = api.run(rb, api.open_state(state_dir), archive=archive_location(), key_file=key_file_option(), stop=stop)
    doc = summary(outcome)
    if as_json:
        emit_json(doc)
    else:
        for m in doc["machines"]:
            rto = f"{m['rto_seconds']:.1f} s" if m["rto_seconds"] is not None else "-"
            rpo = f"{m['rpo_seconds']:.0f} s" if m["rpo_seconds"] is not None else "-"
            click.echo(
                f"{m['name']}: {m['status']}  point {m['point']}  RTO {rto}  RPO {rpo}"
                + (f"  ({m['error']})" if m["error"] else "")
            )
        click.echo(f"{doc['runbook']}: {doc['status']} (run {doc['run_id']})")
        for fmt, file in doc["report"].items():
            click.echo(f"report ({fmt}): {file}")
    if outcome.run.status == "interrupted":
        sys.exit(130)
    if outcome.run.status != "succeeded":
        sys.exit(1)


def print_plan(plan: dict[str, Any]) -> None:
    """The dry-run plan, for people."""
    click.echo(f"runbook {plan['runbook']} ({plan['kind']}): {plan['path']}")
    click.echo(
        f"archive {plan['archive']}" + (f"  [cannot open: {plan['archive_error']}]" if plan["archive_error"] else "")
    )
    click.echo(
        f"network {plan['network']}; teardown {plan['teardown']}; move to local disk: {plan['move_to_local']}"
        + (f"; schedule {plan['schedule']!r}" if plan["schedule"] else "")
    )
    for w, hooks in plan["hooks"].items():
        click.echo(f"run hooks {w}: {', '.join(hooks)}")
    by_name = {m["name"]: m for m in plan["machines"]}
    for i, wave in enumerate(plan["waves"], 1):
        click.echo(f"wave {i} (in parallel): {', '.join(wave)}")
        for name in wave:
            m = by_name[name]
            res = m.get("resolved") or {}
            point = f"{res['point']} ({res['time']})" if "point" in res else res.get("error", "not resolved")
            click.echo(f"  {name}: {m['point']} -> {point}")
            click.echo(f"    target {m['driver']} {m['settings']}")
            if m["driver_error"]:
                click.echo(f"    target not available: {m['driver_error']}")
            if m["depends_on"]:
                click.echo(f"    after: {', '.join(m['depends_on'])}")
            click.echo(f"    steps: {' -> '.join(m['steps'])}")
            for c in m["health"]:
                click.echo(f"    health: {c['name']} ({c['kind']}, timeout {c['timeout']:.0f} s)")
            for w, hooks in m["hooks"].items():
                click.echo(f"    hooks {w}: {', '.join(hooks)}")
    click.echo("dry run: nothing was changed")


@command(name="run")
@click.argument("runbook", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; change nothing.")
@click.option("--yes", is_flag=True, help="Confirm a failover runbook (as 'lifeboat failover --yes').")
@click.option("--point", "points", multiple=True, metavar="NAME=MACHINE@WHEN",
              help="Boot machine NAME of the runbook from this point instead of its own (repeatable).")
@state_option
@json_option
def run_cmd(runbook: str, dry_run: bool, yes: bool, points: tuple[str, ...], state_dir: str | None,
            as_json: bool) -> None:
    """Run RUNBOOK (or resume its interrupted run); exit 0 only if every machine succeeded."""
    _execute(runbook, dry_run=dry_run, as_json=as_json, state_dir=state_dir, yes=yes, on_call=False, points=points)


def point_options(values: tuple[str, ...]) -> dict[str, str]:
    """``--point NAME=SELECTOR`` values by machine name."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, selector = value.partition("=")
        if not sep or not name or not selector:
            raise UsageError(f"--point {value!r}: expected NAME=MACHINE@WHEN, e.g. web01=web01@2026-11-25T09:00")
        if name in out:
            raise UsageError(f"--point: machine {name!r} is given twice")
        out[name] = selector
    return out


@command(name="failover")
@click.argument("runbook", type=click.Path(dir_okay=False))
@click.option("--yes", is_flag=True, help="Required: this brings production up elsewhere, with no prompts.")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; change nothing.")
@state_option
@json_option
def failover_cmd(runbook: str, yes: bool, dry_run: bool, state_dir: str | None, as_json: bool) -> None:
    """The on-call path: run a failover or recovery RUNBOOK with no prompts; safe to run again."""
    if not yes and not dry_run:
        raise UsageError("lifeboat failover changes where production runs: add --yes to confirm")
    _execute(runbook, dry_run=dry_run, as_json=as_json, state_dir=state_dir, yes=True, on_call=True)


@command(name="teardown")
@click.argument("runbook", type=click.Path(dir_okay=False))
@click.option(
    "--yes", is_flag=True, help="Required for failover and recovery runbooks (their machines are production)."
)
@click.option(
    "--force", is_flag=True,
    help="Also find by tag, and remove, what any run of RUNBOOK left that no open run of the local state "
         "owns (a crashed run recorded on another host or in a lost state directory).",
)
@state_option
@json_option
def teardown_cmd(runbook: str, yes: bool, force: bool, state_dir: str | None, as_json: bool) -> None:
    """Remove everything the newest run of RUNBOOK created and left (kept machines, a crashed run)."""
    rb = load_or_exit(runbook)
    if rb.kind != "rehearsal" and not yes:
        raise UsageError(f"{runbook}: tearing down a {rb.kind} stops machines that may be serving: add --yes")
    if force:
        swept = api.sweep(rb, api.open_state(state_dir))
        if as_json:
            emit_json(swept)
        else:
            for name in swept["not_swept"]:
                log(f"{rb.name}: machine {name}: its target cannot find resources by tag: not swept")
            log(f"{rb.name}: teardown --force removed {len(swept['removed'])} resources")
        return
    done = api.teardown(rb, api.open_state(state_dir), archive=archive_location(), key_file=key_file_option())
    doc = {"runbook": rb.name, "run_id": done.run.id, "resources_removed": done.resources_removed}
    if as_json:
        emit_json(doc)
    else:
        log(f"{rb.name}: run {done.run.id}: removed {doc['resources_removed']} resources")


@command(name="validate")
@click.argument("runbooks", nargs=-1, required=True, type=click.Path(dir_okay=False))
@json_option
def validate_cmd(runbooks: tuple[str, ...], as_json: bool) -> None:
    """Check runbooks; print each mistake as FILE:LINE:COLUMN: FIELD: message; exit 2 if any.
    A valid runbook naming a driver this version lacks gets a warning: it cannot run here."""
    problems: list[str] = []
    warnings: list[str] = []
    for path in runbooks:
        try:
            warnings += api.unavailable_drivers(load(path))
        except InvalidRunbook as e:
            problems += [str(p) for p in e.problems]
    if as_json:
        emit_json({"valid": not problems, "problems": problems, "warnings": warnings})
    else:
        for p in problems:
            log(p)
        for w in warnings:
            log(f"warning: {w}: it validates, but cannot run here")
        if not problems:
            log(f"{len(runbooks)} runbook{'s' if len(runbooks) != 1 else ''} valid")
    if problems:
        sys.exit(2)


@command(name="runs")
@click.argument("runbook", required=False)
@state_option
@json_option
def runs_cmd(runbook: str | None, state_dir: str | None, as_json: bool) -> None:
    """List runs (of one runbook name) with their status."""
    rows = api.runs(api.open_state(state_dir), runbook)
    if as_json:
        emit_json(
            [
                {**api.run_fields(r), "report": (r.report or {}).get("files")}
                for r in rows
            ]
        )
        return
    for r in rows:
        click.echo(f"{r.id}  {r.runbook}  {r.kind}  {r.status}  phase={r.phase}  resumes={r.resumes}")


@command(name="scheduler")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--once", is_flag=True, help="Start the runs that are due or were missed, wait for them, exit.")
@click.option(
    "--systemd-units",
    "units_dir",
    type=click.Path(file_okay=False),
    help="Write a .service and .timer per scheduled runbook into this folder, and exit.",
)
@state_option
def scheduler_cmd(paths: tuple[str, ...], once: bool, units_dir: str | None, state_dir: str | None) -> None:
    """Run the schedules of the runbooks in PATHS (files or folders; else $LIFEBOAT_RUNBOOKS, else
    /etc/lifeboat/runbooks) until stopped, catching up on missed runs."""
    import os

    from lifeboat.orchestrator.scheduler import Scheduler, find_runbooks, write_systemd_units

    roots = [Path(p) for p in paths] or [Path(os.environ.get("LIFEBOAT_RUNBOOKS", "/etc/lifeboat/runbooks"))]
    for root in roots:
        if not root.exists():
            raise UsageError(f"scheduler: {root}: no such file or folder")
    extra = []
    if archive_location():
        extra += ["--archive", str(archive_location())]
    sdir = Path(state_dir) if state_dir else default_state_dir()
    if units_dir:
        scheduled = find_runbooks(roots, log)
        for f in write_systemd_units(scheduled, Path(units_dir), state_dir=sdir.resolve(), extra_args=extra):
            click.echo(str(f))
        return
    sched = Scheduler(roots, api.open_state(sdir), extra_args=extra, log=log)
    if once:
        sys.exit(sched.run_once())
    _signals(sched.stop)
    sched.run_forever()
