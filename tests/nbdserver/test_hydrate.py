"""``--hydrate-to``: demand-first background copy, resumable, then served from the local disk."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lifeboat.archive import Archive
from lifeboat.nbdserver.hydrate import HEADER_SIZE, state_path
from lifeboat.nbdserver.storage import Bitmap
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from tests.nbdserver.conftest import Served, archive_digest, run
from tests.nbdserver.test_writable import apply, qemu_io

SLOW = "2M"  # archive bytes per second: slow enough to catch hydration half way
FAST = "256M"


def progress_bits(target: Path, size: int, chunk: int) -> Bitmap:
    """The persisted progress bitmap of a hydration target."""
    raw = state_path(target).read_bytes()
    return Bitmap(-(-size // chunk), raw[HEADER_SIZE:])


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 180) -> None:
    """Poll until ``predicate`` holds (a generous deadline, not a performance threshold)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def test_hydration_is_demand_first_resumable_and_complete(fresh_archive: Path, tmp_path: Path,
                                                          serve: Callable[..., Served], test_image: Path) -> None:
    before = archive_digest(fresh_archive)
    arc = Archive.open(str(fresh_archive))
    point = arc.resolve("web01")
    size, chunk = point.size, point.chunk_size
    last = (size - 1) // chunk
    middle = last // 2
    target = tmp_path / "disk" / "web01.raw"
    target.parent.mkdir()
    effects: list[tuple[str, int, int, int]] = []

    s = serve(fresh_archive, "web01", "--writable", "--hydrate-to", str(target), "--archive-rate", SLOW)
    assert target.is_file() and state_path(target).is_file()
    # a client reads the end of the disk: that chunk is copied ahead of the background stream
    qemu_io(s.url, f"read {size - 8192} 8192")  # qemu-io flushes when it exits: progress is saved
    bits = progress_bits(target, size, chunk)
    assert bits[last], "the chunk a client read must be hydrated first"
    assert not bits[middle], "the background copy cannot have reached the middle yet"
    # writes land in the target; flushed ones survive a crash
    qemu_io(s.url, f"write -P 0x3c {middle * chunk - 1000} 5000", "write -P 0xc3 4096 4096", "flush")
    effects += [("fill", middle * chunk - 1000, 5000, 0x3C), ("fill", 4096, 4096, 0xC3)]
    bits = progress_bits(target, size, chunk)
    assert bits[middle] and not bits.full
    s.kill()  # crash half way

    s2 = serve(fresh_archive, "web01", "--writable", "--hydrate-to", str(target), "--archive-rate", FAST)
    qemu_io(s2.url, "read -P 0x3c " + f"{middle * chunk - 1000} 5000", "write -P 0x66 9999 3")
    effects.append(("fill", 9999, 3, 0x66))
    wait_for(lambda: "complete" in s2.stderr, "hydration to complete")
    assert "resum" in s2.stderr and "%" in s2.stderr  # progress was shown
    expected = apply(test_image.read_bytes(), effects)
    run(["nbdcopy", s2.url, str(tmp_path / "served.img")])
    assert (tmp_path / "served.img").read_bytes() == expected
    assert s2.stop() == 0
    assert target.read_bytes() == expected, "the target is the point plus the writes"
    assert progress_bits(target, size, chunk).full

    # complete: served from the target alone, the archive's chunks are not needed any more
    packs = fresh_archive / "packs"
    packs.rename(fresh_archive / "packs-away")
    try:
        s3 = serve(fresh_archive, "web01", "--writable", "--hydrate-to", str(target))
        wait_for(lambda: "complete: serving it" in s3.stderr, "the server to say it serves the finished copy")
        run(["nbdcopy", s3.url, str(tmp_path / "final.img")])
        assert (tmp_path / "final.img").read_bytes() == expected
        assert s3.stop() == 0
    finally:
        (fresh_archive / "packs-away").rename(packs)
    assert archive_digest(fresh_archive) == before


def test_read_only_hydration_and_refusals(fresh_archive: Path, tmp_path: Path, serve: Callable[..., Served],
                                          test_image: Path) -> None:
    import subprocess

    from tests.nbdserver.conftest import REPO

    target = tmp_path / "ro.raw"
    s = serve(fresh_archive, "web01", "--hydrate-to", str(target))
    proc = run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 512", s.url], check=False)
    assert proc.returncode != 0 or "failed" in (proc.stdout + proc.stderr).lower()
    wait_for(lambda: "complete" in s.stderr, "hydration to complete")
    assert s.stop() == 0
    assert target.read_bytes() == test_image.read_bytes()

    # lifeboat never overwrites a file it did not create
    foreign = tmp_path / "foreign.raw"
    foreign.write_bytes(b"precious" * 1000)
    proc = subprocess.run([*LIFEBOAT, "--archive", str(fresh_archive), "serve", "web01",
                           "--hydrate-to", str(foreign), "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                          timeout=30, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == "" and "lifeboat only writes files it created" in proc.stderr
    assert foreign.read_bytes() == b"precious" * 1000
