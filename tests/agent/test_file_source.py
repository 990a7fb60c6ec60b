"""FileSource: holes of a sparse image are never read, and the point is still exact."""

from __future__ import annotations

import os
from pathlib import Path

from lifeboat.archive import Archive
from lifeboat.archive.files import FileSource
from tests.archive.helpers import read_all

CS = 65536


def test_holes_are_skipped(tmp_path: Path) -> None:
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(CS * 64 + 100)
        f.seek(CS * 10 + 7)
        f.write(os.urandom(CS))
        f.seek(CS * 64)
        f.write(b"tail" * 25)
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    with FileSource(img) as src:
        extents = src.data_extents()
        assert extents is not None and sum(n for _, n in extents) < CS * 8
        info = arc.backup("s", src)
    assert info.bytes_read <= CS * 8  # only chunks with allocated data were read
    assert read_all(arc.reader(info)) == img.read_bytes()


def test_dense_file_reports_one_extent(tmp_path: Path) -> None:
    img = tmp_path / "dense.img"
    img.write_bytes(os.urandom(CS * 3))
    with FileSource(img) as src:
        assert src.data_extents() == [(0, CS * 3)]
