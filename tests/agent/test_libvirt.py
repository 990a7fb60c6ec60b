"""libvirt checkpoints + pull-mode backups of a real domain run by a real libvirtd (the session fixture starts it if
none answers), beyond the capture-source suite (``test_source_conformance.py``): points taken while
the guest writes restore to states it had, and a resized disk falls back to a full read that says why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lifeboat.agent.plan import MODE_CHECKPOINT, MODE_FULL, BackupPlan, capture
from lifeboat.agent.virt import LibvirtSource
from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.restore import restore
from lifeboat.orchestrator.sources import open_source
from tests.agent.guest import Domain, check_point


@pytest.fixture
def domain(libvirtd: str, sample_guest_image: Path) -> Iterator[Domain]:
    d = Domain(sample_guest_image)
    try:
        yield d
    finally:
        d.close()


def backup(arc: Archive, dom: Domain) -> tuple[PointInfo, BackupPlan]:
    with open_source(dom.spec) as src:
        assert isinstance(src, LibvirtSource)
        return capture(arc, "vm", src)


def verify(arc: Archive, info: PointInfo, dom: Domain, tmp_path: Path) -> int:
    dest = tmp_path / f"{info.point}.img"
    restore(arc.reader(info), dest)
    return check_point(dest, info.time, dom.console)


def test_points_while_writing_and_a_resized_disk(arc: Archive, domain: Domain, tmp_path: Path) -> None:
    full, plan = backup(arc, domain)
    assert plan.mode == MODE_FULL and plan.fallback_reason is None
    verify(arc, full, domain, tmp_path)
    domain.wait_records(domain.console.wrote_max() + 3)
    inc, plan = backup(arc, domain)
    assert plan.mode == MODE_CHECKPOINT and plan.base and plan.base.point == full.point
    assert verify(arc, inc, domain, tmp_path) > 3
    domain.dom.blockResize("vda", inc.size + 32 * 1024 * 1024, 1)  # flag 1: size in bytes
    info, plan = backup(arc, domain)
    assert plan.mode == MODE_FULL and plan.fallback_reason and "resized" in plan.fallback_reason
    verify(arc, info, domain, tmp_path)
    domain.wait_records(domain.console.wrote_max() + 2)
    info, plan = backup(arc, domain)
    assert plan.mode == MODE_CHECKPOINT
    verify(arc, info, domain, tmp_path)
