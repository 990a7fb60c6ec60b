"""``open_image``: any disk image file (or block device) as a backup source, format sniffed.

Why: ``lifeboat backup MACHINE SOURCE`` takes a qcow2, VMDK or VHDX as readily as a raw file;
the format is told by the file's magic bytes, never by its name, and anything unrecognised is
read as raw (as a block device or a raw disk always is).
"""

from __future__ import annotations

import os

from lifeboat.archive.files import FileSource
from lifeboat.exporters.base import ImageError, UnsupportedImage
from lifeboat.exporters.qcow2 import MAGIC as QCOW2_MAGIC
from lifeboat.exporters.qcow2 import Qcow2Image
from lifeboat.exporters.source import ImageSource
from lifeboat.exporters.vhdx import FILE_SIGNATURE as VHDX_MAGIC
from lifeboat.exporters.vhdx import VhdxImage
from lifeboat.exporters.vmdk import MAGIC as VMDK_MAGIC
from lifeboat.exporters.vmdk import VmdkDescriptorImage, VmdkSparseImage

Image = FileSource | ImageSource | VmdkDescriptorImage


def sniff(head: bytes) -> str:
    """The format named by a file's first bytes: qcow2, vmdk, vmdk-descriptor, vhdx, vhd or raw."""
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    if head.startswith(VMDK_MAGIC):
        return "vmdk"
    if head.startswith(VHDX_MAGIC):
        return "vhdx"
    if head.startswith(b"conectix"):
        return "vhd"
    if head.startswith(b"COWD"):
        return "vmdk3"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"# Disk DescriptorFile") or (text.startswith(b"#") and b"createType" in head):
        return "vmdk-descriptor"
    return "raw"


def detect(path: str | os.PathLike[str]) -> str:
    """The format of the image at ``path`` (see ``sniff``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as e:
        raise ImageError(f"image {path}: cannot open ({e.strerror})") from None
    return sniff(head)


def open_image(path: str | os.PathLike[str]) -> Image:
    """A source (``name``, ``size``, ``read``, ``close``) for the image at ``path``."""
    kind = detect(path)
    if kind == "qcow2":
        return Qcow2Image(path)
    if kind == "vmdk":
        return VmdkSparseImage(path)
    if kind == "vmdk-descriptor":
        return VmdkDescriptorImage(path)
    if kind == "vhdx":
        return VhdxImage(path)
    if kind == "vhd":
        raise UnsupportedImage(f"image {path} is a VHD (not VHDX); convert it first: qemu-img convert -O vhdx")
    if kind == "vmdk3":
        raise UnsupportedImage(f"image {path} is a VMware 3 (COWD) disk, which lifeboat does not read")
    return FileSource(path)
