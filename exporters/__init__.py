"""Disk-image formats: writers that stream an archive point out as an image file, and readers
that present a foreign image as a backup source.

Entry points: ``writer(name)`` (the ``--format`` names in ``WRITERS``) and ``open_image(path)``.
Each format's byte layout is documented in its module (raw, qcow2, vmdk, vmdk_stream, vhdx).
"""

from __future__ import annotations

from typing import Any

from lifeboat.exporters.base import ExportResult, ImageError, ImageTooLarge, ImageWriter, PointSource, UnsupportedImage
from lifeboat.exporters.images import detect, open_image
from lifeboat.exporters.qcow2 import Qcow2Writer
from lifeboat.exporters.raw import RawWriter
from lifeboat.exporters.vhdx import VhdxWriter
from lifeboat.exporters.vmdk import VmdkSparseWriter
from lifeboat.exporters.vmdk_stream import VmdkStreamWriter
from lifeboat.plumbing.errors import UsageError

WRITERS: dict[str, type[ImageWriter]] = {
    w.format: w for w in (RawWriter, Qcow2Writer, VmdkSparseWriter, VmdkStreamWriter, VhdxWriter)
}


def writer(name: str, **options: Any) -> ImageWriter:
    """The writer for ``--format name``."""
    cls = WRITERS.get(name)
    if cls is None:
        raise UsageError(f"--format {name}: unknown format (choose from {', '.join(WRITERS)})")
    return cls(**options)


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
    "writer",
]
