"""The ``lifeboat`` command line: the stable contract of ``shared/CLI.md``.

Each command is a thin layer: parse, call the package that owns the work, print. Errors are
typed (``archive.errors``): their class carries the exit status.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from archive import Archive
from archive.errors import LifeboatError
from orchestrator.console import emit_json, log

F = TypeVar("F", bound=Callable[..., Any])


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None:
        ctx.find_root().ensure_object(dict)[param.name] = value
    return value


def archive_options(f: F) -> F:
    """``--archive`` and ``--key-file``, accepted before or after the subcommand name."""
    f = click.option(
        "--key-file",
        expose_value=False,
        callback=_remember,
        help="Key file of an encrypted archive (else $LIFEBOAT_KEY_FILE).",
    )(f)
    f = click.option(
        "--archive",
        expose_value=False,
        callback=_remember,
        help="Archive path or URL (else $LIFEBOAT_ARCHIVE, else ./lifeboat-archive).",
    )(f)
    return f


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


def open_archive() -> Archive:
    """The archive that ``--archive`` / ``LIFEBOAT_ARCHIVE`` names."""
    obj = click.get_current_context().find_root().ensure_object(dict)
    return Archive.open(obj.get("archive"), key_file=obj.get("key_file"))


def archive_location() -> str | None:
    """The ``--archive`` value given anywhere on the command line, if any."""
    return click.get_current_context().find_root().ensure_object(dict).get("archive")


def key_file_option() -> str | None:
    """The ``--key-file`` value given anywhere on the command line, if any."""
    return click.get_current_context().find_root().ensure_object(dict).get("key_file")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@archive_options
def cli() -> None:
    """lifeboat: block-level archive and instant recovery of any machine, anywhere."""


def command(group: click.Group = cli, **kw: Any) -> Callable[[F], F]:
    """Register a subcommand that takes the common archive options."""

    def deco(f: F) -> F:
        @wraps(f)
        def run(*args: Any, **kwargs: Any) -> Any:
            return f(*args, **kwargs)

        group.command(**kw)(archive_options(run))
        return f

    return deco


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn typed errors into their exit status."""
    from orchestrator import cmd_agent, cmd_archive, cmd_export, cmd_run, cmd_serve  # noqa: F401  (registers its commands)

    try:
        cli.main(args=argv, prog_name="lifeboat", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        log("lifeboat: aborted")
        sys.exit(130)
    except LifeboatError as e:
        log(f"lifeboat: error: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        log("lifeboat: interrupted")
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(0)


__all__ = ["archive_location", "cli", "command", "emit_json", "json_option", "key_file_option", "main", "open_archive"]
