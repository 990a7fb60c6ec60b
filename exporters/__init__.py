"""Disk-image formats: exporters that stream an archive point out as an image file, and readers
that present a foreign image as a backup source.

Entry points: ``EXPORTERS.get(name)`` (the ``--format`` names; ``plumbing/registry.py``: imported on
first use, ``LIFEBOAT_PLUGINS=exporters:NAME=module:Class`` adds one) and ``open_image(path)``.
Readers are not in a registry: an image's reader is chosen by its magic bytes (``images.sniff``),
never by a name a user gives, so a reader cannot be picked without knowing its magic first.
Each format's byte layout is documented in its module (raw, qcow2, vmdk, vmdk_stream, vhdx).
"""

from __future__ import annotations

from lifeboat.exporters.base import Exporter, ExportResult, ImageError, ImageTooLarge, PointSource, UnsupportedImage
from lifeboat.exporters.images import detect, open_image
from lifeboat.plumbing.registry import Registry

EXPORTERS: Registry[type[Exporter]] = Registry(
    "exporters",
    "export format",
    {
        "raw": "lifeboat.exporters.raw:RawExporter",
        "qcow2": "lifeboat.exporters.qcow2:Qcow2Exporter",
        "vmdk": "lifeboat.exporters.vmdk:VmdkSparseExporter",
        "vmdk-stream": "lifeboat.exporters.vmdk_stream:VmdkStreamExporter",
        "vhdx": "lifeboat.exporters.vhdx:VhdxExporter",
    },
    base=Exporter,
)


__all__ = [
    "EXPORTERS",
    "ExportResult",
    "ImageError",
    "ImageTooLarge",
    "Exporter",
    "PointSource",
    "UnsupportedImage",
    "detect",
    "open_image",
]
