"""Agent commands: ``protect`` (continuous capture) and ``archive serve`` (the archive as a service)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from lifeboat.archive import PointInfo
from lifeboat.archive.points import check_machine, parse_selector
from lifeboat.archive.store import CONFIG_KEY, resolve_location
from lifeboat.orchestrator.cli import (
    archive_location,
    command,
    emit_json,
    json_option,
    key_file_option,
    open_archive,
    parse_size,
)
from lifeboat.orchestrator.cmd_archive import archive_group
from lifeboat.orchestrator.console import SELF_COMMAND, log
from lifeboat.plumbing.errors import LifeboatError, UsageError
from lifeboat.plumbing.listen import is_loopback, parse_listen
from lifeboat.plumbing.tls import server_context

if TYPE_CHECKING:
    from lifeboat.agent.indexer import Indexer
    from lifeboat.agent.offsite import Replicator

DEFAULT_SERVE = "127.0.0.1:10810"


class _Signals:
    """First SIGINT/SIGTERM: stop after the current step. Second: interrupt it now."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def __enter__(self) -> _Signals:
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        log(f"lifeboat: {signal.Signals(signum).name} received, stopping (again to interrupt now)")
        self.stop.set()

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@command(name="protect")
@click.argument("machine")
@click.argument("source")
@click.option("--rpo", type=click.FloatRange(min=0.1), required=True,
              help="Recovery point objective: keep the newest point younger than SECONDS.")
@click.option("--status-file", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON status, replaced atomically after every capture and every second.")
@click.option("--metrics-listen", metavar="HOST:PORT",
              help="Serve Prometheus text on http://HOST:PORT/metrics (and JSON on /status).")
@click.option("--metrics-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Prometheus textfile (node_exporter textfile collector), replaced atomically.")
@click.option("--max-backoff", type=click.FloatRange(min=1), default=300, show_default=True,
              help="Longest wait between retries after errors (seconds).")
@click.option("--max-captures", type=click.IntRange(min=1), help="Stop after this many points (tests).")
@click.option("--replicate-to", metavar="DEST",
              help="Replicate the machine's points to DEST (as 'lifeboat replicate --to') after each capture, "
                   "in the background; the lag is in the status and the metrics.")
@click.option("--replicate-bwlimit", metavar="RATE", help="Bandwidth limit of --replicate-to (e.g. 20M, bytes/s).")
@click.option("--no-index", "no_index", is_flag=True,
              help="Do not record each new point's file index (by default it is, in the background: "
                   "'lifeboat files find' and 'files ls' then answer without booting an appliance).")
@click.option("--stage", "stage_runbook", type=click.Path(dir_okay=False),
              help="After each point, stage it (lifeboat stage) for this runbook's machines of MACHINE.")
@json_option
def protect_cmd(machine: str, source: str, rpo: float, status_file: Path | None, metrics_listen: str | None,
                metrics_file: Path | None, max_backoff: float, max_captures: int | None, replicate_to: str | None,
                replicate_bwlimit: str | None, no_index: bool, stage_runbook: str | None, as_json: bool) -> None:
    """Capture MACHINE from SOURCE continuously, keeping the newest point younger than --rpo.

    Each new point's file index is recorded in the background (a libguestfs appliance, 20 s or
    more, never delaying a capture; when points come faster, the newest first and the others when
    idle), unless --no-index. Runs until SIGINT/SIGTERM (the capture in progress finishes, and the
    indexing of the last points; a second signal aborts them).
    """
    from lifeboat.agent.protect import MetricsServer, Protector  # imported here: every lifeboat command starts faster
    from lifeboat.orchestrator.sources import open_source

    check_machine(machine)
    open_archive()  # fail now (exit 2) on a missing archive or a wrong key, not in the loop
    metrics_host = metrics_port = None
    if metrics_listen:
        metrics_host, metrics_port = parse_listen(metrics_listen, "--metrics-listen")
    after_point = None
    if stage_runbook:
        from lifeboat.orchestrator import api
        from lifeboat.orchestrator.cmd_run import load_or_exit

        rb = load_or_exit(stage_runbook)

        def after_point(info: PointInfo) -> None:
            done = api.stage(rb, archive=archive_location(), key_file=key_file_option(), only=machine, log=log)
            for m in done["machines"]:
                log(f"protect {machine}: staged {m['point']} for {m['name']}" if not m["error"] else
                    f"protect {machine}: staging failed: {m['error']}")

        if not any(parse_selector(m.selector)[0] == machine for m in rb.machines):
            raise UsageError(f"--stage {stage_runbook}: no machine of the runbook recovers {machine}")
    replicator = _replicator(machine, replicate_to, replicate_bwlimit, max_backoff)
    prot = Protector(open_archive, open_source, machine, source, rpo, status_file=status_file,
                     metrics_file=metrics_file, max_backoff=max_backoff, log=log, max_captures=max_captures,
                     replicator=replicator, indexer=None if no_index else _indexer(max_backoff),
                     after_point=after_point)
    server = MetricsServer(prot, metrics_host, metrics_port) if metrics_host is not None and metrics_port is not None \
        else None
    if server is not None:
        log(f"protect {machine}: metrics on http://{metrics_host}:{server.port}/metrics")
    try:
        with _Signals() as sig:
            prot.run(sig.stop)
    finally:
        if server is not None:
            server.close()
    if as_json:
        emit_json(prot.status())


def _replicator(machine: str, dest: str | None, bwlimit: str | None,
                max_backoff: float) -> Callable[[Callable[[], datetime | None]], Replicator] | None:
    """What starts protect's replication to ``dest`` (None without one); a malformed DEST or
    rate fails now, with exit 2, not in the loop."""
    if dest is None:
        if bwlimit is not None:
            raise UsageError("--replicate-bwlimit needs --replicate-to DEST")
        return None
    from lifeboat.agent.offsite import Replicator
    from lifeboat.archive.backend import open_backend
    from lifeboat.archive.replicate import replicate

    open_backend(dest).close()
    rate = parse_size(bwlimit, "--replicate-bwlimit") if bwlimit is not None else None
    location, key_file = resolve_location(archive_location()), key_file_option()

    def start(newest: Callable[[], datetime | None]) -> Replicator:
        return Replicator(dest, lambda: replicate(location, dest, [machine], key_file=key_file, bwlimit=rate),
                          newest, max_backoff=max_backoff, log=log)

    return start


def _indexer(max_backoff: float) -> Callable[[], Indexer]:
    """What starts protect's background file index. Each run is a ``lifeboat files index`` child
    process (its NBD server, appliance and memory apart from the capture loop's: nothing of it
    competes with a capture for this process's interpreter); its log lines are passed on."""
    from lifeboat.agent.indexer import Indexer
    from lifeboat.archive import Archive

    location, key_file = resolve_location(archive_location()), key_file_option()  # the command's context, now
    archive_args = ["--archive", location] + (["--key-file", key_file] if key_file else [])

    def index(infos: list[PointInfo]) -> list[dict[str, Any]]:
        arc = Archive.open(location, key_file)
        try:  # a point pruned since its capture is not asked for (files index refuses unknown points)
            present = {p.point for p in arc.points(infos[0].machine)}
        finally:
            arc.backend.close()
        selectors = [f"{i.machine}@{i.point}" for i in infos if i.point in present]
        if not selectors:
            return []
        done = subprocess.run([*SELF_COMMAND, "files", "index", *selectors, "--json", *archive_args],
                              capture_output=True, text=True, check=False)
        for line in done.stderr.splitlines():
            log(line)
        if done.returncode != 0:
            raise IndexFailed(f"lifeboat files index exited with {done.returncode}: "
                              f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def start() -> Indexer:
        return Indexer(index, max_backoff=max_backoff, log=log)

    return start


class IndexFailed(LifeboatError):
    """A background ``files index`` run of protect failed (logged, counted, retried)."""


@command(archive_group, name="serve")
@click.option("--listen", default=DEFAULT_SERVE, show_default=True, metavar="HOST:PORT",
              help="Where to listen (loopback unless told otherwise).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="Server certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Its private key (PEM).")
@click.option("--client-ca", type=click.Path(exists=True, dir_okay=False),
              help="Require client certificates signed by this CA.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
              help="Bearer token clients must send (else $LIFEBOAT_ARCHIVE_TOKEN).")
@click.option("--insecure-http", is_flag=True, help="Serve plain HTTP without TLS (tests on loopback only).")
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for uploads in progress (default: inside a local archive).")
@click.option("--verbose", is_flag=True, help="Log every request on stderr.")
def archive_serve(listen: str, tls_cert: str | None, tls_key: str | None, client_ca: str | None,
                  token_file: str | None, insecure_http: bool, spool: Path | None, verbose: bool) -> None:
    """Serve the archive to remote agents (--archive https://HOST:PORT on their side) until stopped.

    Prints one line, the URL, on stdout once it listens.
    """
    from lifeboat.archive.backend import open_backend
    from lifeboat.archive.server import ArchiveServer, default_spool

    host, port = parse_listen(listen, "--listen")
    location = resolve_location(archive_location())
    if location.startswith(("https://", "http://")):
        raise UsageError(f"--archive {location}: serve a local or object-store archive, not another server")
    token = os.environ.get("LIFEBOAT_ARCHIVE_TOKEN")
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise UsageError(f"--token-file {token_file}: the file is empty")
    if not token and not client_ca:
        raise UsageError("no authentication: give --token-file FILE, LIFEBOAT_ARCHIVE_TOKEN or --client-ca FILE")
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if not tls_cert and not insecure_http:
        raise UsageError("give --tls-cert and --tls-key (or --insecure-http for a test on loopback)")
    if client_ca and not tls_cert:
        raise UsageError("--client-ca needs TLS (--tls-cert and --tls-key)")
    if insecure_http and not tls_cert and not is_loopback(host):
        raise UsageError(f"--insecure-http serves loopback only, not {host}")
    backend = open_backend(location)
    if not backend.exists(CONFIG_KEY):
        log(f"archive serve: {location} holds no archive yet (an agent may create it with 'archive init')")
    tls = server_context(tls_cert, tls_key, client_ca) if tls_cert and tls_key else None
    server = ArchiveServer(backend, host, port, token=token, tls=tls, spool=spool or default_spool(location),
                           verbose=verbose)
    if not is_loopback(host):
        log(f"archive serve: listening beyond loopback on {host} as asked")
    click.echo(server.url)
    sys.stdout.flush()
    server.start()
    try:
        with _Signals() as sig:
            while not sig.stop.wait(0.5):
                pass
    finally:
        server.shutdown()
        backend.close()
    log("archive serve: stopped")
