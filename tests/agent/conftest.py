"""Fixtures of the agent tests: a local archive, and the sample guest running its workload under QEMU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from tests.agent.guest import Guest, make_disk


@pytest.fixture
def arc(tmp_path: Path) -> Archive:
    """An empty local archive with 1 MiB chunks."""
    return Archive.init(str(tmp_path / "archive"))


@pytest.fixture
def guest(sample_guest_image: Path, tmp_path: Path) -> Iterator[Guest]:
    """The sample guest, booted from a qcow2 copy, writing a record every 100 ms."""
    work = tmp_path / "guest"
    work.mkdir()
    g = Guest(make_disk(sample_guest_image, work), work)
    g.start()
    try:
        yield g
    finally:
        g.kill()
