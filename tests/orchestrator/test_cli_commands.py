"""The lazy command table matches what the command modules register, so no command goes missing."""

from __future__ import annotations

import importlib
import pkgutil

import lifeboat.orchestrator
from lifeboat.orchestrator.cli import COMMANDS, cli


def test_every_registered_command_is_in_the_lazy_table_and_no_other() -> None:
    for mod in pkgutil.iter_modules(lifeboat.orchestrator.__path__):
        if mod.name.startswith("cmd_"):
            importlib.import_module(f"lifeboat.orchestrator.{mod.name}")
    assert set(cli.commands) == set(COMMANDS)
    for name, module in COMMANDS.items():
        assert cli.commands[name].callback is not None
        assert cli.commands[name].callback.__module__ == module, name
