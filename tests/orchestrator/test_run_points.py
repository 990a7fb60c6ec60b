"""``lifeboat run --point``: a runbook whose machines boot other points for one run
(``runbook.with_points``); its digest changes with them, so an interrupted run resumes only with
the same points."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifeboat.orchestrator.runbook import load, with_points
from lifeboat.plumbing.errors import UsageError
from tests.orchestrator.test_engine import machine, runbook, write_runbook


def test_points_replace_the_runbooks_own(tmp_path: Path) -> None:
    machines = [machine("app", point="web01@latest"), machine("db", point="db01")]
    rb = load(write_runbook(tmp_path / "r.yaml", runbook("r", machines, target={"driver": "qemu"})))
    assert with_points(rb, {}) is rb
    other = with_points(rb, {"app": "web01@0123456789ab"})
    assert [m.selector for m in other.machines] == ["web01@0123456789ab", "db01"]
    assert [m.selector for m in rb.machines] == ["web01@latest", "db01"]  # the loaded runbook is unchanged
    assert other.digest != rb.digest and with_points(rb, {"app": "web01@0123456789ab"}).digest == other.digest
    assert with_points(rb, {"app": "web01@2026-01-01T00:00:00Z"}).digest != other.digest
    with pytest.raises(UsageError, match="no machine 'web01'"):
        with_points(rb, {"web01": "web01"})
    with pytest.raises(UsageError, match="yesterday"):
        with_points(rb, {"app": "web01@yesterday"})
