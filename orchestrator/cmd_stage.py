"""``lifeboat stage RUNBOOK``: bring the copies that targets keep ahead of a failover (EBS
snapshots for ``aws``) up to each machine's newest point, so that a failover starts from them.

Thin: load and validate the runbook, call ``api.stage``, print. Exit 1 when any machine failed
(its line names it and the error); running the command again resumes.
"""

from __future__ import annotations

import sys

import click

from lifeboat.orchestrator import api
from lifeboat.orchestrator.cli import archive_location, command, emit_json, json_option, key_file_option
from lifeboat.orchestrator.cmd_run import load_or_exit


@command(name="stage")
@click.argument("runbook", type=click.Path(dir_okay=False))
@json_option
def stage_cmd(runbook: str, as_json: bool) -> None:
    """Stage every machine of RUNBOOK whose target keeps a copy ahead, up to its newest point."""
    rb = load_or_exit(runbook)
    doc = api.stage(rb, archive=archive_location(), key_file=key_file_option())
    if as_json:
        emit_json(doc)
    else:
        for m in doc["machines"]:
            if m["error"]:
                click.echo(f"{m['name']}: FAILED: {m['error']}")
            elif m.get("already_staged"):
                click.echo(f"{m['name']}: point {m['point']} already staged as {m['snapshot_id']}")
            else:
                kind = f"child of {m['parent']}" if m.get("parent") else "full copy"
                click.echo(f"{m['name']}: point {m['point']} staged as {m['snapshot_id']} ({kind}): "
                           f"{m['blocks']} blocks, {m['bytes_sent']} bytes in {m['seconds']:.1f} s")
    if any(m["error"] for m in doc["machines"]):
        sys.exit(1)
