"""``lifeboat web``: the web pane, served by uvicorn.

FastAPI and uvicorn are imported inside the command, so other commands never load them. The
operator's token comes from ``--token-file``; without one, on loopback only, a token is made once
into the state folder (``web-token``, mode 0600) and its path, never its value, is printed. A
viewer's token, optional, comes from ``--viewer-token-file``. Beyond loopback the
pane needs ``--token-file`` and TLS: the token and session cookie must not cross a network in clear.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

import click

from lifeboat.archive import Archive
from lifeboat.orchestrator.cli import archive_location, command, key_file_option, open_archive
from lifeboat.orchestrator.cmd_run import state_option
from lifeboat.orchestrator.console import log
from lifeboat.orchestrator.runbook import parse_duration
from lifeboat.orchestrator.state import default_state_dir
from lifeboat.plumbing.errors import LifeboatError, UsageError
from lifeboat.plumbing.listen import is_loopback, parse_listen
from lifeboat.plumbing.tls import server_context

DEFAULT_WEB = "127.0.0.1:8080"
DEFAULT_RPO = "24h"


def token_of(option: str, token_file: str) -> str:
    """The token in ``token_file`` (given as ``option``), refused if empty."""
    token = Path(token_file).read_text().strip()
    if not token:
        raise UsageError(f"{option} {token_file}: the file is empty")
    return token


def read_token(token_file: str | None, state_dir: Path, loopback: bool) -> str:
    """The operator's token of ``token_file``; else, on loopback, the state folder's ``web-token``
    (made now if absent)."""
    if token_file:
        return token_of("--token-file", token_file)
    if not loopback:
        raise UsageError("--listen beyond loopback needs --token-file FILE")
    path = state_dir / "web-token"
    try:
        if not path.exists():
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        token = path.read_text().strip()
    except OSError as e:
        raise UsageError(f"--state {state_dir}: cannot keep the web token there: {e.strerror}") from None
    if not token:
        raise UsageError(f"{path}: the file is empty (remove it to get a new token)")
    log(f"lifeboat web: no --token-file: log in with the token in {path}")
    return token


@command(name="web")
@click.option("--listen", default=DEFAULT_WEB, show_default=True, metavar="HOST:PORT",
              help="Where to listen (loopback unless told otherwise).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
              help="The operator's token (may start rehearsals, failovers, teardowns), as bearer token of "
                   "the API and in the login form (needed beyond loopback; on loopback without it, one is made "
                   "in the state folder).")
@click.option("--viewer-token-file", type=click.Path(exists=True, dir_okay=False),
              help="A viewer's token: sees every page and the API, may act on nothing (403).")
@click.option("--runbooks", "runbooks_dir", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="The runbooks (*.yaml, *.yml, *.json) the Runbooks page validates, plans and runs.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="Server certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Its private key (PEM).")
@click.option("--rpo-objective", default=DEFAULT_RPO, show_default=True, metavar="DURATION",
              help="Age of a machine's newest point beyond which it is 'exceeded' (twice it: 'critical').")
@click.option("--protect-status", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Where `lifeboat protect --status-file` writes (one JSON file per machine): the dashboard "
                   "shows whether each machine's protect loop is running.")
@click.option("--replica", metavar="DEST",
              help="The off-site archive `lifeboat replicate --to DEST` fills: the dashboard shows each "
                   "machine's lag behind it.")
@state_option
def web_cmd(listen: str, token_file: str | None, viewer_token_file: str | None, runbooks_dir: str | None,
            tls_cert: str | None, tls_key: str | None, rpo_objective: str, protect_status: str | None,
            replica: str | None, state_dir: str | None) -> None:
    """Serve the web pane (dashboard, machines, runs, a JSON API under /api/) until stopped.

    Prints one line, the URL, on stdout once it listens.
    """
    host, port = parse_listen(listen, "--listen")
    try:
        objective = parse_duration(rpo_objective)
    except ValueError:
        raise UsageError(f"--rpo-objective {rpo_objective!r}: expected a duration such as 90s, 15m or 1h30m") from None
    if objective <= 0:
        raise UsageError(f"--rpo-objective {rpo_objective!r}: must be longer than 0 s")
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    loopback = is_loopback(host)
    if not loopback and not tls_cert:
        raise UsageError(f"--listen {listen}: beyond loopback the pane needs --tls-cert and --tls-key")
    if tls_cert and tls_key:
        server_context(tls_cert, tls_key)  # a bad certificate or key is refused before anything starts
    state = Path(state_dir) if state_dir else default_state_dir()
    token = read_token(token_file, state, loopback)
    viewer = token_of("--viewer-token-file", viewer_token_file) if viewer_token_file else None
    if viewer == token:
        raise UsageError("--viewer-token-file: a viewer's token must differ from the operator's")
    archive = open_archive()
    offsite = Archive.open(replica, key_file=key_file_option()) if replica else None  # a wrong DEST fails now

    import uvicorn

    from lifeboat.orchestrator.web.app import Settings, create_app

    app = create_app(Settings(archive, state, objective, token, tls=bool(tls_cert), viewer_token=viewer,
                              runbooks=Path(runbooks_dir).resolve() if runbooks_dir else None,
                              archive_arg=archive_location(), key_file=key_file_option(),
                              protect_status=Path(protect_status) if protect_status else None, replica=offsite))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LifeboatError(f"cannot listen on {listen}: {e.strerror}") from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    config = uvicorn.Config(app, log_level="warning", ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                            server_header=False, timeout_graceful_shutdown=5)  # open event streams end
    if not loopback:
        log(f"lifeboat web: listening beyond loopback on {host} as asked")
    click.echo(f"{'https' if tls_cert else 'http'}://{shown}:{bound}/")
    sys.stdout.flush()
    uvicorn.Server(config).run(sockets=[sock])
    log("lifeboat web: stopped")
