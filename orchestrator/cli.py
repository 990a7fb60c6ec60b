"""The ``lifeboat`` command line: the stable contract of ``shared/CLI.md``.

Each command is a thin layer: parse, call the package that owns the work, print. Errors are
typed (``plumbing.errors``): their class carries the exit status, and ``main`` is the one
place that turns them into a message on stderr and that status.

Commands live in ``cmd_*.py`` modules and are imported only when they run (``LazyGroup``):
``lifeboat backup`` loads the archive and its source, not rich, jsonschema, the runbook engine or
the NBD server. A dirty-bitmap incremental is over in a fraction of a second, so the few hundred
milliseconds those imports cost would be most of its run time. ``--help`` still lists every
command (it imports them all to read their help).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from lifeboat.archive import Archive
from lifeboat.orchestrator.console import emit_json, log
from lifeboat.plumbing.errors import LifeboatError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

# Which module registers each top-level command (with ``command()`` when imported).
COMMANDS = {
    "archive": "lifeboat.orchestrator.cmd_archive",
    "backup": "lifeboat.orchestrator.cmd_archive",
    "points": "lifeboat.orchestrator.cmd_archive",
    "restore": "lifeboat.orchestrator.cmd_archive",
    "verify": "lifeboat.orchestrator.cmd_archive",
    "prune": "lifeboat.orchestrator.cmd_archive",
    "replicate": "lifeboat.orchestrator.cmd_archive",
    "protect": "lifeboat.orchestrator.cmd_agent",
    "export": "lifeboat.orchestrator.cmd_export",
    "run": "lifeboat.orchestrator.cmd_run",
    "failover": "lifeboat.orchestrator.cmd_run",
    "teardown": "lifeboat.orchestrator.cmd_run",
    "validate": "lifeboat.orchestrator.cmd_run",
    "runs": "lifeboat.orchestrator.cmd_run",
    "scheduler": "lifeboat.orchestrator.cmd_run",
    "serve": "lifeboat.orchestrator.cmd_serve",
    "web": "lifeboat.orchestrator.cmd_web",
    "files": "lifeboat.orchestrator.cmd_files",
    "mount": "lifeboat.orchestrator.cmd_files",
    "stage": "lifeboat.orchestrator.cmd_stage",
}
# Commands of shared/CLI.md that a later version brings: naming one says so (exit status 2)
# rather than click's "No such command", which reads like a typo.
PLANNED: tuple[str, ...] = ()


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (click's "lazily loading subcommands").

    ``lazy_subcommands`` maps a command name to the module whose import registers it in this group;
    ``planned`` names commands of a later version (not listed; naming one is a ``UsageError``).
    """

    def __init__(
        self,
        *args: Any,
        lazy_subcommands: dict[str, str] | None = None,
        planned: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands or {})
        self.planned = planned

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command name, registered yet or not, sorted as click sorts them."""
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, importing the module that defines it the first time."""
        module = self.lazy_subcommands.get(cmd_name)
        if module is not None and cmd_name not in self.commands:
            importlib.import_module(module)
            if cmd_name not in self.commands:
                raise RuntimeError(f"{module} does not define the command {cmd_name!r}")
        return super().get_command(ctx, cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """As click's; an unknown name first loads every command, so the error suggests the closest."""
        if args and args[0] not in self.commands and args[0] not in self.lazy_subcommands:
            if args[0] in self.planned:
                raise UsageError(f"'{ctx.command_path} {args[0]}' is not available in this version of lifeboat")
            for name in self.lazy_subcommands:
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


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


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.I)


def parse_size(text: str, what: str) -> int:
    """``512M``, ``1G``, ``50MB`` or a plain byte count (binary multiples)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"{what} {text!r}: not a size (use e.g. 512M or 2G)")
    return int(m.group(1)) * 1024 ** "bkmgt".index((m.group(2) or "b").lower())


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


@click.group(
    cls=LazyGroup,
    lazy_subcommands=COMMANDS,
    planned=PLANNED,
    context_settings={"help_option_names": ["-h", "--help"]},
)
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


__all__ = [
    "COMMANDS",
    "PLANNED",
    "LazyGroup",
    "archive_location",
    "cli",
    "command",
    "emit_json",
    "json_option",
    "key_file_option",
    "main",
    "open_archive",
    "parse_size",
]
