"""Real peers for target and engine tests: libvirtd, and an archive holding the sample guest.

Fixtures are session-scoped (the sample guest's archive is built once) and shared by
``tests/targets`` and ``tests/orchestrator`` through their conftest files.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT

REPO = Path(__file__).resolve().parents[2]

MACHINE = "sample-guest"


def lifeboat(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the CLI from the repository root."""
    done = subprocess.run(
        LIFEBOAT + list(args),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    if check:
        assert done.returncode == 0, f"lifeboat {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def sample_archive(tmp_path_factory: pytest.TempPathFactory, sample_guest_image: Path) -> Path:
    """An archive with one point of the sample guest set to stay up (``lifeboat.stay=1``)."""
    from examples.sample_guest import copy_image, set_kernel_args

    root = tmp_path_factory.mktemp("sample-archive")
    disk = copy_image(sample_guest_image, root / "guest.img")
    set_kernel_args(disk, "lifeboat.stay=1")
    archive = root / "archive"
    lifeboat("archive", "init", "--archive", str(archive), check=True)
    lifeboat("backup", MACHINE, str(disk), "--archive", str(archive), check=True)
    disk.unlink()
    return archive


def qemu_processes(token: str) -> list[int]:
    """Pids of processes whose command line holds ``token``."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if token.encode() in (proc / "cmdline").read_bytes():
                    out.append(int(proc.name))
            except OSError:
                pass
    return [p for p in out if p != os.getpid()]
