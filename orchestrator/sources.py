"""Which source a SOURCE argument names: the one place that knows every kind (``SOURCES``).

A URL's scheme names its source (``qmp+unix://`` a running QEMU guest, ``libvirt://`` a libvirt
domain, ``vsphere://`` a vSphere VM, ``ebs://REGION/snap-ID`` an EBS snapshot read back with the
EBS direct APIs); a block device that is an LVM logical volume is read from a snapshot (``lvm``);
anything else is an image file or block device whose format is sniffed
by its magic (``file``). ``agent/SOURCES.md`` says what each guarantees.

Why the registry lives here and not in ``agent/``: the ``file`` source is ``exporters``' image
readers, and the agent and the exporters may not import each other, even lazily. Only the
orchestrator sits above both (orchestrator -> agent/exporters -> archive -> plumbing), so naming
them all here keeps every arrow pointing down; the agent gets ``open_source`` passed in
(``agent/protect.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lifeboat.plumbing.registry import Registry

# Each entry opens a SOURCE string; ``LIFEBOAT_PLUGINS=sources:SCHEME=module:opener`` adds a URL scheme.
SOURCES: Registry[Callable[[str], Any]] = Registry(
    "sources",
    "capture source",
    {
        "qmp+unix": "lifeboat.agent.qmp:QmpSource",
        "libvirt": "lifeboat.agent.virt:LibvirtSource",
        "lvm": "lifeboat.agent.lvm:open_volume",
        "file": "lifeboat.exporters.images:open_image",
        "vsphere": "lifeboat.agent.vsphere:VsphereSource",
        "ebs": "lifeboat.targets.ebs:EbsSource",
    },
    planned=(),
)


def source_kind(spec: str) -> str:
    """The name in ``SOURCES`` of the source ``spec`` names."""
    scheme, sep, _ = spec.partition("://")
    if sep:
        return scheme
    if spec.startswith("/dev/"):
        from lifeboat.agent.lvm import logical_volume

        if logical_volume(spec) is not None:
            return "lvm"
    return "file"


def open_source(spec: str) -> Any:
    """The source named on the command line."""
    return SOURCES.get(source_kind(spec))(spec)
