"""Raw images: the point's bytes as they are, written sparse.

Why an exporter at all: a raw export must not materialise the zeros the archive does not store.
The file is sized with ``ftruncate`` first and only the non-zero 4 KiB blocks are written, so
zero chunks, and zero runs inside chunks, stay holes (like ``qemu-img convert -S 4k``). The
virtual size is the point's size to the byte (no rounding). Import of raw files is
``archive.files.FileSource``.
"""

from __future__ import annotations

import os
from typing import ClassVar

from lifeboat.archive.durable import pwrite_all
from lifeboat.exporters.base import Exporter, KiB, MiB, PointSource, Progress, UnitPipeline, nonzero_runs

HOLE_GRANULARITY = 4 * KiB


class RawExporter(Exporter):
    """Sparse raw image: holes wherever the point is zero."""

    format: ClassVar[str] = "raw"
    qemu_format: ClassVar[str] = "raw"
    max_size: ClassVar[int] = 2**63 - 1
    description: ClassVar[str] = "raw"

    def virtual_size(self, size: int) -> int:
        """Raw keeps the exact size."""
        return size

    def _write(self, reader: PointSource, fd: int, progress: Progress) -> None:
        os.ftruncate(fd, reader.size)
        unit = max(reader.chunk_size, 1 * MiB)

        def work(k: int, data: bytes) -> int:
            mv = memoryview(data)
            for start, end in nonzero_runs(data, HOLE_GRANULARITY):
                pwrite_all(fd, [mv[start:end]], k * unit + start)  # offsets are fixed: write from the worker
            return len(data)

        for _ in UnitPipeline(reader, unit, work, self.workers, progress):
            pass
