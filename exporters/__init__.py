"""Disk-image formats: writers that stream an archive point out as an image file, and readers
that present a foreign image as a backup source.

Entry points: ``WRITERS.get(name)`` (the ``--format`` names; ``plumbing/registry.py``: imported on
first use, ``LIFEBOAT_PLUGINS=exporters:NAME=module:Class`` adds one) and ``open_image(path)``.
Readers are not in a registry: an image's reader is chosen by its magic bytes (``images.sniff``),
never by a name a user gives, so a reader cannot be picked without knowing its magic first.
Each format's byte layout is documented in its module (raw, qcow2, vmdk, vmdk_stream, vhdx).
"""

from __future__ import annotations

from lifeboat.exporters.base import ExportResult, ImageError, ImageTooLarge, ImageWriter, PointSource, UnsupportedImage
from lifeboat.exporters.images import detect, open_image
from lifeboat.plumbing.registry import Registry

WRITERS: Registry[type[ImageWriter]] = Registry(
    "exporters",
    "export format",
    {
        "raw": "lifeboat.exporters.raw:RawWriter",
        "qcow2": "lifeboat.exporters.qcow2:Qcow2Writer",
        "vmdk": "lifeboat.exporters.vmdk:VmdkSparseWriter",
        "vmdk-stream": "lifeboat.exporters.vmdk_stream:VmdkStreamWriter",
        "vhdx": "lifeboat.exporters.vhdx:VhdxWriter",
    },
    base=ImageWriter,
)


__all__ = [
    "WRITERS",
    "ExportResult",
    "ImageError",
    "ImageTooLarge",
    "ImageWriter",
    "PointSource",
    "UnsupportedImage",
    "detect",
    "open_image",
]
