"""``lifeboat serve``: a recovery point over NBD, read-only, copy-on-write, or hydrating."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import click

from lifeboat.archive.local import LocalBackend
from lifeboat.archive.packcache import PackCache
from lifeboat.archive.throttle import ThrottledBackend
from lifeboat.nbdserver import Export, open_volume, serve_until_signal
from lifeboat.orchestrator.cli import command, open_archive, parse_size
from lifeboat.orchestrator.console import log, progress
from lifeboat.plumbing.errors import UsageError
from lifeboat.plumbing.listen import parse_listen
from lifeboat.plumbing.nbd import NbdUrl
from lifeboat.plumbing.tls import server_context

DEFAULT_LISTEN = "127.0.0.1:10809"
def _tls(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        if ca:
            raise UsageError("--tls-ca needs --tls-cert and --tls-key")
        return None
    if not cert or not key:
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    for opt, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path and not Path(path).is_file():
            raise UsageError(f"{opt} {path}: no such file")
    return server_context(cert, key, ca)


@command(name="serve")
@click.argument("selector", metavar="MACHINE[@WHEN]")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True,
              help="HOST:PORT to listen on (port 0: any free port).")
@click.option("--name", "export_name", help="Export name (default: the machine name).")
@click.option("--writable", is_flag=True,
              help="Accept writes, kept in a copy-on-write overlay; the archive never changes.")
@click.option("--hydrate-to", type=click.Path(dir_okay=False),
              help="Also copy the point into PATH, requested blocks first.")
@click.option("--overlay", type=click.Path(dir_okay=False),
              help="Overlay file for --writable (default: <archive>/overlays/<machine>-<point>.cow).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Server certificate (PEM): clients must use TLS.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Private key of --tls-cert (PEM).")
@click.option("--tls-ca", type=click.Path(dir_okay=False),
              help="Accept only clients with a certificate signed by this CA.")
@click.option("--cache-size", default="1G", show_default=True, help="Memory for decoded archive chunks.")
@click.option("--pack-cache-size", default="2G", show_default=True,
              help="Local disk for blocks of packs read from a remote (S3, server) archive: each GET brings "
                   "a block and reads ahead (0: one ranged GET per chunk).")
@click.option("--pack-cache-dir", type=click.Path(file_okay=False, exists=True),
              help="Where the pack cache's directory is made (default: $TMPDIR, else /var/tmp: on disk, "
                   "where /tmp is often in memory).")
@click.option("--memory-limit", default="256M", show_default=True,
              help="Most request and reply data held for all clients: beyond it, requests wait "
                   "(a client that never reads its replies cannot grow the server).")
@click.option("--client-memory-limit", default="64M", show_default=True,
              help="The same bound for each connection (a 32 MiB read counts 32 MiB).")
@click.option("--archive-rate", hidden=True, help="Throttle archive reads to this many bytes/s (benchmarks, tests).")
def serve_cmd(selector: str, listen: str, export_name: str | None, writable: bool, hydrate_to: str | None,
              overlay: str | None, tls_cert: str | None, tls_key: str | None, tls_ca: str | None,
              cache_size: str, pack_cache_size: str, pack_cache_dir: str | None, memory_limit: str,
              client_memory_limit: str, archive_rate: str | None) -> None:
    """Serve a recovery point over NBD until SIGINT/SIGTERM; prints nbd://HOST:PORT/EXPORT once listening."""
    host, port = parse_listen(listen, "--listen")
    tls = _tls(tls_cert, tls_key, tls_ca)
    cache_bytes = parse_size(cache_size, "--cache-size")
    pack_cache_bytes = parse_size(pack_cache_size, "--pack-cache-size")
    memory = parse_size(memory_limit, "--memory-limit")
    client_memory = parse_size(client_memory_limit, "--client-memory-limit")
    arc = open_archive()
    info = arc.resolve(selector)
    arc.cache.max_bytes = cache_bytes
    if archive_rate:
        arc.backend = ThrottledBackend(arc.backend, parse_size(archive_rate, "--archive-rate"))
    name = export_name if export_name is not None else info.machine
    if not name or len(name.encode()) > 4096:
        raise UsageError("--name: the export name must be 1 to 4096 bytes")

    with ExitStack() as stack:
        if pack_cache_bytes and not isinstance(getattr(arc.backend, "inner", arc.backend), LocalBackend):
            arc.pack_cache = PackCache(pack_cache_bytes, pack_cache_dir or os.environ.get("TMPDIR") or "/var/tmp")
            stack.callback(arc.pack_cache.close)
        report = None
        if hydrate_to:
            bar: list[Callable[[int], None]] = []
            shown = 0

            def report(done: int, total: int) -> None:
                """Hydration progress on stderr; a resumed copy counts only what is left."""
                nonlocal shown
                if not bar:
                    shown = done
                    resumed = f", resumed at {done * 100 // max(total, 1)}%" if done else ""
                    label = f"hydrate {info.machine}@{info.point} to {hydrate_to}{resumed}"
                    bar.append(stack.enter_context(progress(label, total - done)))
                if done > shown:
                    bar[0](done - shown)
                    shown = done

        volume = open_volume(arc, info, writable=writable, overlay=overlay, hydrate_to=hydrate_to,
                             progress=report, log=log)
        export = Export(name, volume, volume.description)

        def listening(bound_host: str, bound_port: int) -> None:
            shown_host = bound_host if host in ("0.0.0.0", "::") else host
            sys.stdout.write(f"{NbdUrl(shown_host, bound_port, name)}\n")
            sys.stdout.flush()
            mode = "writable" if volume.can_write() else "read-only"
            log(f"serving {info.machine}@{info.point} ({info.time}) as {mode} export {name!r}"
                f"{' with TLS' if tls else ''}; stop with Ctrl-C or SIGTERM")

        asyncio.run(serve_until_signal([export], host, port, tls=tls, on_listening=listening, log=log,
                                       memory=memory, client_memory=client_memory))
    log("lifeboat serve: stopped")
