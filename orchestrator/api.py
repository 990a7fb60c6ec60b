"""The orchestrator's facade: what the CLI, the scheduler and the web pane call.

``run`` (run or resume a runbook), ``replicate`` (run a replication runbook), ``plan`` (what a
run would do; changes nothing), ``teardown`` (remove what a runbook's newest run left), ``status``
(a run's report, built from its records),
``runs`` (the runs of a state store), ``events_after`` (a run's events a follower has not seen),
``latest_runs`` (the newest run of each runbook), ``verifying_runs`` (what "last verified" reads),
``stage`` (bring the copies of targets that stage ahead up to each machine's newest point),
``machine_states`` / ``archive_totals`` (each machine's newest point and RPO age, what the archive
holds, from ``archive.catalog.Catalog``'s summaries), ``point_files`` / ``files_fs`` / ``files_ls`` /
``files_get`` / ``files_index`` / ``files_find`` / ``mount`` (single-item restore and the file
index), and ``open_state`` (the state store of a state folder: the one place that picks its
implementation). Front-ends load and validate the runbook
(``orchestrator/runbook.py``) and print; everything between is behind these functions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.catalog import MachineSummary
from lifeboat.archive.errors import MissingChunk
from lifeboat.archive.fileindex import INDEX_PREFIX, Match, PointGone, find, read_manifest, reuse_index
from lifeboat.archive.points import parse_selector
from lifeboat.archive.replicate import ReplicationReport
from lifeboat.archive.replicate import replicate as replicate_archive
from lifeboat.filerestore import Drive, GuestSession, PointFiles, check_dest, indexed
from lifeboat.filerestore.mount import check_mountpoint, mount_until_unmounted
from lifeboat.nbdserver import Export, open_volume
from lifeboat.nbdserver.background import BackgroundServer
from lifeboat.orchestrator.console import log as console_log
from lifeboat.orchestrator.context import archive_location
from lifeboat.orchestrator.engine import Engine, Outcome
from lifeboat.orchestrator.reports import build_report
from lifeboat.orchestrator.runbook import Runbook
from lifeboat.orchestrator.state import Run, SqliteState, StateStore
from lifeboat.orchestrator.steps import RECOVER_STEPS
from lifeboat.plumbing.errors import LifeboatError, UsageError
from lifeboat.plumbing.nbd import NbdUrl
from lifeboat.plumbing.registry import NotAvailable
from lifeboat.targets import TARGETS, driver_schema
from lifeboat.targets.base import MemoryLog, StagesAhead, Sweeps, TargetContext, capabilities


def open_state(state_dir: Path | str | None = None) -> StateStore:
    """The state store of a state folder (``--state``, else ``$LIFEBOAT_STATE_DIR``, else the XDG
    default): SQLite today."""
    return SqliteState(state_dir)


def run(
    runbook: Runbook,
    state: StateStore,
    *,
    archive: str | None = None,
    key_file: str | None = None,
    stop: threading.Event | None = None,
    log: Callable[[str], None] = console_log,
) -> Outcome:
    """Run ``runbook`` (or resume its open run, or report its kept run) to the end; setting
    ``stop`` ends it after the current steps, resumable."""
    check_drivers(runbook)
    engine = Engine(runbook, state, archive=archive, key_file=key_file, stop=stop or threading.Event(), log=log)
    return engine.run()


def replicate(
    runbook: Runbook,
    state: StateStore,
    *,
    archive: str | None = None,
    key_file: str | None = None,
    bwlimit: int | None = None,
    log: Callable[[str], None] = console_log,
) -> tuple[Run, ReplicationReport | None]:
    """A replication runbook's run: one ``replicate`` of its machines to its ``to``, recorded in
    the state store like every run (events, status; the ``--json`` document as its report), so
    the scheduler, ``lifeboat runs`` and the web pane show it. A failed copy is resumed by the
    next run (replicate copies only what DEST lacks). ``bwlimit``: its ``bwlimit`` in bytes/s."""
    spec = runbook.replicate or {}
    run = state.new_run(runbook.name, str(runbook.path), runbook.digest, runbook.kind)

    def event(message: str, level: str = "info") -> None:
        state.event(run.id, message, level=level)
        log(f"{runbook.name}: {message}")

    event(f"run {run.id} started: replicate to {spec.get('to')}")
    report: ReplicationReport | None = None
    try:
        report = replicate_archive(archive_location(runbook, archive), spec["to"], spec.get("machines", ()),
                                   key_file=key_file or runbook.key_file, bwlimit=bwlimit)
    except LifeboatError as e:
        event(f"replicate failed: {e}", level="error")
        state.update_run(run.id, status="failed", phase="done", finished=time.time(), report={"error": str(e)})
    else:
        for point, why in report.refused.items():
            event(f"{point} not published: {why}", level="error")
        event(f"{len(report.points_published)} points published, {report.bytes_copied} bytes copied, "
              f"lag {report.lag_seconds:.0f} s")
        state.update_run(run.id, status="succeeded" if report.ok else "failed", phase="done", finished=time.time(),
                         report=report.to_json())
    found = state.run(run.id)
    assert found is not None
    return found, report


def sweep(runbook: Runbook, state: StateStore, *, log: Callable[[str], None] = console_log) -> dict[str, Any]:
    """``teardown --force``: ask each target of ``runbook`` that ``Sweeps`` to remove, by tag,
    what the runbook's runs created that no open run of the local state store owns (a run not
    done, or one keeping resources), even when the store that recorded it is lost. Idempotent."""
    check_drivers(runbook)
    sweeping = [m for m in runbook.machines if issubclass(TARGETS.get(m.driver).variant(m.settings), Sweeps)]
    if not sweeping:
        raise UsageError(f"runbook {runbook.path}: teardown --force finds resources by tag, which no target of "
                         f"this runbook can (drivers: {', '.join(sorted({m.driver for m in runbook.machines}))}); "
                         f"run 'lifeboat teardown' without --force")
    keep = {r.id for r in state.runs(runbook.name) if r.phase != "done" or state.resources(r.id)}
    context = TargetContext(log=log)
    removed: list[dict[str, str]] = []
    seen: set[str] = set()
    for m in sweeping:
        key = f"{m.driver}:{sorted(m.settings.items())!r}"
        if key in seen:
            continue
        seen.add(key)
        target = TARGETS.get(m.driver).variant(m.settings)(m.settings, context)
        assert isinstance(target, Sweeps)
        removed += [{"driver": m.driver, **r} for r in target.sweep(runbook.name, keep, log)]
    return {"runbook": runbook.name, "kept_runs": sorted(keep), "removed": removed,
            "not_swept": sorted({m.name for m in runbook.machines} - {m.name for m in sweeping})}


@dataclass
class TeardownOutcome:
    """What ``teardown`` removed."""

    run: Run
    resources_removed: int


def teardown(
    runbook: Runbook,
    state: StateStore,
    *,
    archive: str | None = None,
    key_file: str | None = None,
    log: Callable[[str], None] = console_log,
) -> TeardownOutcome:
    """Remove everything the newest run of ``runbook`` created and left (kept machines, a crashed
    run), and close that run."""
    latest = state.latest_run(runbook.name)
    if latest is None:
        raise UsageError(f"runbook {runbook.name!r} has no runs in {state.dir}")
    engine = Engine(runbook, state, archive=archive, key_file=key_file, stop=threading.Event(), log=log)
    before = len(state.resources(latest.id))
    engine.teardown_run(latest.id)
    status = latest.status if latest.phase == "done" and runbook.teardown != "never" else "torn-down"
    if latest.status == "running":
        status = "interrupted"
    state.update_run(latest.id, phase="done", status=status if status != "succeeded" else "torn-down")
    after = state.run(latest.id)
    assert after is not None
    return TeardownOutcome(after, before - len(state.resources(latest.id)))


def status(
    runbook: Runbook, state: StateStore, run_id: str | None = None, *, archive: str | None = None
) -> dict[str, Any]:
    """The report document of a run of ``runbook`` (its newest, unless ``run_id``), built from its
    records now: a running run's report shows its progress."""
    found = state.run(run_id) if run_id else state.latest_run(runbook.name)
    if found is None or found.runbook != runbook.name:
        what = f"run {run_id}" if run_id else "runs"
        raise UsageError(f"runbook {runbook.name!r} has no {what} in {state.dir}")
    steps, events = state.steps(found.id), state.events(found.id)
    return build_report(runbook, found, steps, events, archive_location(runbook, archive))


def runs(state: StateStore, runbook: str | None = None) -> list[Run]:
    """The runs in ``state`` (of one runbook, by name), oldest first."""
    return state.runs(runbook)


def run_fields(r: Run) -> dict[str, Any]:
    """A run's own fields as every front-end shows them (``lifeboat runs --json``, the web pane)."""
    return {
        "id": r.id,
        "runbook": r.runbook,
        "kind": r.kind,
        "status": r.status,
        "phase": r.phase,
        "started": r.started,
        "finished": r.finished,
        "resumes": r.resumes,
    }


def events_after(state: StateStore, run_id: str, after: int = 0) -> list[dict[str, Any]]:
    """The events of run ``run_id`` after event id ``after`` (0: all), each with its ``id``: what a
    live view streams, resuming where it stopped."""
    return state.events_after(run_id, after)


def latest_runs(state: StateStore) -> list[Run]:
    """The newest run of each runbook in ``state``, by runbook name."""
    return state.newest_runs()


def verifying_runs(state: StateStore) -> list[Run]:
    """The rehearsals ``overview.last_verified`` needs: per machine its newest succeeded one and its
    newest one (a bounded read for a dashboard refreshed every 30 s)."""
    return state.verifying_runs()


RPO_STATUSES = ("compliant", "exceeded", "critical")


def rpo_status(age: float, objective: float) -> str:
    """``compliant`` while the newest point is no older than the objective, ``exceeded`` up to
    twice it (one capture missed), ``critical`` beyond (protection has stopped)."""
    if age <= objective:
        return "compliant"
    return "exceeded" if age <= 2 * objective else "critical"


def machine_states(
    summaries: dict[str, MachineSummary],
    rpo_objective: float,
    now: float | None = None,
    objectives: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Per machine (``GET /api/machines`` of shared/CLI.md): its point count, newest point and its
    time, the newest point's age in seconds against its objective (``objectives``, else
    ``rpo_objective``), and the RPO status."""
    at = time.time() if now is None else now
    out = []
    for machine, s in sorted(summaries.items()):
        objective = (objectives or {}).get(machine, rpo_objective)
        age = round(max(0.0, at - s.newest.when.timestamp()), 3)
        out.append(
            {
                "machine": machine,
                "points": s.points,
                "newest_point": s.newest.point,
                "newest_time": s.newest.time,
                "rpo_age_seconds": age,
                "rpo_objective_seconds": objective,
                "status": rpo_status(age, objective),
            }
        )
    return out


def archive_totals(summaries: dict[str, MachineSummary]) -> dict[str, Any]:
    """What the archive holds: machines, points, the bytes the points describe (``logical``) and
    the bytes their captures added to the store (``stored``, after dedup and compression)."""
    logical = sum(s.logical_bytes for s in summaries.values())
    stored = sum(s.stored_bytes for s in summaries.values())
    return {
        "machines": len(summaries),
        "points": sum(s.points for s in summaries.values()),
        "logical_bytes": logical,
        "stored_bytes": stored,
        "reduction": round(logical / stored, 2) if stored else None,
    }


def plan(runbook: Runbook, *, archive: str | None = None, key_file: str | None = None) -> dict[str, Any]:
    """What a run would do, resolving points if the archive can be opened; changes nothing (no
    state store is opened)."""
    rb = runbook
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
            "rpo_objective": m.rpo_objective,
            "health": [{"name": c.name, "kind": c.kind, **c.spec, "timeout": c.timeout} for c in m.health],
            "hooks": {w: [h.name for h in hs] for w, hs in m.hooks.items()},
        }
        if arc is not None:
            try:
                info = arc.resolve(m.selector)
                entry["resolved"] = {"point": info.point, "time": info.time, "size": info.size}
            except LifeboatError as e:
                entry["resolved"] = {"error": str(e)}
        entry["driver_error"] = None
        entry["capabilities"] = []
        try:
            cls = TARGETS.get(m.driver).variant(m.settings)
            entry["capabilities"] = capabilities(cls)
            schema = cls.schema()
        except NotAvailable as e:
            entry["driver_error"] = str(e)
            schema = driver_schema(m.driver) or {}
        entry["settings"] = {
            **{k: v["default"] for k, v in schema.get("properties", {}).items() if "default" in v},
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


def stage(
    runbook: Runbook,
    *,
    archive: str | None = None,
    key_file: str | None = None,
    only: str | None = None,
    log: Callable[[str], None] = console_log,
) -> dict[str, Any]:
    """Bring, for every machine of ``runbook`` whose target stages ahead (``StagesAhead``), the
    target's copy up to the point the machine's selector names (``only``: just the runbook's
    machines whose points are that archive machine's); a machine that fails is reported with its
    error (``error``) and the others are staged all the same. Running it again resumes: what is
    staged already is found again by the target, not sent twice."""
    check_drivers(runbook)
    staging = [m for m in runbook.machines if issubclass(TARGETS.get(m.driver).variant(m.settings), StagesAhead)
               and (only is None or parse_selector(m.selector)[0] == only)]
    if not staging:
        whose = f"of machine {only}'s points " if only else ""
        raise UsageError(f"runbook {runbook.path}: no machine {whose}has a target that stages ahead (drivers: "
                         f"{', '.join(sorted({m.driver for m in runbook.machines}))})")
    location = archive_location(runbook, archive)
    arc = Archive.open(location, key_file=key_file or runbook.key_file)
    context = TargetContext(log=log, archive=lambda: arc)
    machines = []
    for m in staging:
        t0 = time.monotonic()
        entry: dict[str, Any] = {"name": m.name, "driver": m.driver, "error": None}
        try:
            info = arc.resolve(m.selector)
            target = TARGETS.get(m.driver).variant(m.settings)(m.settings, context)
            assert isinstance(target, StagesAhead)
            entry.update(target.stage(info.machine, info.point, MemoryLog(m.driver)))
        except LifeboatError as e:
            entry["error"] = f"machine {m.name}: {e}"
            log(f"lifeboat: stage: {entry['error']}")
        entry["seconds"] = round(time.monotonic() - t0, 3)
        machines.append(entry)
    return {"runbook": runbook.name, "archive": location, "machines": machines}


def unavailable_drivers(runbook: Runbook) -> list[str]:
    """One line per machine whose driver is not in this version of lifeboat (planned, or a
    plug-in that is not installed): the runbook is valid, but cannot run here."""
    out = []
    for m in runbook.machines:
        try:
            TARGETS.get(m.driver)
        except NotAvailable as e:
            out.append(f"runbook {runbook.path}: machine {m.name}: {e}")
    return out


def check_drivers(runbook: Runbook) -> None:
    """Raise ``NotAvailable`` (exit status 2) if a machine's driver is not in this version of
    lifeboat: a run then stops before it creates anything, and a dry run says so after its plan."""
    missing = unavailable_drivers(runbook)
    if missing:
        raise NotAvailable("; ".join(missing))


# -- file-level restore (issue 16): one point's files without restoring its disk --------------


@contextmanager
def point_files(archive: Archive, infos: list[PointInfo],
                log: Callable[[str], None] = console_log) -> Iterator[list[PointFiles]]:
    """The files of ``infos``' points, one disk each, in one libguestfs appliance (it boots once,
    20 s or more) reading them over NBD from a read-only server on a thread of this process."""
    exports = [Export(f"{i.machine}@{i.point}", open_volume(archive, i)) for i in infos]
    with BackgroundServer(exports, log=log) as srv, \
            GuestSession([Drive(srv.host, srv.port, e.name) for e in exports]) as session:
        yield [session.disk(n) for n in range(len(infos))]


def files_fs(archive: Archive, selector: str, *, read_disk: bool = False) -> tuple[dict[str, Any], bool]:
    """The partitions, LVM volumes, file systems and operating systems found on a point's disk; and
    whether the file index answered. The index answers when it recorded them (no appliance to boot),
    unless ``read_disk``; otherwise (no index, or one written before they were recorded) the
    appliance reads the disk."""
    info = archive.resolve(selector)
    if not read_disk:
        found = indexed.disk(archive, info)
        if found is not None:
            return found, True
    with point_files(archive, [info]) as (files,):
        return files.fs(), False


def files_ls(archive: Archive, selector: str, path: str = "/", fs: str | None = None, *,
             read_disk: bool = False) -> tuple[list[dict[str, Any]], bool]:
    """A directory of a point: paths as its operating system mounts them, or within ``fs``; and
    whether the file index answered. The index answers when the point has one (under a second:
    no appliance to boot), unless ``read_disk``; otherwise the appliance reads the disk."""
    info = archive.resolve(selector)
    if not read_disk:
        entries = indexed.ls(archive, info, path, fs)
        if entries is not None:
            return entries, True
    with point_files(archive, [info]) as (files,):
        return files.ls(path, fs), False


def files_get(archive: Archive, selector: str, path: str, dest: Path, fs: str | None = None) -> dict[str, Any]:
    """Copy one file or directory tree of a point out to ``dest`` (a new path), modes and times kept."""
    info = archive.resolve(selector)
    check_dest(dest)  # before the appliance boots: a wrong DEST costs nothing
    with point_files(archive, [info]) as (files,):
        return files.get(path, dest, fs)


def files_index(archive: Archive, selectors: list[str],
                log: Callable[[str], None] = console_log) -> list[dict[str, Any]]:
    """Index the file systems of the points named: ``MACHINE@WHEN`` that point, ``MACHINE`` alone
    every point of it without an index; all in one appliance. Per point, what was stored."""
    infos: dict[str, PointInfo] = {}
    for selector in selectors:
        named = archive.resolve(selector)  # an unknown machine or point is refused here, before anything
        found = [named] if "@" in selector else [
            p for p in archive.points(named.machine) if read_manifest(archive, p.machine, p.point) is None]
        infos.update((f"{p.machine}@{p.point}", p) for p in found)
    return index_points(archive, list(infos.values()), log=log)


def index_points(archive: Archive, infos: list[PointInfo],
                 log: Callable[[str], None] = console_log) -> list[dict[str, Any]]:
    """Index ``infos`` (points of one machine). A point whose disk is the same as that of the
    nearest indexed point before or after it (equal chunk tables: nothing changed between two
    captures) gets a copy of that index; the others are read in one appliance. Points pruned
    meanwhile are left out (logged). Per point indexed, what was stored."""
    out = []

    def done(info: PointInfo, stats: dict[str, int], how: str = "") -> None:
        log(f"indexed {info.machine}@{info.point}{how}: {stats['files']} files, {stats['pieces_new']} new pieces "
            f"of {stats['pieces']}")
        out.append({"machine": info.machine, "point": info.point, "time": info.time, **stats})

    def reuse(info: PointInfo, same: PointInfo) -> None:
        try:
            stats = reuse_index(archive, info, same)
        except PointGone as e:
            log(f"not indexed: {e}")
            return
        if stats is not None:
            done(info, stats, f" (the same disk as {same.point})")

    points = {m: archive.points(m) for m in {i.machine for i in infos}}
    have = {m: {k.rsplit("/", 1)[1] for k in archive.backend.list(f"{INDEX_PREFIX}{m}/")} for m in points}
    to_read: list[PointInfo] = []
    twins: list[tuple[PointInfo, PointInfo]] = []  # a point and one read below with the same disk
    for info in sorted(infos, key=lambda p: (p.when, p.point)):
        ids = [p.point for p in points[info.machine]]
        if info.point not in ids:
            log(f"not indexed: {info.machine}@{info.point} was pruned")
            continue
        known = have[info.machine] | {p.point for p in to_read}
        try:
            same = _same_disk(archive, points[info.machine], ids.index(info.point), known)
        except MissingChunk as e:  # pruned while being compared
            log(f"not indexed: {e}")
            continue
        if same is None:
            to_read.append(info)
        elif same.point in have[info.machine]:
            reuse(info, same)
        else:
            twins.append((info, same))
    if to_read:
        with point_files(archive, to_read, log=log) as disks:
            for info, files in zip(to_read, disks, strict=True):
                try:
                    done(info, files.store_index(archive, info))
                except PointGone as e:
                    log(f"not indexed: {e}")
    for info, same in twins:
        reuse(info, same)
    return out


def _same_disk(archive: Archive, points: list[PointInfo], at: int, indexed: set[str]) -> PointInfo | None:
    """Of the points in ``indexed``, the nearest before ``points[at]`` or else the nearest after it,
    if its disk is the same (equal size and chunk table)."""
    info = points[at]
    before = next((p for p in reversed(points[:at]) if p.point in indexed), None)
    after = next((p for p in points[at + 1:] if p.point in indexed), None)
    for other in (before, after):
        if other is not None and other.size == info.size and archive.chunk_table(other) == archive.chunk_table(info):
            return other
    return None


def files_find(archive: Archive, machine: str, pattern: str) -> tuple[list[Match], list[PointInfo]]:
    """Every indexed point of ``machine`` holding a path that matches ``pattern`` (from the index
    alone), and the points without an index."""
    if not archive.points(machine):
        raise UsageError(f"machine {machine!r} has no points")
    return find(archive, machine, pattern)


def mount(archive: Archive, selector: str, directory: Path, fs: str | None = None,
          on_ready: Callable[[], None] = lambda: None, log: Callable[[str], None] = console_log) -> None:
    """A read-only FUSE view of a point's file systems on ``directory`` until it is unmounted."""
    info = archive.resolve(selector)
    check_mountpoint(directory)  # before the server starts
    export = Export(info.point, open_volume(archive, info))
    with BackgroundServer([export], log=log) as srv:
        mount_until_unmounted(str(NbdUrl(srv.host, srv.port, export.name)), directory, fs, on_ready)
