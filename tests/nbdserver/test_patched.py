"""A point stored as patches over its base (a tracked incremental) serves byte for byte."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lifeboat.archive import Archive
from tests.archive.helpers import BytesSource
from tests.nbdserver.conftest import Served, run

MiB = 1024 * 1024


def test_a_patched_point_serves_every_byte(tmp_path: Path, serve: Callable[..., Served]) -> None:
    arc = Archive.init(str(tmp_path / "archive"), chunk_size=MiB)
    disk = bytearray(os.urandom(8 * MiB))
    disk[3 * MiB:5 * MiB] = bytes(2 * MiB)
    base = arc.backup("app01", BytesSource(bytes(disk)))
    changed = [(8192, 4096), (MiB - 4096, 8192), (3 * MiB + 65536, 4096), (7 * MiB, 12288)]
    for off, n in changed:
        disk[off:off + n] = os.urandom(n)
    info = arc.backup("app01", BytesSource(bytes(disk)), changed=changed, base=base)
    assert len(arc.chunk_table(info).patches) == 4
    s = serve(tmp_path / "archive", "app01")
    run(["nbdcopy", s.url, str(tmp_path / "out.img")])
    assert (tmp_path / "out.img").read_bytes() == bytes(disk)
