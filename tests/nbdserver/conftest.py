"""Fixtures for the NBD server tests: a test image with known content, archives holding it, and
``lifeboat serve`` run as a real subprocess (exactly as users and runbooks run it)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.files import FileSource
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.plumbing.nbd import NbdUrl

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
IMAGE_SIZE = 32 * MiB
FIO_REGION = 16 * MiB  # written by fio with a crc32c verify pattern
FIO_PATTERN = ["--bs=4k", f"--size={FIO_REGION}", "--verify=crc32c", "--randrepeat=1", "--randseed=1234",
               "--rw=randwrite"]
TOOLS = ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "fio", "qemu-system-x86_64")


def need(tool: str) -> str:
    """The path of a required tool; a missing one fails the test (it is part of the setup)."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (scripts/setup.sh installs it)")
    return path


def run(cmd: list[str], *, timeout: float = 120, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client tool; on failure the assertion shows its output."""
    need(cmd[0])
    if cmd[0] == "fio":  # fio's verify state files would land in the working directory
        cmd = [*cmd, "--verify_state_save=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout[-3000:]}\n"
                    f"stderr: {proc.stderr[-3000:]}")
    return proc


def make_image(path: Path) -> None:
    """32 MiB: a fio verify pattern, an all-zero stretch, random bytes, text, zero chunks."""
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    run(["fio", "--name=pattern", f"--filename={path}", "--ioengine=psync", *FIO_PATTERN, "--do_verify=0"])
    rng = random.Random(7)
    with open(path, "r+b") as f:
        f.seek(20 * MiB)
        f.write(rng.randbytes(5 * MiB + 12345))
        f.seek(27 * MiB + 100)
        f.write(b"lifeboat test image\n" * 10000)
        f.seek(IMAGE_SIZE - 4096)
        f.write(b"\xee" * 4096)


@pytest.fixture(scope="session")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The raw source image every read test compares against."""
    path = tmp_path_factory.mktemp("image") / "web01.img"
    make_image(path)
    return path


def new_archive(where: Path, image: Path, machine: str = "web01") -> Path:
    """An archive at ``where`` holding one point of ``image``, in 1 MiB chunks: enough chunks of
    the small test image to see what is fetched, hydrated or read ahead first."""
    arc = Archive.init(str(where), chunk_size=MiB)
    with FileSource(image) as src:
        arc.backup(machine, src)
    return where


@pytest.fixture(scope="session")
def shared_archive(tmp_path_factory: pytest.TempPathFactory, test_image: Path) -> Path:
    """An archive for read-only tests (never served --writable)."""
    return new_archive(tmp_path_factory.mktemp("shared") / "archive", test_image)


@pytest.fixture
def fresh_archive(tmp_path: Path, test_image: Path) -> Path:
    """An archive of its own, for tests that write overlays or hydrate."""
    return new_archive(tmp_path / "archive", test_image)


def archive_digest(archive: Path) -> dict[str, str]:
    """SHA-256 of every archive file outside ``overlays/``: proves the archive never changes."""
    out = {}
    for p in sorted(archive.rglob("*")):
        rel = p.relative_to(archive).as_posix()
        if p.is_file() and not rel.startswith("overlays/") and rel != "lock":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Served:
    """A running ``lifeboat serve``."""

    proc: subprocess.Popen[str]
    url: str
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return NbdUrl.parse(self.url).host

    @property
    def port(self) -> int:
        return NbdUrl.parse(self.url).port

    @property
    def export(self) -> str:
        return NbdUrl.parse(self.url).export

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the server and wait for it; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing is flushed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def start_serve(archive: Path | str, *args: str, timeout: float = 30) -> Served:
    """Start ``lifeboat serve`` on a free loopback port and wait for its URL line."""
    cmd = [*LIFEBOAT, "--archive", str(archive), "serve", *args]
    if "--listen" not in args:
        cmd += ["--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    served = Served(proc, "")
    assert proc.stderr is not None and proc.stdout is not None
    err = proc.stderr

    def pump() -> None:
        for line in err:
            served.stderr_lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    if not line.startswith("nbd://"):
        proc.kill()
        proc.wait()
        time.sleep(0.2)
        pytest.fail(f"lifeboat serve did not print its URL (got {line!r}); stderr:\n{served.stderr}")
    assert time.monotonic() < deadline
    served.url = line.strip()
    return served


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """Factory for ``lifeboat serve`` processes; each is stopped (and must exit 0) at teardown."""
    started: list[Served] = []

    def factory(archive: Path | str, *args: str) -> Served:
        s = start_serve(archive, *args)
        started.append(s)
        return s

    yield factory
    for s in started:
        if s.proc.poll() is None:
            status = s.stop()
            assert status == 0, f"lifeboat serve exited {status}; stderr:\n{s.stderr}"
        if s.proc.stdout is not None:
            rest = s.proc.stdout.read()
            assert rest == "", f"lifeboat serve printed more than its URL line: {rest!r}"
            s.proc.stdout.close()
