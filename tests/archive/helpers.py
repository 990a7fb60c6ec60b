"""Small helpers shared by the archive tests: sources made of bytes, and full reads."""

from __future__ import annotations

from lifeboat.archive import PointReader


class BytesSource:
    """A backup source over a bytes object."""

    def __init__(self, data: bytes, name: str = "memory") -> None:
        self.data = data
        self.size = len(data)
        self.name = name

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``."""
        return self.data[offset:offset + length]


def read_all(reader: PointReader) -> bytes:
    """Every byte of a point."""
    return reader.read(0, reader.size)
