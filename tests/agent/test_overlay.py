"""The fleecing overlay: copied from a cached empty qcow2, made by qemu-img when the cache fails."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lifeboat.agent.qmp import new_overlay

SIZE = 64 * 1024 * 1024


def _info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, check=True)
    info: dict[str, object] = json.loads(out.stdout)
    return info


def _is_empty_overlay(path: Path) -> bool:
    info = _info(path)
    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    return info["format"] == "qcow2" and info["virtual-size"] == SIZE and check.returncode == 0


def test_overlays_come_from_one_cached_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    new_overlay(tmp_path / "a.qcow2", SIZE)
    template = tmp_path / "cache" / "lifeboat" / f"empty-{SIZE}.qcow2"
    assert template.read_bytes() == (tmp_path / "a.qcow2").read_bytes()
    new_overlay(tmp_path / "b.qcow2", SIZE)
    assert _is_empty_overlay(tmp_path / "a.qcow2") and _is_empty_overlay(tmp_path / "b.qcow2")
    assert [p.name for p in template.parent.iterdir()] == [template.name]  # no temporary left


def test_a_damaged_template_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    template = tmp_path / "cache" / "lifeboat" / f"empty-{SIZE}.qcow2"
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not an image")
    new_overlay(tmp_path / "a.qcow2", SIZE)
    assert _is_empty_overlay(tmp_path / "a.qcow2") and _is_empty_overlay(template)


def test_an_unwritable_cache_falls_back_to_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # mkdir below a file fails
    new_overlay(tmp_path / "a.qcow2", SIZE)
    assert _is_empty_overlay(tmp_path / "a.qcow2")
