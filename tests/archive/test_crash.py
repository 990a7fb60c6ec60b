"""``kill -9`` during backup and prune never loses or damages a committed point."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from lifeboat.archive import Archive
from lifeboat.archive.restore import restore
from lifeboat.archive.verify import verify
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT

CS = 65536


def _run(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(LIFEBOAT + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_after(proc: subprocess.Popen[bytes], delay: float) -> None:
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _check(loc: str, tmp_path: Path) -> int:
    arc = Archive.open(loc)
    assert verify(arc).ok
    count = 0
    for machine in arc.machines():
        for p in arc.points(machine):
            out = tmp_path / f"check-{p.point}"
            restore(arc.reader(p), out)
            assert out.read_bytes() == Path(p.source).read_bytes(), f"{p.point} differs from {p.source}"
            out.unlink()
            count += 1
    return count


def test_kill_during_backup_and_prune(tmp_path: Path) -> None:
    loc = str(tmp_path / "arc")
    Archive.init(loc, chunk_size=CS)
    env = dict(os.environ, LIFEBOAT_ARCHIVE=loc)
    rnd = random.Random(9)
    disk = bytearray(os.urandom(24 * 1024 * 1024))
    first = tmp_path / "v0.img"
    first.write_bytes(bytes(disk))
    began = time.monotonic()
    done = subprocess.run(LIFEBOAT + ["backup", "m", str(first)], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr
    duration = time.monotonic() - began  # kills are spread over what a backup takes on this machine now
    committed = 1
    for i in range(1, 10):
        for _ in range(40):
            off = rnd.randrange(0, len(disk) - CS)
            disk[off:off + CS] = os.urandom(CS)
        img = tmp_path / f"v{i}.img"  # the point's "source" names the exact bytes it must hold
        img.write_bytes(bytes(disk))
        _kill_after(_run(["backup", "m", str(img)], env), rnd.uniform(0.02, 1.2) * duration)
        committed = _check(loc, tmp_path)
    arc = Archive.open(loc)
    arc.config["retention"] = {"keep_last": 2}
    arc.save_config()
    for _ in range(6):
        _kill_after(_run(["prune"], env), rnd.uniform(0.0, 0.3))
        _check(loc, tmp_path)
    done = subprocess.run(LIFEBOAT + ["prune"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert _check(loc, tmp_path) == min(2, committed)
