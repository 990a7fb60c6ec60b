"""Archive benchmark: lifeboat against borg 1.2 and restic on a realistic disk image, in one run.

What is measured, on the cached ext4 image of ``bench.common.realistic_image`` (2.5 GiB, ~71 %
real files from /usr/share and /usr/lib) and its 1 %-changed copy (``one_percent_change``):

- full backup of the image into a new repository,
- incremental backup of the changed copy (same path, as a re-read disk image would be),
- restore of that second point to a new file (sparse where the tool can),
- repository size on disk (``du -sb``) after the full and after the incremental backup.

Each step's time includes fsync of what it wrote (the repository, or the restored file), so a tool
that leaves dirty pages behind is not favoured. Before every step the page cache is dropped
(``sync; echo 3 > /proc/sys/vm/drop_caches``, needs root); with ``--cache warm`` (or when dropping
is refused) the step's input is read once instead, so every tool starts from a warm cache.
Every restored file is checked against the image's SHA-256 (outside the timing).

Tools run in turn inside each run, the order rotated from run to run, and each figure is the
median of ``--runs`` runs. Peers, as configured:

- lifeboat: defaults (``archive init``), ``backup MACHINE FILE --json``, ``restore MACHINE DEST``.
- borg 1.2: ``borg init -e none``; ``borg create --chunker-params fixed,4194304 --compression zstd,3``;
  ``borg extract --sparse``.
- restic: ``restic init`` (repository format 2, compression auto = zstd fastest); ``restic backup
  FILE``: restic has no fixed-size chunker, a file is always cut by its content-defined (Rabin)
  chunker, 512 KiB to 8 MiB, ~1 MiB average; ``restic restore latest --target DIR``.

``--chunk-sizes 262144,1048576,4194304`` runs lifeboat alone at each chunk size instead
(the same four figures), to pick the default chunk size from. ``--py-spy DIR`` also records one
profiled lifeboat full backup, incremental and restore with py-spy (``--idle``: waiting threads
count too) and prints, per thread kind, the innermost frames where the samples fall.

The machine may be shared: the load average is printed with every run, and CPU seconds (user +
sys of the tool's processes) are reported beside wall times as a figure less sensitive to it.

Usage::

    .venv/bin/python bench/archive_bench.py [--runs 3] [--size-gib 2.5] [--json-out FILE]
    .venv/bin/python bench/archive_bench.py --chunk-sizes 262144,1048576,4194304
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    drop_caches,
    du_bytes,
    fsync_tree,
    load_meta,
    machine_info,
    one_percent_change,
    realistic_image,
    run,
    sha256_file,
    warm,
)

REPO = Path(__file__).resolve().parent.parent
LIFEBOAT = os.environ.get("LIFEBOAT_BIN") or str(REPO / ".venv" / "bin" / "lifeboat")
PY_SPY = str(REPO / ".venv" / "bin" / "py-spy")
MACHINE = "bench"
DISK = "disk.img"
STEPS = ("full", "incremental", "restore")
MiB = 1024 * 1024


# -- the tools ------------------------------------------------------------------------------
@dataclass
class Tool:
    """One backup tool: how to init a repository, back up a file, restore the last point."""

    name: str
    repo: Path
    env: dict[str, str] = field(default_factory=dict)
    wrap: list[str] = field(default_factory=list)  # prefix for profiling (py-spy)
    notes: dict[str, str] = field(default_factory=dict)  # what the tool said about each step

    def __post_init__(self) -> None:
        """Subclasses set their environment here."""

    def sh(self, cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run one of the tool's commands with its environment."""
        return run(self.wrap + cmd, cwd=cwd, env={**os.environ, **self.env})

    def init(self) -> None:
        """Create an empty repository at ``repo``."""
        raise NotImplementedError

    def backup(self, src_dir: Path, label: str) -> None:
        """Back up ``src_dir / DISK`` (label: "full" or "incremental")."""
        raise NotImplementedError

    def restore(self, dest_dir: Path) -> Path:
        """Restore the newest point below ``dest_dir``; the restored file's path."""
        raise NotImplementedError

    def versions(self) -> str:
        """The tool's version string."""
        raise NotImplementedError


class Lifeboat(Tool):
    """lifeboat's CLI, default settings unless a chunk size is given."""

    chunk_size: int | None = None

    def init(self) -> None:
        extra = ["--chunk-size", str(self.chunk_size)] if self.chunk_size else []
        self.sh([LIFEBOAT, "--archive", str(self.repo), "archive", "init", *extra, "--json"])

    def backup(self, src_dir: Path, label: str) -> None:
        out = self.sh([LIFEBOAT, "--archive", str(self.repo), "backup", MACHINE, str(src_dir / DISK), "--json"])
        text = out.stdout  # under py-spy its banner comes first
        doc, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
        self.notes[label] = f"{doc.get('mode', '?')}, {doc['bytes_new']} B new, {doc['bytes_stored']} B stored"

    def restore(self, dest_dir: Path) -> Path:
        out = dest_dir / DISK
        self.sh([LIFEBOAT, "--archive", str(self.repo), "restore", MACHINE, str(out)])
        return out

    def versions(self) -> str:
        import zstandard

        try:
            head = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).stdout.strip()
            dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--", "archive", "agent", "plumbing",
                         "orchestrator"]).stdout.strip()
            head += " + uncommitted changes in archive/, agent/, plumbing/ or orchestrator/" if dirty else ""
        except (RuntimeError, FileNotFoundError):
            head = "?"
        return f"lifeboat @{head} (python-zstandard {zstandard.__version__})"


class Borg(Tool):
    """borg 1.2, unencrypted, fixed 4 MiB chunks, zstd level 3 (the issue's reference)."""

    def __post_init__(self) -> None:
        base = self.repo.parent / f"{self.repo.name}-home"
        self.env = {
            "BORG_CACHE_DIR": str(base / "cache"),
            "BORG_CONFIG_DIR": str(base / "config"),
            "BORG_SECURITY_DIR": str(base / "security"),
            "BORG_BASE_DIR": str(base),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }

    def init(self) -> None:
        self.sh(["borg", "init", "-e", "none", str(self.repo)])

    def backup(self, src_dir: Path, label: str) -> None:
        self.sh(["borg", "create", "--chunker-params", "fixed,4194304", "--compression", "zstd,3",
                 f"{self.repo}::{label}", DISK], cwd=src_dir)

    def restore(self, dest_dir: Path) -> Path:
        self.sh(["borg", "extract", "--sparse", f"{self.repo}::incremental"], cwd=dest_dir)
        return dest_dir / DISK

    def versions(self) -> str:
        return run(["borg", "--version"]).stdout.strip()


class Restic(Tool):
    """restic with its defaults (content-defined chunks, compression auto)."""

    def __post_init__(self) -> None:
        self.env = {
            "RESTIC_PASSWORD": "lifeboat-bench",
            "RESTIC_REPOSITORY": str(self.repo),
            "RESTIC_CACHE_DIR": str(self.repo.parent / f"{self.repo.name}-cache"),
        }

    def init(self) -> None:
        self.sh(["restic", "init"])

    def backup(self, src_dir: Path, label: str) -> None:
        self.sh(["restic", "backup", "--host", MACHINE, "--tag", label, DISK], cwd=src_dir)

    def restore(self, dest_dir: Path) -> Path:
        self.sh(["restic", "restore", "latest", "--host", MACHINE, "--target", str(dest_dir)])
        found = [Path(d) / DISK for d, _, files in os.walk(dest_dir) if DISK in files]
        if len(found) != 1:
            raise RuntimeError(f"restic restore: expected one {DISK} below {dest_dir}, found {found}")
        return found[0]

    def versions(self) -> str:
        v = run(["restic", "version"]).stdout.strip()
        return v.split(" compiled")[0]


TOOLS: dict[str, type[Tool]] = {"lifeboat": Lifeboat, "borg": Borg, "restic": Restic}


# -- measuring ------------------------------------------------------------------------------
@dataclass
class Env:
    """Inputs and settings shared by every measurement of a run."""

    image: Path
    changed: Path
    changed_sha256: str
    work: Path
    cache: str  # "cold" or "warm"
    verify: bool


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _prepare_cache(env: Env, inputs: Sequence[Path]) -> None:
    if env.cache == "cold" and drop_caches():
        return
    env.cache = "warm"
    for p in inputs:
        if p.is_file():
            warm(p)
        else:
            for d, _, files in os.walk(p):
                for name in files:
                    warm(Path(d) / name)


def timed(env: Env, inputs: Sequence[Path], outputs: Sequence[Path], fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of child processes) of ``fn`` plus fsync of ``outputs``."""
    _prepare_cache(env, inputs)
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    fn()
    for out in outputs:
        fsync_tree(out)
    return time.perf_counter() - t0, _children_cpu() - cpu0


def _link(target: Path, link: Path) -> None:
    """Make ``link`` name ``target``'s bytes (a hard link, else a copy) at one constant path."""
    link.unlink(missing_ok=True)
    try:
        os.link(target, link)
    except OSError:
        shutil.copyfile(target, link)


def measure(tool: Tool, env: Env) -> dict[str, float]:
    """Full backup, 1 % incremental, restore and sizes for one tool in a fresh repository."""
    src, dest = tool.repo.parent / f"{tool.repo.name}-src", tool.repo.parent / f"{tool.repo.name}-restore"
    for p in (src, dest):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    tool.init()
    res: dict[str, float] = {}
    _link(env.image, src / DISK)
    res["full_s"], res["full_cpu_s"] = timed(env, [src / DISK], [tool.repo], lambda: tool.backup(src, "full"))
    res["size_full_b"] = du_bytes(tool.repo)
    _link(env.changed, src / DISK)
    res["incremental_s"], res["incremental_cpu_s"] = timed(
        env, [src / DISK], [tool.repo], lambda: tool.backup(src, "incremental"))
    res["size_b"] = du_bytes(tool.repo)
    res["incremental_added_b"] = res["size_b"] - res["size_full_b"]
    restored: list[Path] = []
    res["restore_s"], res["restore_cpu_s"] = timed(
        env, [tool.repo], [dest], lambda: restored.append(tool.restore(dest)))
    if env.verify:
        got = sha256_file(restored[0])
        if got != env.changed_sha256:
            raise RuntimeError(f"{tool.name}: restored image differs from the source (sha256 {got})")
    for p in (src, dest):
        shutil.rmtree(p, ignore_errors=True)
    return res


def make_tool(name: str, work: Path, chunk_size: int | None = None) -> Tool:
    """A tool instance with its repository (and caches) below ``work``."""
    label = name if chunk_size is None else f"{name}-{chunk_size}"
    repo = work / label / "repo"
    shutil.rmtree(repo.parent, ignore_errors=True)
    repo.parent.mkdir(parents=True)
    tool = TOOLS[name](name=label, repo=repo)
    if isinstance(tool, Lifeboat):
        tool.chunk_size = chunk_size
    return tool


# -- reporting ------------------------------------------------------------------------------
ROWS: list[tuple[str, str, str]] = [
    ("full backup", "full_s", "s"),
    ("  throughput", "full_s", "MB/s"),
    ("  CPU (user+sys)", "full_cpu_s", "s"),
    ("1 % incremental", "incremental_s", "s"),
    ("  CPU (user+sys)", "incremental_cpu_s", "s"),
    ("restore", "restore_s", "s"),
    ("  throughput", "restore_s", "MB/s"),
    ("  CPU (user+sys)", "restore_cpu_s", "s"),
    ("size after full", "size_full_b", "MiB"),
    ("added by incremental", "incremental_added_b", "MiB"),
    ("size after both", "size_b", "MiB"),
]


def medians(results: list[dict[str, float]]) -> dict[str, float]:
    """Per-key median over runs."""
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def _cell(value: float, unit: str, image_size: int) -> str:
    if unit == "MB/s":
        return f"{image_size / value / 1e6:.0f}"
    if unit == "MiB":
        return f"{value / MiB:.1f}"
    return f"{value:.2f}"


def table(columns: dict[str, dict[str, float]], image_size: int, ratios_to: str | None) -> str:
    """A markdown table: one column per tool (or chunk size), plus peer/lifeboat ratios."""
    names = list(columns)
    peers = [n for n in names if ratios_to and n != ratios_to]
    head = ["", *names, *(f"{p}/{ratios_to}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, unit in ROWS:
        cells = [_cell(columns[n][key], unit, image_size) for n in names]
        ratio_cells = []
        for p in peers:
            assert ratios_to is not None
            a, b = columns[p][key], columns[ratios_to][key]
            r = (b / a) if unit == "MB/s" else (a / b if b else float("inf"))
            ratio_cells.append(f"{r:.2f}" if unit != "MB/s" else "")
        lines.append(f"| {label} ({unit}) | " + " | ".join(cells + ratio_cells) + " |")
    return "\n".join(lines)


# -- profiling -----------------------------------------------------------------------------
def profile_lifeboat(env: Env, out_dir: Path, chunk_size: int | None) -> str:
    """Record a lifeboat full backup, incremental and restore under py-spy (raw, idle threads too); a summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tool = make_tool("lifeboat", env.work / "profile", chunk_size)
    src, dest = tool.repo.parent / "src", tool.repo.parent / "restore"
    src.mkdir()
    dest.mkdir()
    tool.init()
    _link(env.image, src / DISK)
    steps: list[tuple[str, list[Path], list[Path], Callable[[], Any]]] = [
        ("full", [src / DISK], [tool.repo], lambda: tool.backup(src, "full")),
        ("incremental", [src / DISK], [tool.repo], lambda: tool.backup(src, "incremental")),
        ("restore", [tool.repo], [dest], lambda: tool.restore(dest)),
    ]
    report = []
    for step, inputs, outputs, fn in steps:
        if step == "incremental":
            _link(env.changed, src / DISK)
        raw = out_dir / f"lifeboat-{step}.txt"
        tool.wrap = [PY_SPY, "record", "--idle", "--threads", "-r", "100", "-f", "raw", "-o", str(raw), "--"]
        wall, cpu = timed(env, inputs, outputs, fn)
        report.append(f"lifeboat {step} under py-spy (collapsed stacks in {raw}): {wall:.2f} s wall, "
                      f"{cpu:.2f} s CPU\n{summarize_raw(raw)}")
    tool.wrap = []
    shutil.rmtree(tool.repo.parent, ignore_errors=True)
    return "\n\n".join(report)


def summarize_raw(raw: Path, top: int = 8) -> str:
    """Per thread kind (main, pool workers): the innermost frames where its samples fall."""
    leaf: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        name = frames[0].split(": ", 1)[1] if ": " in frames[0] else ""
        kind = ("pool threads" if "ThreadPool" in name else "main thread" if name == "MainThread"
                else "main thread, interpreter start" if not name else name)
        leaf[kind][frames[-1]] += int(n)
    lines = []
    for kind, counter in leaf.items():
        total = sum(counter.values())
        lines.append(f"  {kind} ({total} samples):")
        for frame, hits in counter.most_common(top):
            lines.append(f"    {100 * hits / total:5.1f} %  {frame}")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/archive_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported (default 3)")
    p.add_argument("--size-gib", type=float, default=2.5, help="image size (default 2.5)")
    p.add_argument("--tools", default="lifeboat,borg,restic", help="comma-separated subset of " + ",".join(TOOLS))
    p.add_argument("--chunk-sizes", help="sweep mode: lifeboat alone at these chunk sizes (bytes, comma-separated)")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="drop the page cache before each step (cold, default) or pre-read the input (warm)")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of restored images")
    p.add_argument("--py-spy", type=Path, metavar="DIR", help="also profile a lifeboat full backup and restore")
    p.add_argument("--json-out", type=Path, help="write all figures (every run) as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    image = realistic_image(args.size_gib)
    changed = one_percent_change(image)
    img_meta, chg_meta = load_meta(image), load_meta(changed)
    assert img_meta is not None and chg_meta is not None
    work = BENCH_DIR / "archive-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = Env(image, changed, chg_meta["sha256"], work, args.cache, not args.no_verify)

    sweep = [int(x) for x in args.chunk_sizes.split(",")] if args.chunk_sizes else None
    if sweep:
        configs: list[tuple[str, str, int | None]] = [(f"{cs // 1024} KiB", "lifeboat", cs) for cs in sweep]
    else:
        configs = [(name, name, None) for name in args.tools.split(",")]
        for _, name, _ in configs:
            if name not in TOOLS:
                raise SystemExit(f"unknown tool {name!r}")

    info = machine_info()
    versions = {name: make_tool(name, work).versions() for name in {t for _, t, _ in configs}}
    print(f"image {image.name}: {img_meta['size'] / 2**30:g} GiB ext4, {img_meta['files']} files, "
          f"{img_meta['fs_used_fraction'] * 100:.0f} % used; change: {chg_meta['blocks_changed']} blocks "
          f"({chg_meta['fraction_changed'] * 100:.2f} %) in {chg_meta['writes']} writes", flush=True)

    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in configs}
    for r in range(args.runs):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for label, name, cs in order:
            tool = make_tool(name, work, cs)
            res = measure(tool, env)
            runs[label].append(res)
            if tool.notes and r == 0:
                print(f"  {label} said: " + "; ".join(f"{k}: {v}" for k, v in tool.notes.items()), flush=True)
            print(f"run {r + 1}/{args.runs} {label:>10}: full {res['full_s']:.2f} s, incremental "
                  f"{res['incremental_s']:.2f} s, restore {res['restore_s']:.2f} s, size "
                  f"{res['size_b'] / MiB:.1f} MiB (load {os.getloadavg()[0]:.2f})", flush=True)
            shutil.rmtree(tool.repo.parent, ignore_errors=True)

    med = {label: medians(rs) for label, rs in runs.items()}
    info["loadavg_end"] = os.getloadavg()
    cache_note = ("page cache dropped before every step" if env.cache == "cold"
                  else "input read once before every step (warm page cache)")
    print()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM, kernel "
          f"{info['kernel']}, {info['bench_fs']}; load {info['loadavg'][0]:.2f} -> {info['loadavg_end'][0]:.2f}")
    for name, v in versions.items():
        print(f"{name}: {v}")
    print(f"medians of {args.runs} runs; {cache_note}; times include fsync of the output; "
          f"ratios are peer/lifeboat (>1: lifeboat faster or smaller)")
    print()
    ratios_to = None if sweep else ("lifeboat" if "lifeboat" in med else None)
    print(table(med, img_meta["size"], ratios_to))

    doc = {"argv": sys.argv, "machine": info, "versions": versions, "cache": env.cache,
           "image": img_meta, "changed": chg_meta, "runs": runs, "medians": med}
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2))
    if args.py_spy:
        doc["profile"] = profile_lifeboat(env, args.py_spy, sweep[0] if sweep and len(sweep) == 1 else None)
        print()
        print(doc["profile"])
        if args.json_out:
            args.json_out.write_text(json.dumps(doc, indent=2))
    print(f"\nbench time {time.monotonic() - started:.0f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
