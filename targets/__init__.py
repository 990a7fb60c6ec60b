"""Target drivers: the places a machine can come back (qemu, kvm, vmware, aws, openstack, pxe).

``TARGETS.get(name)`` is the one entry point (``plumbing/registry.py``: lazy, ``TARGETS.add`` or
``LIFEBOAT_PLUGINS=targets:NAME=module:Class`` adds a driver without changing this file);
``targets/base.py`` is the interface every driver implements, ``targets/schemas/NAME.json`` each
driver's settings.
"""

from __future__ import annotations

from typing import Any

from lifeboat.plumbing.errors import LifeboatError
from lifeboat.plumbing.registry import Registry
from lifeboat.targets.base import Target, TargetError, TargetUnavailable

# Designed in shared/DESIGN.md, driver to come, with the kind of machine each brings back:
# runbooks naming them validate (against the schema when one is written), and a run stops
# before creating anything.
PLANNED_KINDS: dict[str, str] = {}

TARGETS: Registry[type[Target]] = Registry(
    "targets",
    "target driver",
    {
        "qemu": "lifeboat.targets.qemu:QemuTarget",
        "kvm": "lifeboat.targets.kvm:KvmTarget",
        "vmware": "lifeboat.targets.vmware:VmwareTarget",
        "pxe": "lifeboat.targets.pxe:PxeTarget",
        "openstack": "lifeboat.targets.openstack:OpenStackTarget",
        "aws": "lifeboat.targets.aws:AwsTarget",
    },
    planned=PLANNED_KINDS,
    base=Target,
)


def driver_kind(name: str) -> str | None:
    """ "virtual" or "physical" for a known driver (planned ones included), else None."""
    if name in TARGETS.planned():
        return PLANNED_KINDS[name]
    try:
        return TARGETS.get(name).kind
    except LifeboatError:  # unknown, or cannot be loaded here
        return None


def driver_schema(name: str) -> dict[str, Any] | None:
    """The settings schema of a known driver (planned ones that have one included), else None."""
    from lifeboat.targets.base import SCHEMA_DIR, load_schema

    if name in TARGETS.planned():
        path = SCHEMA_DIR / f"{name}.json"
        return load_schema(path) if path.exists() else None
    try:
        return TARGETS.get(name).schema()
    except LifeboatError:  # unknown, or cannot be loaded here
        return None


__all__ = [
    "TARGETS",
    "Target",
    "TargetError",
    "TargetUnavailable",
    "driver_kind",
    "driver_schema",
]
