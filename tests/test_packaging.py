"""``pip install .`` puts one name into site-packages: ``lifeboat`` (the top-level folders come in
under it), never the generic ``archive``, ``agent``, … that would clash with other packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ["archive", "agent", "exporters", "nbdserver", "targets", "orchestrator", "plumbing"]


def test_install_puts_only_lifeboat_into_site_packages(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # a copy of the checkout: setuptools builds in the source tree (build/, *.egg-info)
    src = tmp_path / "src"
    junk = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "*-output", "*_cache")
    shutil.copytree(REPO, src, symlinks=True, ignore=junk)
    # the project's own files only (--no-deps): what this checks is what the build lays out
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(src)],
        check=True,
        capture_output=True,
    )
    top = sorted(p.name for p in site.iterdir() if not p.name.startswith(("_", ".")) and p.name != "bin")
    assert [n for n in top if not n.startswith("lifeboat")] == [], top
    assert (site / "lifeboat" / "archive" / "FORMAT.md").is_file()
    assert (site / "lifeboat" / "targets" / "schemas" / "qemu.json").is_file()
    web = site / "lifeboat" / "orchestrator" / "web"
    assert (web / "templates" / "dashboard.html").is_file() and (web / "static" / "htmx.min.js").is_file()
    for folder in FOLDERS:
        assert (site / "lifeboat" / folder / "__init__.py").is_file(), folder
        assert not (site / folder).is_symlink(), folder
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what was installed
    ok = subprocess.run(
        [python, "-c", "import lifeboat.plumbing.errors"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([python, "-c", "import archive"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bad.returncode != 0 and "No module named 'archive'" in bad.stderr
