"""The archive commands of ``shared/CLI.md``: forms, --json, exit status, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(LIFEBOAT + list(args), capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def snapshot(root: Path) -> dict[str, bytes]:
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock")
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(300_000) + bytes(200_000) + os.urandom(1234))
    return img


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    loc = tmp_path / "arc"
    r = run("archive", "init", "--chunk-size", "65536", "--archive", str(loc))
    assert r.returncode == 0, r.stderr
    return loc


def test_backup_points_restore_json(archive: Path, image: Path, tmp_path: Path) -> None:
    r = run("--archive", str(archive), "backup", "web01", str(image), "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["machine"] == "web01" and first["bytes_read"] == image.stat().st_size and first["parent"] is None
    assert first["bytes_new"] > 0 and "time" in first and "point" in first
    r = run("backup", "web01", str(image), "--json", "--archive", str(archive))
    second = json.loads(r.stdout)
    assert second["parent"] == first["point"] and second["bytes_new"] == 0
    r = run("points", "web01", "--json", env=dict(os.environ, LIFEBOAT_ARCHIVE=str(archive)))
    listed = json.loads(r.stdout)
    assert [p["point"] for p in listed] == [first["point"], second["point"]]
    assert {"point", "time", "size", "parent"} <= set(listed[0])
    for sel in ["web01", f"web01@{first['point']}", f"web01@{second['time']}", "web01@latest"]:
        out = tmp_path / f"r-{len(sel)}.img"
        r = run("restore", sel, str(out), "--archive", str(archive))
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == image.read_bytes()
    r = run("verify", "--json", "--archive", str(archive))
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True


def test_default_archive_location(tmp_path: Path, image: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LIFEBOAT_ARCHIVE"}
    assert run("archive", "init", env=env, cwd=tmp_path).returncode == 0
    assert (tmp_path / "lifeboat-archive" / "config").is_file()
    assert run("backup", "m", str(image), env=env, cwd=tmp_path).returncode == 0


def test_no_archive(tmp_path: Path, image: Path) -> None:
    r = run("backup", "m", str(image), "--archive", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no lifeboat archive at" in r.stderr
    assert not (tmp_path / "missing").exists()


def test_init_twice_refused(archive: Path) -> None:
    before = snapshot(archive)
    r = run("archive", "init", "--archive", str(archive))
    assert r.returncode == 2 and "already holds" in r.stderr
    assert snapshot(archive) == before


def test_bad_chunk_size(tmp_path: Path) -> None:
    r = run("archive", "init", "--chunk-size", "1000", "--archive", str(tmp_path / "a"))
    assert r.returncode == 2 and "--chunk-size 1000" in r.stderr


def test_bad_selector_changes_nothing(archive: Path, image: Path, tmp_path: Path) -> None:
    run("backup", "m", str(image), "--archive", str(archive))
    before = snapshot(archive)
    for sel, msg in [("m@tuesday", "not a point id"), ("m@", "nothing after"), ("nobody", "no points"),
                     ("m@1999-01-01T00:00:00Z", "at or before")]:
        r = run("restore", sel, str(tmp_path / "out"), "--archive", str(archive))
        assert r.returncode == 2 and msg in r.stderr, (sel, r.stderr)
    assert not (tmp_path / "out").exists()
    assert snapshot(archive) == before


def test_unreadable_source(archive: Path, tmp_path: Path) -> None:
    before = snapshot(archive)
    r = run("backup", "m", str(tmp_path / "nope.img"), "--archive", str(archive))
    assert r.returncode == 2 and "nope.img" in r.stderr and "cannot open" in r.stderr
    r = run("backup", "m", str(tmp_path), "--archive", str(archive))
    assert r.returncode == 2 and str(tmp_path) in r.stderr and ("directory" in r.stderr or "not a regular" in r.stderr)
    r = run("backup", "bad/name", str(tmp_path), "--archive", str(archive))
    assert r.returncode == 2 and "machine name" in r.stderr
    assert snapshot(archive) == before


def test_restore_refuses_to_overwrite(archive: Path, image: Path, tmp_path: Path) -> None:
    run("backup", "m", str(image), "--archive", str(archive))
    dest = tmp_path / "keep.img"
    dest.write_bytes(b"precious")
    r = run("restore", "m", str(dest), "--archive", str(archive))
    assert r.returncode == 2 and "exists" in r.stderr and dest.read_bytes() == b"precious"
    assert run("restore", "m", str(dest), "--force", "--archive", str(archive)).returncode == 0
    assert dest.read_bytes() == image.read_bytes()


def test_wrong_key(tmp_path: Path, image: Path) -> None:
    loc, key = str(tmp_path / "enc"), tmp_path / "key"
    assert run("archive", "init", "--encrypt", "--key-file", str(key), "--archive", loc).returncode == 0
    assert run("backup", "m", str(image), "--archive", loc, "--key-file", str(key)).returncode == 0
    before = snapshot(Path(loc))
    wrong = tmp_path / "wrong"
    wrong.write_bytes(os.urandom(32))
    r = run("backup", "m", str(image), "--archive", loc, "--key-file", str(wrong))
    assert r.returncode == 2 and "does not open" in r.stderr
    r = run("points", "m", "--archive", loc)
    assert r.returncode == 2 and "encrypted" in r.stderr
    r = run("restore", "m", str(tmp_path / "o"), "--archive", loc, env=dict(os.environ, LIFEBOAT_KEY_FILE=str(key)))
    assert r.returncode == 0 and (tmp_path / "o").read_bytes() == image.read_bytes()
    assert snapshot(Path(loc)) == before


def test_usage_errors_exit_2() -> None:
    assert run("backup").returncode == 2
    assert run("restore", "m").returncode == 2
    assert run("no-such-command").returncode == 2


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk(small_fs: Path, tmp_path: Path) -> None:
    loc = str(small_fs / "arc")
    assert run("archive", "init", "--chunk-size", "65536", "--archive", loc).returncode == 0
    small = tmp_path / "small.img"
    small.write_bytes(os.urandom(100_000))
    assert run("backup", "m", str(small), "--archive", loc).returncode == 0
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(3_000_000))
    r = run("backup", "m", str(big), "--archive", loc)
    assert r.returncode == 1 and "disk is full" in r.stderr
    assert run("verify", "--archive", loc).returncode == 0
    out = tmp_path / "again.img"
    assert run("restore", "m", str(out), "--archive", loc).returncode == 0
    assert out.read_bytes() == small.read_bytes()
    assert len(json.loads(run("points", "m", "--json", "--archive", loc).stdout)) == 1


def test_prune_and_retention_cli(archive: Path, tmp_path: Path) -> None:
    for i in range(4):
        img = tmp_path / f"i{i}"
        img.write_bytes(os.urandom(100_000))
        run("backup", "m", str(img), "--archive", str(archive))
    r = run("archive", "retention", "--keep-last", "2", "--json", "--archive", str(archive))
    assert json.loads(r.stdout)["keep_last"] == 2
    r = run("prune", "--dry-run", "--json", "--archive", str(archive))
    assert r.returncode == 0 and len(json.loads(r.stdout)["removed"]) == 2
    assert len(json.loads(run("points", "m", "--json", "--archive", str(archive)).stdout)) == 4
    r = run("prune", "--json", "--archive", str(archive))
    assert len(json.loads(r.stdout)["removed"]) == 2
    pts = json.loads(run("points", "m", "--json", "--archive", str(archive)).stdout)
    assert len(pts) == 2
    out = tmp_path / "last"
    run("restore", "m", str(out), "--archive", str(archive))
    assert out.read_bytes() == (tmp_path / "i3").read_bytes()


def test_verify_cli_reports_damage(archive: Path, image: Path) -> None:
    run("backup", "m", str(image), "--archive", str(archive))
    pack = next(p for p in (archive / "packs").rglob("*") if p.is_file())
    data = bytearray(pack.read_bytes())
    data[20] ^= 0xFF
    pack.write_bytes(bytes(data))
    r = run("verify", "--json", "--archive", str(archive))
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["affected_points"] and doc["affected_points"][0].startswith("m@")
