"""A read-only export as real NBD clients see it: nbdinfo, nbdcopy, qemu-img, fio."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from lifeboat.archive import Archive
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from tests.nbdserver.conftest import FIO_PATTERN, REPO, MiB, Served, archive_digest, run


def test_nbdinfo_describes_the_export(shared_archive: Path, serve: Callable[..., Served], test_image: Path) -> None:
    s = serve(shared_archive, "web01")
    assert s.url.startswith("nbd://127.0.0.1:") and s.port > 0 and s.export == "web01"
    info = json.loads(run(["nbdinfo", "--json", s.url]).stdout)
    [export] = info["exports"]
    assert export["export-name"] == "web01"
    assert export["export-size"] == test_image.stat().st_size
    assert export["is_read_only"] is True
    assert export["can_multi_conn"] is True
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] >= 512
    assert export["block_size_maximum"] >= 1024 * 1024
    assert "base:allocation" in export["contexts"]
    assert "lifeboat web01@" in export["description"]
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False


def test_nbdinfo_list(shared_archive: Path, serve: Callable[..., Served]) -> None:
    s = serve(shared_archive, "web01", "--name", "recovered-web")
    assert s.export == "recovered-web"
    out = json.loads(run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{s.port}"]).stdout)
    assert [e["export-name"] for e in out["exports"]] == ["recovered-web"]


def test_nbdinfo_map_reports_zero_chunks_as_holes(shared_archive: Path, serve: Callable[..., Served]) -> None:
    s = serve(shared_archive, "web01")
    extents = json.loads(run(["nbdinfo", "--map", "--json", s.url]).stdout)
    arc = Archive.open(str(shared_archive))
    reader = arc.reader(arc.resolve("web01"))
    expected = [(off, n, 3 if zero else 0) for off, n, zero in reader.extents()]
    got = [(e["offset"], e["length"], e["type"]) for e in extents]
    assert got == expected
    assert any(t == 3 for _, _, t in got), "the image has zero chunks; they must show as holes"


def test_nbdcopy_equals_lifeboat_restore(shared_archive: Path, serve: Callable[..., Served], tmp_path: Path,
                                         test_image: Path) -> None:
    s = serve(shared_archive, "web01")
    copy = tmp_path / "copy.img"
    run(["nbdcopy", s.url, str(copy)])
    restored = tmp_path / "restored.img"
    subprocess.run([*LIFEBOAT, "--archive", str(shared_archive), "restore", "web01",
                    str(restored)], check=True, cwd=REPO, capture_output=True)
    assert copy.read_bytes() == restored.read_bytes() == test_image.read_bytes()


def test_qemu_img_compare(shared_archive: Path, serve: Callable[..., Served], test_image: Path) -> None:
    s = serve(shared_archive, "web01")
    out = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", s.url, str(test_image)]).stdout
    assert "identical" in out


def test_fio_random_reads_verify(shared_archive: Path, serve: Callable[..., Served]) -> None:
    """fio re-reads, in random order, the crc32c-verified blocks it wrote into the image."""
    s = serve(shared_archive, "web01")
    out = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={s.url}", *FIO_PATTERN, "--verify_only",
               "--iodepth=16", "--verify_fatal=1", "--output-format=json"], timeout=180).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] >= 16 * MiB


def test_eight_clients_at_once(shared_archive: Path, serve: Callable[..., Served], tmp_path: Path,
                               test_image: Path) -> None:
    s = serve(shared_archive, "web01")
    results: list[subprocess.CompletedProcess[str] | BaseException] = [ValueError("not run")] * 8

    def client(k: int) -> None:
        try:
            if k % 2:
                results[k] = subprocess.run(["nbdcopy", s.url, str(tmp_path / f"c{k}.img")], capture_output=True,
                                            text=True, timeout=120)
            else:
                results[k] = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", s.url,
                                             str(test_image)], capture_output=True, text=True, timeout=120)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[k] = e

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = test_image.read_bytes()
    for k, r in enumerate(results):
        assert isinstance(r, subprocess.CompletedProcess), r
        assert r.returncode == 0, r.stderr
        if k % 2:
            assert (tmp_path / f"c{k}.img").read_bytes() == want


def test_read_only_export_refuses_writes_and_leaves_archive_alone(shared_archive: Path,
                                                                 serve: Callable[..., Served]) -> None:
    before = archive_digest(shared_archive)
    s = serve(shared_archive, "web01")
    proc = run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4096", s.url], check=False)
    assert proc.returncode != 0 or "failed" in (proc.stdout + proc.stderr).lower()
    assert archive_digest(shared_archive) == before
    assert not (shared_archive / "overlays").exists() or not os.listdir(shared_archive / "overlays")
