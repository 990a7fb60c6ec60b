"""QMP dirty-bitmap capture of a running guest: every point restores to a state the guest had, and
every broken chain (killed QEMU, deleted, corrupted or disabled bitmap, resized disk) ends in a
correct full point that says why, never in a wrong incremental."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from lifeboat.agent.plan import MODE_BITMAP, MODE_FULL, BackupPlan, CaptureError, capture
from lifeboat.agent.qmp import QmpSource
from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.restore import restore
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.orchestrator.sources import open_source
from tests.agent.guest import Guest, check_point


def backup(arc: Archive, guest: Guest) -> tuple[PointInfo, BackupPlan]:
    with open_source(guest.spec) as src:
        assert isinstance(src, QmpSource)
        return capture(arc, "vm", src)


def restored(arc: Archive, info: PointInfo, tmp_path: Path) -> Path:
    dest = tmp_path / f"restore-{info.point}.img"
    restore(arc.reader(info), dest)
    return dest


def verify(arc: Archive, info: PointInfo, guest: Guest, tmp_path: Path) -> int:
    return check_point(restored(arc, info, tmp_path), info.time, guest.console)


def lifeboat_bitmaps(guest: Guest) -> list[dict[str, object]]:
    nodes = guest.qmp("query-named-block-nodes", flat=True)
    assert isinstance(nodes, list)
    return [b for n in nodes for b in n.get("dirty-bitmaps", []) if str(b.get("name", "")).startswith("lifeboat")]


def test_full_then_incrementals_while_the_guest_writes(arc: Archive, guest: Guest, tmp_path: Path) -> None:
    full, plan = backup(arc, guest)
    assert plan.mode == MODE_FULL and plan.fallback_reason is None  # the first backup is full, not a fallback
    assert full.bytes_read == full.size
    points = [full]
    for i in range(3):
        guest.wait_records(guest.console.wrote_max() + 3)
        info, plan = backup(arc, guest)
        assert plan.mode == MODE_BITMAP, plan
        assert plan.base is not None and plan.base.point == points[-1].point and info.parent == points[-1].point
        assert plan.changed and 0 < info.bytes_read <= 8 * 1024 * 1024, (i, info.bytes_read)
        points.append(info)
    counts = [verify(arc, p, guest, tmp_path) for p in points]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    # one persistent, recording tracking bitmap remains; no fleecing leftovers
    bitmaps = lifeboat_bitmaps(guest)
    assert len(bitmaps) == 1 and bitmaps[0]["persistent"] and bitmaps[0]["recording"], bitmaps
    assert guest.qmp("query-block-jobs") == [] and guest.qmp("query-block-exports") == []
    assert not list(guest.workdir.glob("lifeboat-*"))


def test_cli_json_reports_mode_and_fallback(arc: Archive, guest: Guest, tmp_path: Path) -> None:
    env = {**os.environ, "LIFEBOAT_ARCHIVE": arc.backend.location}
    docs = []
    for _ in range(2):
        out = subprocess.run([*LIFEBOAT, "backup", "vm", guest.spec, "--json"], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        docs.append(json.loads(out.stdout))
    assert docs[0]["mode"] == "full" and docs[0]["fallback_reason"] is None
    assert docs[1]["mode"] == "incremental-bitmap" and docs[1]["base"] == docs[0]["point"]
    assert docs[1]["changed_bytes"] > 0 and docs[1]["bytes_read"] < docs[0]["bytes_read"]
    guest.qmp("block-dirty-bitmap-remove", node=lifeboat_node(guest), name=lifeboat_bitmaps(guest)[0]["name"])
    out = subprocess.run([*LIFEBOAT, "backup", "vm", guest.spec, "--json"], env=env, capture_output=True,
                         text=True, timeout=120)
    doc = json.loads(out.stdout)
    assert doc["mode"] == "full" and "missing" in doc["fallback_reason"], doc
    verify(arc, arc.resolve(f"vm@{doc['point']}"), guest, tmp_path)


def lifeboat_node(guest: Guest) -> str:
    nodes = guest.qmp("query-named-block-nodes", flat=True)
    assert isinstance(nodes, list)
    return next(n["node-name"] for n in nodes if any(str(b.get("name", "")).startswith("lifeboat")
                                                     for b in n.get("dirty-bitmaps", [])))


def test_guest_killed_mid_backup_then_inconsistent_bitmap(arc: Archive, guest: Guest, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = backup(arc, guest)
    guest.quit()
    guest.start()  # the bitmap now comes from the qcow2, which QEMU marks "in use" while it runs
    guest.wait_records(guest.console.wrote_max() + 3)
    # A full capture into a second archive reads 256 MiB, more than the 128 MiB that reads ahead:
    # killing QEMU at its first read is sure to leave bytes that can no longer be read.
    other = Archive.init(str(tmp_path / "other-archive"))
    with open_source(guest.spec) as src:
        assert isinstance(src, QmpSource)
        real_read = src.read
        reads = 0

        def read_then_die(offset: int, length: int) -> bytes | bytearray:
            nonlocal reads
            reads += 1
            if reads == 1:
                guest.kill()  # QEMU dies while the capture is reading the frozen view
            return real_read(offset, length)

        monkeypatch.setattr(src, "read", read_then_die)
        with pytest.raises(CaptureError, match="stopped serving|failed"):
            capture(other, "vm", src)
    assert other.points("vm") == []  # no point from the failed capture
    assert [p.point for p in arc.points("vm")] == [base.point]
    guest.start()  # QEMU was killed: the qcow2's persistent bitmap is still marked in use
    info, plan = backup(arc, guest)
    assert plan.mode == MODE_FULL and plan.fallback_reason and "inconsistent" in plan.fallback_reason
    assert info.bytes_read == info.size
    verify(arc, info, guest, tmp_path)
    guest.wait_records(guest.console.wrote_max() + 2)
    after, plan = backup(arc, guest)  # the chain is whole again
    assert plan.mode == MODE_BITMAP and plan.base and plan.base.point == info.point
    verify(arc, after, guest, tmp_path)


def set_bitmaps_in_use(qcow2: Path) -> int:
    """Corrupt a stopped image the way a crash does: set IN_USE on every persistent bitmap."""
    data = bytearray(qcow2.read_bytes()[:1 << 20])
    header_length = struct.unpack_from(">I", data, 100)[0]
    pos = header_length
    with open(qcow2, "r+b") as f:
        while pos + 8 <= len(data):
            magic, length = struct.unpack_from(">II", data, pos)
            if magic == 0:
                break
            if magic == 0x23852875:  # bitmaps extension
                nb, _res, dir_size, dir_off = struct.unpack_from(">IIQQ", data, pos + 8)
                f.seek(dir_off)
                directory = bytearray(f.read(dir_size))
                at = 0
                for _ in range(nb):
                    flags_at = at + 12
                    flags = struct.unpack_from(">I", directory, flags_at)[0]
                    struct.pack_into(">I", directory, flags_at, flags | 1)
                    name_size = struct.unpack_from(">H", directory, at + 18)[0]
                    extra = struct.unpack_from(">I", directory, at + 20)[0]
                    entry = 24 + extra + name_size
                    at += entry + (-entry % 8)
                f.seek(dir_off)
                f.write(directory)
                return int(nb)
            pos += 8 + length + (-length % 8)
    raise AssertionError("no bitmaps extension in the image")


def test_corrupted_bitmap_falls_back(arc: Archive, guest: Guest, tmp_path: Path) -> None:
    backup(arc, guest)
    guest.quit()  # clean stop: the bitmap is saved in the qcow2
    assert set_bitmaps_in_use(guest.disk) == 1
    guest.start()
    info, plan = backup(arc, guest)
    assert plan.mode == MODE_FULL and plan.fallback_reason and "inconsistent" in plan.fallback_reason
    verify(arc, info, guest, tmp_path)


def test_clean_restart_keeps_the_persistent_chain(arc: Archive, guest: Guest, tmp_path: Path) -> None:
    first, _ = backup(arc, guest)
    guest.wait_records(guest.console.wrote_max() + 2)
    guest.quit()
    guest.start()  # writes made before the quit and after the restart are all in the saved bitmap
    info, plan = backup(arc, guest)
    assert plan.mode == MODE_BITMAP and plan.base and plan.base.point == first.point, plan
    assert verify(arc, info, guest, tmp_path) >= 3  # records of the second boot, found by the bitmap


def test_disabled_bitmap_and_resized_disk_fall_back(arc: Archive, guest: Guest, tmp_path: Path) -> None:
    backup(arc, guest)
    node = lifeboat_node(guest)
    guest.qmp("block-dirty-bitmap-disable", node=node, name=lifeboat_bitmaps(guest)[0]["name"])
    info, plan = backup(arc, guest)
    assert plan.mode == MODE_FULL and plan.fallback_reason and "disabled" in plan.fallback_reason
    verify(arc, info, guest, tmp_path)
    bigger = info.size + 64 * 1024 * 1024
    guest.qmp("block_resize", device="virtio0", size=bigger)
    guest.wait_records(guest.console.wrote_max() + 2)
    info, plan = backup(arc, guest)
    assert plan.mode == MODE_FULL and plan.fallback_reason and "resized" in plan.fallback_reason
    assert info.size == bigger
    verify(arc, info, guest, tmp_path)
    guest.wait_records(guest.console.wrote_max() + 2)
    info, plan = backup(arc, guest)
    assert plan.mode == MODE_BITMAP and info.size == bigger
    verify(arc, info, guest, tmp_path)


def test_a_bad_spec_is_a_usage_error_and_no_qemu_an_operation_that_failed(tmp_path: Path) -> None:
    env = {**os.environ, "LIFEBOAT_ARCHIVE": str(tmp_path / "a")}
    subprocess.run([*LIFEBOAT, "archive", "init"], env=env, check=True, capture_output=True)
    for spec, status, why in [("qmp+unix:///nonexistent/qmp.sock?node=x", 1, "cannot connect"),
                              ("qmp+unix:///tmp/qmp.sock", 2, "node=")]:
        out = subprocess.run([*LIFEBOAT, "backup", "vm", spec], env=env, capture_output=True, text=True)
        assert out.returncode == status and why in out.stderr, out.stderr


def test_nbd_server_left_by_a_killed_capture_or_held_by_another_tool(arc: Archive, guest: Guest,
                                                                     tmp_path: Path) -> None:
    stray = {"type": "unix", "data": {"path": str(guest.workdir / "stray.sock")}}
    guest.qmp("nbd-server-start", addr=stray)  # what a capture killed after starting the server leaves
    info, plan = backup(arc, guest)
    assert plan.mode == MODE_FULL
    verify(arc, info, guest, tmp_path)
    guest.qmp("nbd-server-start", addr=stray)
    guest.qmp("block-export-add", type="nbd", id="someone-else", **{"node-name": lifeboat_node(guest)},
              name="theirs")
    with pytest.raises(CaptureError, match="in use by another tool"):
        backup(arc, guest)
    assert [p.point for p in arc.points("vm")] == [info.point]
    guest.qmp("block-export-del", id="someone-else")
    guest.qmp("nbd-server-stop")
    after, plan = backup(arc, guest)  # the failed try kept the chain
    assert plan.mode == MODE_BITMAP and plan.base and plan.base.point == info.point
    verify(arc, after, guest, tmp_path)
