"""Every plug-in registry of lifeboat, by kind: what can be used and what is planned.

Why here: the registries are declared in their own packages (``targets.TARGETS``,
``exporters.EXPORTERS``, ``archive.backend.BACKENDS``, ``orchestrator.sources.SOURCES``); only the
orchestrator may import all of them. Listing imports no plug-in.
"""

from __future__ import annotations

from typing import Any

from lifeboat.plumbing.registry import Registry


def registries() -> dict[str, Registry[Any]]:
    """Each registry by its kind (the ``KIND`` of ``LIFEBOAT_PLUGINS=KIND:NAME=module:attr``)."""
    from lifeboat.archive.backend import BACKENDS
    from lifeboat.exporters import EXPORTERS
    from lifeboat.orchestrator.sources import SOURCES
    from lifeboat.targets import TARGETS

    found: list[Registry[Any]] = [TARGETS, EXPORTERS, BACKENDS, SOURCES]
    return {r.kind: r for r in found}


def list_plugins() -> dict[str, dict[str, list[str]]]:
    """``{kind: {"available": [...], "planned": [...]}}`` for every registry."""
    return {kind: {"available": r.names(), "planned": r.planned()} for kind, r in registries().items()}
