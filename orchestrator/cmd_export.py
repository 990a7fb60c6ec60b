"""``lifeboat export MACHINE[@WHEN] OUT --format raw|qcow2|vmdk|vmdk-stream|vhdx``.

Why a command of its own: a point leaves lifeboat as an image file that any hypervisor or cloud
imports. The work is in ``exporters``; this layer parses, reports progress and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lifeboat.exporters import EXPORTERS
from lifeboat.exporters.vmdk import ADAPTERS, DescriptorFields
from lifeboat.orchestrator.cli import command, emit_json, json_option, open_archive
from lifeboat.orchestrator.console import log, progress


@command(name="export")
@click.argument("selector", metavar="MACHINE[@WHEN]")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(EXPORTERS.names()), required=True, help="Image format to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--adapter-type", type=click.Choice(ADAPTERS), default=None,
              help="VMDK ddb.adapterType (default: ide for vmdk, lsilogic for vmdk-stream).")
@json_option
def export_cmd(selector: str, out: Path, fmt: str, force: bool, adapter_type: str | None, as_json: bool) -> None:
    """Write a point of MACHINE as a disk image OUT, streamed from the archive."""
    options: dict[str, Any] = {}
    if adapter_type is not None:
        if not fmt.startswith("vmdk"):
            raise click.UsageError("--adapter-type applies to --format vmdk and vmdk-stream only")
        options["fields"] = DescriptorFields(adapter_type=adapter_type)
    w = EXPORTERS.get(fmt)(**options)
    arc = open_archive()
    info = arc.resolve(selector)
    w.check_size(info.size)
    reader = arc.reader(info)
    with progress(f"export {info.machine}@{info.point} as {fmt}", info.size) as advance:
        result = w.write(reader, out, advance, overwrite=force)
    doc = {
        "machine": info.machine,
        "point": info.point,
        "time": info.time,
        "format": fmt,
        "out": str(out),
        "size": info.size,
        "virtual_size": result.virtual_size,
        "file_size": result.file_size,
        "allocated_bytes": result.allocated_bytes,
        "seconds": round(result.seconds, 3),
    }
    if as_json:
        emit_json(doc)
    else:
        log(f"exported {info.machine}@{info.point} ({info.time}) to {out} as {fmt}: "
            f"{result.file_size} bytes ({result.allocated_bytes} allocated) in {result.seconds:.1f} s")
