"""``--writable``: writes land in the copy-on-write overlay, survive restarts, never reach the archive."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from lifeboat.archive import Archive
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from tests.nbdserver.conftest import REPO, MiB, Served, archive_digest, new_archive, run

# (qemu-io command, effect on the expected image): unaligned, across clusters and chunks
WRITES: list[tuple[str, tuple[str, int, int, int]]] = [
    ("write -P 0x5a 1000 70000", ("fill", 1000, 70000, 0x5A)),
    ("write -P 0xa5 1048000 300000", ("fill", 1048000, 300000, 0xA5)),  # crosses a chunk boundary
    ("write -z 3000000 2100000", ("fill", 3000000, 2100000, 0)),
    ("write -P 0x11 20971520 65536", ("fill", 20971520, 65536, 0x11)),  # cluster-aligned
    ("discard 8388608 2097152", ("fill", 8388608, 2097152, 0)),  # TRIM reads back as zeros here
    ("write -P 0x77 33550336 4096", ("fill", 33550336, 4096, 0x77)),  # the last 4 KiB
]


def apply(image: bytes, effects: list[tuple[str, int, int, int]]) -> bytes:
    out = bytearray(image)
    for _, off, n, byte in effects:
        out[off : off + n] = bytes([byte]) * n
    return bytes(out)


def qemu_io(url: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = run([*args, url]).stdout
    assert "failed" not in out.lower(), out
    return out


def test_writes_persist_across_restart_and_archive_never_changes(fresh_archive: Path, tmp_path: Path,
                                                                 serve: Callable[..., Served],
                                                                 test_image: Path) -> None:
    before = archive_digest(fresh_archive)
    original = test_image.read_bytes()
    s = serve(fresh_archive, "web01", "--writable")
    info = json.loads(run(["nbdinfo", "--json", s.url]).stdout)["exports"][0]
    assert info["is_read_only"] is False and info["can_trim"] and info["can_zero"] and info["can_fua"]
    assert info["can_flush"] and info["can_multi_conn"]
    qemu_io(s.url, *(cmd for cmd, _ in WRITES))
    expected = apply(original, [e for _, e in WRITES])
    run(["nbdcopy", s.url, str(tmp_path / "live.img")])
    assert (tmp_path / "live.img").read_bytes() == expected
    assert s.stop() == 0

    arc = Archive.open(str(fresh_archive))
    point = arc.resolve("web01")
    overlay = fresh_archive / "overlays" / f"web01-{point.point}.cow"
    assert overlay.is_file()

    s2 = serve(fresh_archive, "web01", "--writable")  # a restart keeps the writes
    run(["nbdcopy", s2.url, str(tmp_path / "again.img")])
    assert (tmp_path / "again.img").read_bytes() == expected
    qemu_io(s2.url, "write -P 0x42 5000 10")
    assert s2.stop() == 0

    s3 = serve(fresh_archive, "web01")  # read-only: the point itself, untouched
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", s3.url, str(test_image)])
    assert arc.reader(point).read(0, point.size) == original
    assert archive_digest(fresh_archive) == before
    restored = tmp_path / "restored.img"
    subprocess.run([*LIFEBOAT, "--archive", str(fresh_archive), "restore", "web01",
                    str(restored)], check=True, cwd=REPO, capture_output=True)
    assert restored.read_bytes() == original


def test_flushed_writes_survive_a_crash(fresh_archive: Path, tmp_path: Path, serve: Callable[..., Served],
                                        test_image: Path) -> None:
    s = serve(fresh_archive, "web01", "--writable")
    qemu_io(s.url, "write -P 0x99 123456 200000", "flush")  # qemu-io also flushes on exit
    s.kill()
    s2 = serve(fresh_archive, "web01", "--writable")
    out = qemu_io(s2.url, "read -P 0x99 123456 200000", "read -P 0 0 0")
    assert "read 200000/200000" in out
    run(["nbdcopy", s2.url, str(tmp_path / "after.img")])
    assert (tmp_path / "after.img").read_bytes() == apply(test_image.read_bytes(), [("fill", 123456, 200000, 0x99)])


def test_fio_random_read_write_with_verify(fresh_archive: Path, serve: Callable[..., Served]) -> None:
    before = archive_digest(fresh_archive)
    s = serve(fresh_archive, "web01", "--writable")
    out = run(["fio", "--name=randrw", "--ioengine=nbd", f"--uri={s.url}", "--rw=randrw", "--bs=4k",
               "--size=24M", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
               "--randseed=99", "--output-format=json"], timeout=300).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
    # several clients at once on the same writable export (multi-conn), fio verifying
    out = run(["fio", "--name=multi", "--ioengine=nbd", f"--uri={s.url}", "--rw=randwrite", "--bs=64k",
               "--size=4M", "--numjobs=4", "--offset_increment=4M", "--iodepth=4", "--verify=md5",
               "--verify_fatal=1", "--output-format=json"], timeout=300).stdout
    assert all(j["error"] == 0 for j in json.loads(out[out.index("{"):])["jobs"])
    assert archive_digest(fresh_archive) == before


def test_overlay_belongs_to_one_point(tmp_path: Path, test_image: Path, serve: Callable[..., Served]) -> None:
    arc_a = new_archive(tmp_path / "a", test_image, "alpha")
    arc_b = new_archive(tmp_path / "b", test_image, "beta")
    overlay = tmp_path / "shared.cow"
    s = serve(arc_a, "alpha", "--writable", "--overlay", str(overlay))
    qemu_io(s.url, "write -P 0x01 0 4096")
    proc = subprocess.run([*LIFEBOAT, "--archive", str(arc_b), "serve", "beta",
                           "--writable", "--overlay", str(overlay), "--listen", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "in use" in proc.stderr  # the first server still holds it
    assert s.stop() == 0
    proc = subprocess.run([*LIFEBOAT, "--archive", str(arc_b), "serve", "beta",
                           "--writable", "--overlay", str(overlay), "--listen", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 2 and "belongs to alpha@" in proc.stderr
    assert overlay.stat().st_size > 32 * MiB  # untouched, still alpha's
