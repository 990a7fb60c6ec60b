"""Which source a SOURCE argument names, for the sources the agent adds to plain files.

``open_source`` (``orchestrator/sources.py``) asks here first: ``qmp+unix://`` is a running QEMU guest,
``libvirt://`` a libvirt domain, and a block device that is an LVM logical volume is read from a
snapshot. Anything else is left to ``open_source`` (image files, other block devices).
"""

from __future__ import annotations

from typing import Any


def open_special(spec: str) -> Any | None:
    """The change-tracking or snapshotting source for ``spec``, or None for a plain file/device."""
    if spec.startswith("qmp+unix://"):
        from lifeboat.agent.qmp import QmpSource

        return QmpSource(spec)
    if spec.startswith("libvirt://"):
        from lifeboat.agent.virt import LibvirtSource

        return LibvirtSource(spec)
    if spec.startswith("/dev/"):
        from lifeboat.agent.lvm import LvmSnapshotSource, logical_volume

        lv = logical_volume(spec)
        if lv is not None:
            return LvmSnapshotSource(spec, *lv)
    return None
