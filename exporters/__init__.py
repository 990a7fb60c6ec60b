"""Disk-image formats: exporters that stream an archive point out as an image file, and readers
that present a foreign image as a backup source.

Entry points: ``EXPORTERS.get(name)`` (the ``--format`` names; ``plumbing/registry.py``: imported on
first use, ``LIFEBOAT_PLUGINS=exporters:NAME=module:Class`` adds one) and ``open_image(path)``.
Readers are not in a registry: an image's reader is chosen by its magic bytes (``images.sniff``),
never by a name a user gives, so a reader cannot be picked without knowing its magic first.
Each format's byte layout is documented in its module (raw, qcow2, vmdk, vmdk_stream, vhdx).
"""

from __future__ import annotations

from collections.abc import Iterator

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

# Formats that can be written strictly front to back, with no file: an upload's request body.
STREAM_FORMATS = ("raw", "qcow2")


def image_stream(fmt: str, reader: PointSource, chunk: int = 4 << 20) -> Iterator[bytes]:
    """The point as an image of ``fmt`` (one of ``STREAM_FORMATS``), in pieces of about ``chunk``
    bytes, read from the archive as they are consumed."""
    if fmt == "qcow2":
        from lifeboat.exporters.qcow2 import qcow2_stream

        yield from qcow2_stream(reader, chunk)
    elif fmt == "raw":
        for offset in range(0, reader.size, chunk):
            yield reader.read(offset, min(chunk, reader.size - offset))
    else:
        raise ValueError(f"no streaming writer for {fmt!r} (streamable: {', '.join(STREAM_FORMATS)})")


__all__ = [
    "STREAM_FORMATS",
    "EXPORTERS",
    "ExportResult",
    "ImageError",
    "ImageTooLarge",
    "Exporter",
    "PointSource",
    "UnsupportedImage",
    "detect",
    "image_stream",
    "open_image",
]
