"""The catalog cache (``archive/catalog.py``): a reader's summaries equal a fresh read of every
manifest after points are added, pruned and relinked by another writer, and unchanged machines are
not read again; both ways of seeing a change: a local archive's folder stamps, and the key listing
of a backend without stamps."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.backend import Backend
from lifeboat.archive.catalog import Catalog, summarize
from lifeboat.archive.prune import prune
from tests.archive.helpers import BytesSource

CS = 4096


def fresh(arc: Archive) -> dict[str, object]:
    """The summaries as a read of every manifest gives them."""
    return {m: summarize(m, arc.points(m)) for m in arc.machines()}


@pytest.fixture(params=["stamps", "listing"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``stamps``: the local backend's folder stamps, with a clock far ahead so that every folder
    has settled (its own test covers the racy window); ``listing``: the base class's answer (no
    stamps), so the catalog compares key sets."""
    import lifeboat.archive.local as local

    if request.param == "stamps":
        monkeypatch.setattr(local, "time", SimpleNamespace(time_ns=lambda: 2**62))
    else:
        monkeypatch.setattr(local.LocalBackend, "change_stamps", Backend.change_stamps)
    return str(request.param)


def backdate(arc: Archive, machine: str) -> None:
    """Set a machine folder's modification time far back, so that its next change moves it even
    within the same tick of the file system's clock."""
    os.utime(Path(arc.backend.location) / "points" / machine, ns=(10**9, 10**9))


def test_summaries_follow_new_pruned_and_relinked_points(tmp_path: Path, mode: str) -> None:
    writer = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    disk = bytearray(os.urandom(CS * 16))
    for _ in range(3):
        disk[:CS] = os.urandom(CS)
        writer.backup("web01", BytesSource(bytes(disk)))
    writer.backup("db01", BytesSource(bytes(CS * 4)))
    for m in ("web01", "db01"):
        backdate(writer, m)
    catalog = Catalog(Archive.open(str(tmp_path / "arc")))  # another process's view

    first = catalog.summaries()
    assert first == fresh(writer) and list(first) == ["db01", "web01"] and first["web01"].points == 3
    assert catalog.reads == 2
    assert catalog.summaries() == first and catalog.reads == 2  # nothing changed: nothing read

    disk[:CS] = os.urandom(CS)
    newest = writer.backup("web01", BytesSource(bytes(disk)))
    backdate(writer, "web01")
    added = catalog.summaries()
    assert added == fresh(writer) and added["web01"].newest == newest and added["web01"].points == 4
    assert catalog.reads == 3  # only web01 again

    # prune removes web01's two oldest points and relinks the third to nothing: a replaced manifest
    writer.config["retention"] = {"keep_last": 2}
    writer.save_config()
    report = prune(writer)
    assert len(report.removed) == 2 and report.relinked
    pruned = catalog.summaries()
    assert pruned == fresh(writer) and pruned["web01"].points == 2
    assert [p.parent for p in catalog.archive.points("web01")][0] is None  # the relinked manifest, read anew

    for p in writer.points("db01"):
        writer.backend.delete(p.key)
    (tmp_path / "arc" / "points" / "lost+found").mkdir()  # a folder that is no machine's
    assert list(catalog.summaries()) == ["web01"]  # a machine without points is gone


def test_a_folder_changed_just_now_is_read_again(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=CS)
    arc.backup("web01", BytesSource(bytes(CS)))
    catalog = Catalog(arc)
    catalog.summaries()
    catalog.summaries()
    assert catalog.reads == 2  # its times may not have moved yet for a second change in the same tick
    backdate(arc, "web01")  # its modification time says long ago, its change time still says now
    catalog.summaries()
    assert catalog.reads == 3
