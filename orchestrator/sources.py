"""Which source a SOURCE argument names: the one place that knows every kind.

A running QEMU or libvirt guest or an LVM volume (``agent/tracked.py``) comes first; anything else
is an image file or block device whose format is sniffed by its magic (``exporters/images.py``).
It sits in the orchestrator because it joins the agent and the exporters, which may not import
each other.
"""

from __future__ import annotations

from typing import Any

from lifeboat.agent.tracked import open_special


def open_source(spec: str) -> Any:
    """The source named on the command line."""
    special = open_special(spec)
    if special is not None:
        return special
    from lifeboat.exporters.images import open_image  # here: a guest's dirty-bitmap backup needs no image readers

    return open_image(spec)
