"""Every fuzz target (``fuzz/fuzz_*.py``, found by name, so new ones join by themselves) keeps the
contract of ``fuzz/__init__.py``: it runs its whole seed corpus in-process without raising, and a
short bounded atheris run (a child process, a few seconds) finds nothing. The runner itself must
report a crashing target as a finding, not as clean."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.run import corpus_dir, targets

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 5  # per target under atheris: a smoke run in CI; scripts/fuzz.sh runs the long campaign
CORPUS_BOUND = 200 * 1024


def test_targets_are_found() -> None:
    assert {"manifest", "runbook"} <= set(targets())


@pytest.mark.parametrize("name", targets())
def test_corpus_runs_in_process(name: str) -> None:
    module = importlib.import_module(f"fuzz.fuzz_{name}")
    assert module.__doc__, f"fuzz_{name}: the module docstring says what it fuzzes and why"
    seeds = sorted(p for p in corpus_dir(name).iterdir() if p.is_file())
    assert seeds, f"fuzz/corpus/{name}/ holds no seed input"
    assert sum(p.stat().st_size for p in seeds) <= CORPUS_BOUND, f"fuzz/corpus/{name}/ is over 200 KiB"
    for seed in seeds:
        module.test_one_input(seed.read_bytes())  # any exception is a finding: the test fails with it


def _run(args: list[str], cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "fuzz.run", *args, "--workdir", str(tmp_path / "work"), "--json"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=SECONDS + 170)


@pytest.mark.parametrize("name", targets())
def test_short_atheris_run_finds_nothing(name: str, tmp_path: Path) -> None:
    done = _run([name, "--seconds", str(SECONDS)], ROOT, tmp_path)
    assert done.stdout, done.stderr
    [summary] = json.loads(done.stdout)
    assert done.returncode == 0 and summary["ok"], (summary, done.stderr[-4000:])
    assert summary["execs"] > 0 and summary["coverage"] > 0, summary  # it ran, instrumented


def test_runner_reports_a_crash(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "fuzz", tree / "fuzz", ignore=shutil.ignore_patterns("corpus", "fuzz_*.py", "__pycache__"))
    (tree / "fuzz" / "fuzz_boom.py").write_text(
        '"""A target that fails on inputs starting with "!!"."""\n\n\n'
        "def test_one_input(data: bytes) -> None:\n"
        "    if data[:2] == b'!!':\n"
        "        raise RuntimeError('boom')\n"
    )
    (tree / "fuzz" / "corpus" / "boom").mkdir(parents=True)
    (tree / "fuzz" / "corpus" / "boom" / "seed").write_bytes(b"!!")
    done = _run(["boom", "--seconds", "30"], tree, tmp_path)
    [summary] = json.loads(done.stdout)
    assert done.returncode == 1 and not summary["ok"], summary
    assert summary["findings"] and summary["findings"][0].startswith("crash-"), summary
    crash = tmp_path / "work" / "boom" / summary["findings"][0]
    assert crash.read_bytes()[:2] == b"!!"
    assert "RuntimeError: boom" in done.stderr
