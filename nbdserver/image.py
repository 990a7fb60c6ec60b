"""A raw image file served over NBD under a copy-on-write overlay: the point as the pxe target's
instant mode attaches it (``targets/pxeinstant.py``), where the driver has the point as a raw
image (it ``TakesImage``) rather than an archive to ``lifeboat serve`` from.

Run as its own process by the driver (``python -m lifeboat.nbdserver.image IMAGE OVERLAY HOST
READY TOKEN``): it listens on HOST at a free port, writes ``{"port": N}`` to the file READY once it
does, and serves the export ``lifeboat`` until SIGTERM (the overlay flushed on the way out). The
token only marks the process as the run's, so that teardown finds it. Writes go to the overlay,
never to the image.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from lifeboat.nbdserver.overlay import CowVolume
from lifeboat.nbdserver.server import Export
from lifeboat.nbdserver.service import serve_until_signal
from lifeboat.nbdserver.volume import Volume

EXPORT = "lifeboat"


class ImageVolume(Volume):
    """A raw image file, read-only (the base under the overlay)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.description = f"lifeboat point image {path.name}"

    def read(self, offset: int, length: int) -> bytes:
        """From the file."""
        return os.pread(self.fd, length, offset)

    def read_fast(self, offset: int, length: int) -> bytes | None:
        """A local file: answered in line."""
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        """The file."""
        os.close(self.fd)


def main(argv: list[str]) -> int:
    """``image IMAGE OVERLAY HOST READY TOKEN`` (module docstring)."""
    image, overlay, host, ready, _token = argv
    base = ImageVolume(Path(image))
    volume = CowVolume(base, Path(overlay), {"image": image, "size": base.size})

    def listening(_host: str, port: int) -> None:
        tmp = Path(ready + ".tmp")
        tmp.write_text(json.dumps({"port": port}))
        os.replace(tmp, ready)

    asyncio.run(serve_until_signal([Export(EXPORT, volume, "the point for instant mode")], host, 0,
                                   on_listening=listening))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
