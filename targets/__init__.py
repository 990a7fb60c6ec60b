"""Target drivers: the places a machine can come back (qemu, kvm, vmware, aws, openstack, pxe).

``driver_class(name)`` is the one entry point; ``targets/base.py`` is the interface every driver
implements, ``targets/schemas/NAME.json`` each driver's settings. Drivers of later issues can be
added by other packages without changing this file: ``LIFEBOAT_TARGET_PLUGINS`` lists
``name=module:Class`` entries (comma-separated).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from lifeboat.targets.base import DriverNotAvailable, Target, TargetError, TargetUnavailable

BUILTIN = {
    "qemu": "lifeboat.targets.qemu:QemuTarget",
    "kvm": "lifeboat.targets.kvm:KvmTarget",
}
# Designed in shared/DESIGN.md, settings schema written, driver to come: runbooks using them
# validate, and a run stops before creating anything.
PLANNED = {"pxe": "physical"}


def _plugins() -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in os.environ.get("LIFEBOAT_TARGET_PLUGINS", "").split(","))):
        name, _, ref = entry.partition("=")
        out[name.strip()] = ref.strip()
    return out


def available_drivers() -> set[str]:
    """Names a runbook may use: built-in, planned, and plugins."""
    return set(BUILTIN) | set(PLANNED) | set(_plugins())


def driver_class(name: str) -> type[Target]:
    """The driver class registered as ``name``; ``DriverNotAvailable`` for planned and unknown ones."""
    refs = {**BUILTIN, **_plugins()}
    if name in PLANNED and name not in refs:
        raise DriverNotAvailable(f"the {name!r} target driver is not implemented in this version of lifeboat")
    if name not in refs:
        raise DriverNotAvailable(f"unknown target driver {name!r} (available: {', '.join(sorted(refs))})")
    module, _, cls = refs[name].partition(":")
    found: type[Target] = getattr(importlib.import_module(module), cls)
    return found


def driver_kind(name: str) -> str | None:
    """ "virtual" or "physical" for a known driver, else None."""
    if name in PLANNED:
        return PLANNED[name]
    try:
        return driver_class(name).kind
    except (TargetUnavailable, ImportError, AttributeError):
        return None


def driver_schema(name: str) -> dict[str, Any] | None:
    """The settings schema of a known driver (planned ones included), else None."""
    from lifeboat.targets.base import SCHEMA_DIR, load_schema

    if name in PLANNED:
        return load_schema(SCHEMA_DIR / f"{name}.json")
    try:
        return driver_class(name).schema()
    except (TargetUnavailable, ImportError, AttributeError):
        return None


__all__ = [
    "DriverNotAvailable",
    "Target",
    "TargetError",
    "TargetUnavailable",
    "available_drivers",
    "driver_class",
    "driver_kind",
    "driver_schema",
]
