"""Archive commands: ``archive init``, ``backup``, ``points``, ``restore``, ``verify``, ``prune``, ``replicate``."""

from __future__ import annotations

import sys
from contextlib import ExitStack

import click

from lifeboat.archive import Archive
from lifeboat.archive.points import check_machine
from lifeboat.archive.prune import prune
from lifeboat.archive.replicate import replicate
from lifeboat.archive.restore import restore
from lifeboat.archive.retention import RULES, check_policy
from lifeboat.archive.store import DEFAULT_CHUNK_SIZE, resolve_location
from lifeboat.archive.verify import verify
from lifeboat.orchestrator.cli import (
    LazyGroup,
    archive_location,
    cli,
    command,
    emit_json,
    json_option,
    key_file_option,
    open_archive,
    parse_size,
)
from lifeboat.orchestrator.console import log, progress
from lifeboat.orchestrator.sources import open_source


@cli.group("archive", cls=LazyGroup, lazy_subcommands={"serve": "lifeboat.orchestrator.cmd_agent"})
def archive_group() -> None:
    """Create and configure an archive."""


@command(archive_group, name="init")
@click.option("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, show_default=True,
              help="Chunk size in bytes (a power of two, 4 KiB to 16 MiB).")
@click.option("--encrypt", is_flag=True, help="Encrypt chunks with AES-256-GCM.")
@click.option("--compression-level", type=click.IntRange(1, 19), default=3, show_default=True)
@json_option
def archive_init(chunk_size: int, encrypt: bool, compression_level: int, as_json: bool) -> None:
    """Create an empty archive (with --encrypt, a missing --key-file is created with a new random key)."""
    arc = Archive.init(archive_location(), chunk_size=chunk_size, encrypt=encrypt,
                       key_file=key_file_option(), level=compression_level)
    doc = {"archive": arc.backend.location, "chunk_size": chunk_size, "encrypted": encrypt}
    if as_json:
        emit_json(doc)
    else:
        log(f"created archive {arc.backend.location} (chunk size {chunk_size}, encrypted: {encrypt})")


@command(archive_group, name="retention")
@click.option("--keep-last", type=click.IntRange(0), help="Keep the N newest points.")
@click.option("--keep-hourly", type=click.IntRange(0))
@click.option("--keep-daily", type=click.IntRange(0))
@click.option("--keep-weekly", type=click.IntRange(0))
@click.option("--keep-monthly", type=click.IntRange(0))
@click.option("--keep-yearly", type=click.IntRange(0))
@click.option("--clear", is_flag=True, help="Remove the policy (keep every point).")
@json_option
def archive_retention(clear: bool, as_json: bool, **rules: int | None) -> None:
    """Show or set the retention policy that ``prune`` applies."""
    arc = open_archive()
    policy = {} if clear else dict(arc.config.get("retention") or {})
    changes = {k: v for k, v in rules.items() if v is not None}
    if clear or changes:
        policy.update(changes)
        arc.config["retention"] = check_policy({k: v for k, v in policy.items() if v})
        arc.save_config()
    shown = {r: arc.config["retention"].get(r, 0) for r in RULES}
    if as_json:
        emit_json(shown)
    else:
        click.echo(" ".join(f"{k.replace('_', '-')}={v}" for k, v in shown.items()))


@command(name="backup")
@click.argument("machine")
@click.argument("source")
@click.option("--index", "index_files", is_flag=True,
              help="Then record the point's file lists for 'lifeboat files find' (boots a libguestfs "
                   "appliance: 20 s or more).")
@json_option
def backup_cmd(machine: str, source: str, index_files: bool, as_json: bool) -> None:
    """Store a new recovery point of MACHINE read from SOURCE.

    The point's file index is recorded only with --index: the appliance it boots (20-50 s) would
    multiply the run time of an incremental backup of seconds, which is a script's or a timer's
    backup window. 'lifeboat protect' indexes each point in the background; 'lifeboat files index
    MACHINE' indexes every point without an index, in one appliance.
    """
    check_machine(machine)
    arc = open_archive()
    from lifeboat.agent.plan import plan_backup, run_plan  # change tracking: what to read, then commit/abort

    with open_source(source) as src:
        plan = plan_backup(arc, machine, src)
        with progress(f"backup {machine}", plan.to_read) as advance:
            info = run_plan(arc, machine, src, plan, progress=advance)
    doc = info.to_json() | plan.to_json()
    if index_files:
        from lifeboat.orchestrator.api import files_index  # libguestfs and the NBD server: only when asked

        doc["index"] = files_index(arc, [f"{machine}@{info.point}"], log=log)[0]
    if as_json:
        emit_json(doc)
    else:
        why = f" ({plan.fallback_reason})" if plan.fallback_reason else ""
        log(f"{machine}@{info.point}: {plan.mode} backup{why}, {info.bytes_read} bytes read, "
            f"{info.bytes_new} new, {info.bytes_stored} stored")


@command(name="points")
@click.argument("machine")
@json_option
def points_cmd(machine: str, as_json: bool) -> None:
    """List the recovery points of MACHINE, oldest first."""
    arc = open_archive()
    pts = arc.points(machine)
    if as_json:
        emit_json([p.to_json() for p in pts])
        return
    if not pts:
        log(f"machine {machine!r} has no points")
    for p in pts:
        click.echo(f"{p.point}  {p.time}  size={p.size}  new={p.bytes_new}  parent={p.parent or '-'}")


@command(name="restore")
@click.argument("selector", metavar="MACHINE[@WHEN]")
@click.argument("dest")
@click.option("--force", is_flag=True, help="Replace DEST if it is an existing file.")
@json_option
def restore_cmd(selector: str, dest: str, force: bool, as_json: bool) -> None:
    """Write a point to DEST: a new (sparse) file or a block device."""
    arc = open_archive()
    info = arc.resolve(selector)
    reader = arc.reader(info)
    with progress(f"restore {info.machine}@{info.point}", info.size) as advance:
        restore(reader, dest, force=force, progress=advance)
    if as_json:
        emit_json({"machine": info.machine, "point": info.point, "time": info.time, "dest": dest,
                   "size": info.size})
    else:
        log(f"restored {info.machine}@{info.point} ({info.time}) to {dest}")


@command(name="verify")
@json_option
def verify_cmd(as_json: bool) -> None:
    """Read and check every chunk; exit 1 if anything is damaged or missing."""
    arc = open_archive()
    with progress("verify", sum(arc.backend.size(k) for k in arc.backend.list("packs/"))) as advance:
        report = verify(arc, progress=advance)
    if as_json:
        emit_json(report.to_json())
    else:
        log(f"verify: {report.packs} packs, {report.chunks} chunks, {report.points} points checked")
        for name, why in {**report.bad_packs, **report.bad_chunks, **report.bad_points}.items():
            log(f"BAD {name}: {why}")
        log("verify: OK" if report.ok else "verify: DAMAGED")
    if not report.ok:
        sys.exit(1)


@command(name="prune")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
@json_option
def prune_cmd(dry_run: bool, as_json: bool) -> None:
    """Apply the retention policy, roll up incrementals and free unreferenced space."""
    arc = open_archive()
    report = prune(arc, dry_run=dry_run)
    if as_json:
        emit_json(report.to_json())
        return
    verb = "would remove" if dry_run else "removed"
    for p in report.removed:
        log(f"{verb} {p.machine}@{p.point} ({p.time})")
    log(f"prune: {len(report.removed)} points {verb}, {len(report.kept)} kept, "
        f"{report.packs_deleted} packs deleted, {report.packs_rewritten} rewritten, {report.bytes_freed} bytes freed")


@command(name="replicate")
@click.argument("machines", nargs=-1, metavar="[MACHINE...]")
@click.option("--to", "dest", required=True, metavar="DEST",
              help="The replica: an archive directory, an archive server URL (https://...) or an S3 URL.")
@click.option("--bwlimit", metavar="BYTES", help="Read at most this many bytes/s from the source (e.g. 20M).")
@json_option
def replicate_cmd(machines: tuple[str, ...], dest: str, bwlimit: str | None, as_json: bool) -> None:
    """Copy to DEST the points (of MACHINEs, else all) and packs it lacks, and remove there the
    points the source's prune removed; exit 1 if a point could not be copied (a damaged source pack)."""
    limit = parse_size(bwlimit, "--bwlimit") if bwlimit is not None else None
    with ExitStack() as bar:  # the bar stays on screen until the copy is over
        report = replicate(resolve_location(archive_location()), dest, machines, key_file=key_file_option(),
                           bwlimit=limit,
                           progress=lambda total: bar.enter_context(progress(f"replicate to {dest}", total)))
    if as_json:
        emit_json(report.to_json())
    else:
        if report.initialised:
            log(f"replicate: initialised a replica of the source archive at {report.to}")
        for name, why in report.refused.items():
            log(f"NOT COPIED {name}: {why}")
        log(f"replicate: {len(report.points_published)} points published, {report.points_in_step} already there, "
            f"{report.objects_copied} objects ({report.bytes_copied} bytes) copied, lag {report.lag_seconds:.0f} s")
        if report.points_removed:
            log(f"replicate: pruned at the source, so removed at {report.to}: {', '.join(report.points_removed)} "
                f"({report.packs_removed} packs deleted)")
    if not report.ok:
        sys.exit(1)
