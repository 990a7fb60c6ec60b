"""Shared helpers for the benchmarks: realistic disk images (cached), changed copies, machine facts.

``realistic_image()`` builds a valid ext4 file system image (``mkfs.ext4 -d``) holding real files
copied from ``/usr/share`` and ``/usr/lib`` up to about 75 % of the image, checks it with
``e2fsck -fn`` and caches it under ``/var/tmp/lifeboat-bench`` (``LIFEBOAT_BENCH_DIR``), so later
runs reuse it. ``one_percent_change()`` makes a cached copy in which 1 % of the 4 KiB blocks differ:
data blocks of randomly chosen files (spread over the disk) are overwritten in place, with text
where the file held text and random bytes otherwise, as a day of updates would. File sizes and
metadata are left alone, so the copy is still a valid file system (checked again with e2fsck).

Run ``.venv/bin/python bench/common.py`` to build both images (the benchmarks, run as scripts,
import this file as ``common``). Both functions are deterministic (fixed seeds, sorted walks) for
one machine's /usr; a different /usr gives a different but equally realistic image. Every cached
file has a ``.json`` sidecar written last: an image without one is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import random
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(os.environ.get("LIFEBOAT_BENCH_DIR", "/var/tmp/lifeboat-bench"))
IMAGE_VERSION = 1  # bump when the recipe changes, so stale caches are not reused
BLOCK = 4096
SOURCE_ROOTS = ("/usr/share", "/usr/lib")
FILL = 0.75  # fraction of the image that the copied files take (counted in 4 KiB blocks)


# -- small utilities ----------------------------------------------------------------------
def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, raise with its output when it fails."""
    proc = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def sha256_file(path: Path, bufsize: int = 8 * 1024 * 1024) -> str:
    """SHA-256 of a file's bytes (holes read as zeros)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while buf := f.read(bufsize):
            h.update(buf)
    return h.hexdigest()


def fsync_tree(path: Path) -> None:
    """fsync every regular file below ``path`` (or ``path`` itself), then the directories."""
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for dirpath, _dirs, files in os.walk(path):
        for name in [*files, "."]:
            p = os.path.join(dirpath, name)
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def du_bytes(path: Path) -> int:
    """``du -sb``: apparent size of everything below ``path``."""
    return int(run(["du", "-sb", str(path)]).stdout.split()[0])


def drop_caches() -> bool:
    """Flush dirty data and drop the page cache; False when not allowed (not root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def warm(path: Path) -> None:
    """Read a file once so that it sits in the page cache."""
    with path.open("rb") as f:
        while f.read(16 * 1024 * 1024):
            pass


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, kernel, load: printed with every benchmark result."""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
        "bench_dir": str(BENCH_DIR),
        "bench_fs": _fs_of(BENCH_DIR),
    }


def _fs_of(path: Path) -> str:
    try:
        out = run(["df", "-T", str(path)]).stdout.splitlines()[-1].split()
        return f"{out[1]} on {out[0]}"
    except (RuntimeError, IndexError, FileNotFoundError):
        return "?"


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """Serialise image builds between benchmarks started at the same time."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    with open(BENCH_DIR / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _meta(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_meta(path: Path) -> dict[str, Any] | None:
    """The sidecar of a cached image, or None when the image is missing or unfinished."""
    try:
        meta: dict[str, Any] = json.loads(_meta(path).read_text())
    except (OSError, ValueError):
        return None
    if not path.is_file() or path.stat().st_size != meta.get("size"):
        return None
    return meta


def _save_meta(path: Path, meta: dict[str, Any]) -> None:
    tmp = _meta(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, _meta(path))


# -- the realistic image ------------------------------------------------------------------
def _walk_sorted(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below ``root`` in a stable order (directories before their content)."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return
    for name in names:
        p = os.path.join(root, name)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        yield p, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_sorted(p)


def _populate(dest: Path, budget_blocks: int) -> tuple[list[tuple[str, int]], int]:
    """Copy files from SOURCE_ROOTS into ``dest`` until ``budget_blocks`` 4 KiB blocks are used.

    Whole top-level folders are taken in turn (all of /usr/share, then /usr/lib's), so the file
    system holds complete packages' files, not a sample of every folder. Returns the copied
    regular files (path inside the image, size) and the blocks they take.
    """
    used = 0
    files: list[tuple[str, int]] = []
    for root in SOURCE_ROOTS:
        for src, st in _walk_sorted(root):
            rel = os.path.relpath(src, "/")
            out = dest / rel
            cost = 1 + (-(-st.st_size // BLOCK) if stat.S_ISREG(st.st_mode) else 0)  # data + ~inode share
            if stat.S_ISDIR(st.st_mode):
                out.mkdir(parents=True, exist_ok=True)
                used += 1
            elif stat.S_ISLNK(st.st_mode):
                out.parent.mkdir(parents=True, exist_ok=True)
                out.symlink_to(os.readlink(src))
            elif stat.S_ISREG(st.st_mode):
                if used + cost > budget_blocks:
                    continue  # too big for what is left: smaller files may still fit
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copy2(src, out)
                except OSError:
                    continue
                used += cost
                files.append(("/" + rel, st.st_size))
            if used >= budget_blocks:
                return files, used
    return files, used


def realistic_image(size_gib: float = 2.5) -> Path:
    """A cached ext4 image of ``size_gib`` GiB, about 75 % filled with real files (see module doc)."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"ext4-usr-{size_gib:g}g-v{IMAGE_VERSION}.img"
    if load_meta(path) is not None:
        return path
    with _build_lock():
        if load_meta(path) is None:
            _build_image(path, size_gib)
    return path


def _build_image(path: Path, size_gib: float) -> None:
    size = int(size_gib * 1024**3) // BLOCK * BLOCK
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=BENCH_DIR, prefix="populate-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        # ext4 keeps ~5 % for metadata (inode tables, journal, bitmaps): aim the files at FILL of it
        files, blocks = _populate(root, int(size / BLOCK * FILL))
        path.unlink(missing_ok=True)
        with path.open("wb") as f:
            f.truncate(size)
        run(["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-L", "lifeboat-bench",
             "-E", "root_owner=0:0", "-U", "2a1f6c1e-0b1d-4a51-9d6e-6c6966656230", "-d", str(root), str(path)],
            )
    run(["e2fsck", "-fn", str(path)])
    _files_list(path).write_text("".join(f"{size}\t{p}\n" for p, size in files))
    df = run(["dumpe2fs", "-h", str(path)]).stdout
    counts = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in df.splitlines() if ":" in ln)}
    total, free = int(counts["Block count"]), int(counts["Free blocks"])
    _save_meta(path, {
        "size": size, "files": len(files), "file_blocks": blocks, "fs_blocks": total, "fs_free_blocks": free,
        "fs_used_fraction": round(1 - free / total, 3), "sources": list(SOURCE_ROOTS),
        "sha256": sha256_file(path), "build_seconds": round(time.monotonic() - started, 1),
        "e2fsck": "clean",
    })


# -- the 1 % change -------------------------------------------------------------------------
def _files_list(image: Path) -> Path:
    return image.with_name(image.name + ".files")


def _regular_files(image: Path) -> list[tuple[str, int]]:
    """(path inside the image, size) of its regular files of >= 16 KiB, as recorded when it was built."""
    out = []
    for line in _files_list(image).read_text().splitlines():
        size, p = line.split("\t", 1)
        if int(size) >= 4 * BLOCK and not any(c in p for c in '"\\ '):
            out.append((p, int(size)))
    return out


def _file_blocks(image: Path, paths: list[str]) -> dict[str, list[int]]:
    """Physical block numbers of files in the image, from one ``debugfs`` session."""
    with tempfile.NamedTemporaryFile("w", suffix=".cmds", dir=BENCH_DIR, delete=False) as f:
        for p in paths:
            f.write(f'blocks "{p}"\n')
        cmds = f.name
    try:
        out = subprocess.run(["debugfs", "-f", cmds, str(image)], text=True, capture_output=True, check=True).stdout
    finally:
        os.unlink(cmds)
    result: dict[str, list[int]] = {}
    current: str | None = None
    for line in out.splitlines():
        if line.startswith("debugfs: blocks "):
            current = line[len("debugfs: blocks "):].strip().strip('"')
            continue
        if current is not None and line.strip():
            try:
                result[current] = [int(x) for x in line.split()]
            except ValueError:
                pass
            current = None
    return result


_WORDS = ("the of and to in is for on that with as by this from at are be or an it not was "
          "config value error warning info debug start stop user host path file version update "
          "package install service network disk block chunk backup restore point archive").split()


def _text_block(rng: random.Random) -> bytes:
    """4 KiB of log-like text."""
    lines = []
    n = 0
    while n < BLOCK:
        line = (f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:"
                f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} "
                + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
                + f" id={rng.getrandbits(32):08x}\n")
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()[:BLOCK]


def one_percent_change(image: Path, fraction: float = 0.01, seed: int = 1) -> Path:
    """A cached copy of ``image`` with ``fraction`` of its 4 KiB blocks rewritten (see module doc).

    Files are picked at random among those of >= 16 KiB; each gets one run of blocks rewritten at
    a random place, its length drawn log-uniformly from 1 to 256 blocks (4 KiB to 1 MiB), until
    the target is reached: many small scattered writes and a few large ones.
    """
    meta = load_meta(image)
    if meta is None:
        raise FileNotFoundError(f"{image}: not a finished benchmark image")
    out = image.with_name(f"{image.stem}-changed{fraction * 100:g}pct-s{seed}.img")
    if load_meta(out) is not None:
        return out
    with _build_lock():
        if load_meta(out) is None:
            _change(image, out, meta["size"], fraction, seed)
    return out


def _change(image: Path, out: Path, size: int, fraction: float, seed: int) -> None:
    started = time.monotonic()
    rng = random.Random(seed)
    target = int(size // BLOCK * fraction)
    candidates = _regular_files(image)
    rng.shuffle(candidates)
    tmp = out.with_name(out.name + ".tmp")
    run(["cp", "--sparse=always", str(image), str(tmp)])
    changed: set[int] = set()
    writes = 0
    pos = 0
    with tmp.open("r+b") as f:
        while len(changed) < target and pos < len(candidates):
            batch = candidates[pos:pos + 200]
            pos += 200
            blocks = _file_blocks(image, [p for p, _ in batch])
            for p, _size in batch:
                phys = [b for b in blocks.get(p, []) if b > 0]
                if not phys or len(changed) >= target:
                    continue
                run_len = min(len(phys), int(math.exp(rng.uniform(0, math.log(256)))), target - len(changed))
                start = rng.randrange(0, len(phys) - run_len + 1)
                f.seek(phys[start] * BLOCK)
                textual = b"\0" not in f.read(BLOCK)
                for b in phys[start:start + run_len]:
                    f.seek(b * BLOCK)
                    f.write(_text_block(rng) if textual else rng.randbytes(BLOCK))
                    changed.add(b)
                writes += 1
    run(["e2fsck", "-fn", str(tmp)])
    os.replace(tmp, out)
    _save_meta(out, {
        "size": size, "base": image.name, "fraction": fraction, "seed": seed, "blocks_changed": len(changed),
        "writes": writes, "fraction_changed": round(len(changed) / (size // BLOCK), 5),
        "sha256": sha256_file(out), "build_seconds": round(time.monotonic() - started, 1), "e2fsck": "clean",
    })


if __name__ == "__main__":
    img = realistic_image()
    chg = one_percent_change(img)
    print(json.dumps({"image": str(img), **(load_meta(img) or {}), "changed": str(chg), **{
        f"changed_{k}": v for k, v in (load_meta(chg) or {}).items()}}, indent=2))
