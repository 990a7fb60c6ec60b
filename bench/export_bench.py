"""Export benchmark: ``lifeboat export`` in every format against ``qemu-img convert``, in one run.

What is measured, on the cached ext4 image of ``common.realistic_image`` (2.5 GiB, ~71 % real
files from /usr/share and /usr/lib, checked with ``e2fsck -fn``):

- the image is backed up once into a fresh archive (default chunk size) and restored to a raw
  file with ``lifeboat restore`` (``archive.restore``), outside the timing;
- lifeboat: the point exported straight from the archive (``exporters.EXPORTERS.get(FMT)().write``:
  decompression, zero detection and, for vmdk-stream, deflate on every core);
- qemu-img: ``qemu-img convert -f raw -O FMT [-o subformat=streamOptimized]`` from that restored
  raw file (its input already materialised: the timing does not include the restore).

Each step's time includes fsync of the file it wrote (lifeboat's export fsyncs before its rename;
qemu-img's output is fsynced after it exits), so leaving dirty pages behind is not favoured.
Before every step the page cache is dropped (root) or, with ``--cache warm``, the step's input is
read once. The two tools alternate in each run, the order rotated from run to run, and each figure
is the median of ``--runs`` runs. Every lifeboat image is checked once with ``qemu-img compare``
against the restored raw file (outside the timing).

With ``--sparse-import`` it measures the other direction instead, on sparse images (issue 18,
item 6): 16 GiB qcow2, VMDK (monolithicSparse) and VHDX images made by ``qemu-img convert`` from a
sparse raw file, empty and 1 %-filled (a random MiB every 100 MiB), imported with ``open_image`` +
``Archive.backup`` into a fresh archive (what ``lifeboat backup MACHINE IMAGE`` does), against
``qemu-img convert -O raw`` of the same image to a sparse raw file; the 16 GiB sparse raw file
itself is imported as the baseline. Each import is checked against the raw file (outside the
timing, by the backup's chunk ids); page cache warm (the images are read once before).

Usage::

    .venv/bin/python bench/export_bench.py [--runs 3] [--formats raw,qcow2,...] [--json-out FILE]
    .venv/bin/python bench/export_bench.py --sparse-import [--runs 3] [--size-gib 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import BENCH_DIR, drop_caches, machine_info, realistic_image, run, warm  # noqa: E402

from lifeboat.archive import Archive, PointInfo  # noqa: E402
from lifeboat.archive.restore import restore  # noqa: E402
from lifeboat.exporters import EXPORTERS  # noqa: E402
from lifeboat.exporters.vmdk_stream import VmdkStreamExporter  # noqa: E402

QEMU_OPTS = {"vmdk-stream": ["-o", "subformat=streamOptimized"]}


def fsync_path(path: Path) -> None:
    """fsync one file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_cache(mode: str, inputs: list[Path]) -> None:
    """Cold: drop the page cache (else fall back to warm). Warm: read the inputs once."""
    if mode == "cold" and drop_caches():
        return
    for p in inputs:
        if p.is_file():
            warm(p)
        else:
            for f in p.rglob("*"):
                if f.is_file():
                    warm(f)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of ``fn``."""
    t, c = time.monotonic(), cpu_seconds()
    fn()
    return time.monotonic() - t, cpu_seconds() - c


SPARSE_FORMATS = {"qcow2": ["-O", "qcow2"], "vmdk": ["-O", "vmdk"], "vhdx": ["-O", "vhdx"]}


def sparse_raw(path: Path, size: int, fill: bool) -> None:
    """A sparse raw file of ``size`` bytes: empty, or a random MiB at every 100th MiB."""
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            for off in range(0, size, 100 * 2**20):
                f.seek(off)
                f.write(os.urandom(2**20))


def import_image(image: Path, arc: Archive, points: list[PointInfo]) -> None:
    """What ``lifeboat backup MACHINE IMAGE`` does: ``open_image`` + ``Archive.backup``."""
    from lifeboat.exporters import open_image

    with open_image(image) as src:
        points.append(arc.backup("sparse", src))


def qemu_to_raw(image: Path, fmt: str, out: Path) -> None:
    """The peer: ``qemu-img convert -f FMT -O raw`` (sparse output)."""
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(out)])


def sparse_import(runs: int, size_gib: float) -> int:
    """Import sparse images with lifeboat against ``qemu-img convert -O raw`` (see the docstring)."""
    from lifeboat.archive.files import FileSource

    work = BENCH_DIR / "sparse-import-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = int(size_gib * 2**30)
    print(f"machine: {json.dumps(machine_info())}", flush=True)
    rows = []
    for fill in (False, True):
        label = "1 %-filled" if fill else "empty"
        raw = work / f"{'filled' if fill else 'empty'}.raw"
        sparse_raw(raw, size, fill)
        ref_arc = Archive.init(str(work / "ref-arc"))
        with FileSource(raw) as src:
            ref_ids = ref_arc.reader(ref_arc.backup("ref", src)).ids
        shutil.rmtree(work / "ref-arc")
        cases: list[tuple[str, Path]] = [("raw (sparse file)", raw)]
        for fmt, opts in SPARSE_FORMATS.items():
            image = work / f"{raw.stem}.{fmt}"
            run(["qemu-img", "convert", "-f", "raw", *opts, str(raw), str(image)])
            cases.append((fmt, image))
        for name, image in cases:
            warm(image)
            qfmt = "raw" if image == raw else image.suffix[1:]
            lb_times: list[float] = []
            q_times: list[float] = []
            read = 0
            for r in range(runs):
                shutil.rmtree(work / "arc", ignore_errors=True)
                arc = Archive.init(str(work / "arc"))
                (work / "qemu.raw").unlink(missing_ok=True)
                points: list[PointInfo] = []
                steps = [(partial(import_image, image, arc, points), lb_times),
                         (partial(qemu_to_raw, image, qfmt, work / "qemu.raw"), q_times)]
                for fn, times in steps if r % 2 == 0 else reversed(steps):
                    times.append(timed(fn)[0])
                if arc.reader(points[0]).ids != ref_ids:
                    print(f"  {name} {label}: the imported point differs from the raw file's")
                    return 1
                read = points[0].bytes_read
            lb_s, q_s = statistics.median(lb_times), statistics.median(q_times)
            rows.append((label, name, lb_s, q_s, read))
            print(f"  {label:10} {name:18} lifeboat {lb_s:6.2f} s (read {read / 2**20:.0f} MiB)  "
                  f"qemu-img {q_s:6.2f} s  load {os.getloadavg()[0]:.1f}", flush=True)
    print()
    print(f"Import of sparse {size_gib:g} GiB images, median of {runs} run(s), cache warm")
    print("| image | format | lifeboat import s | MiB read | qemu-img convert -O raw s | speed-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for label, name, lb_s, q_s, read in rows:
        print(f"| {label} | {name} | {lb_s:.2f} | {read / 2**20:.0f} | {q_s:.2f} | {q_s / lb_s:.1f}x |")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/export_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported (default 3)")
    p.add_argument("--size-gib", type=float, default=2.5, help="image size (default 2.5)")
    choices = ",".join(EXPORTERS.names())
    p.add_argument("--formats", default=choices, help="comma-separated subset of " + choices)
    p.add_argument("--cache", choices=("cold", "warm"), default="cold")
    p.add_argument("--zlib", action="store_true", help="also time vmdk-stream with zlib instead of isal")
    p.add_argument("--json-out", type=Path, help="write all figures (every run) as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--sparse-import", action="store_true",
                   help="measure importing sparse qcow2/VMDK/VHDX images instead (--size-gib defaults to 16)")
    args = p.parse_args(argv)
    if args.sparse_import:
        return sparse_import(args.runs, args.size_gib if "--size-gib" in (argv or sys.argv) else 16.0)
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        if f not in EXPORTERS:
            p.error(f"--formats: unknown format {f}")

    image = realistic_image(args.size_gib)
    print(f"machine: {json.dumps(machine_info())}", flush=True)
    print(f"image: {image} ({image.stat().st_size} bytes)", flush=True)
    work = BENCH_DIR / "export-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    arc_dir = work / "arc"
    arc = Archive.init(str(arc_dir))
    t = time.monotonic()
    from lifeboat.archive.files import FileSource

    with FileSource(image) as src:
        info = arc.backup("bench", src)
    print(f"backup: {time.monotonic() - t:.1f} s (chunk size {info.chunk_size})", flush=True)
    reader = arc.reader(info)
    raw = work / "restored.raw"
    restore(reader, raw)
    fsync_path(raw)

    variants: list[tuple[str, str]] = [(f, f) for f in formats]
    if args.zlib and "vmdk-stream" in formats:
        variants.append(("vmdk-stream (zlib)", "vmdk-stream"))
    stream_backend = VmdkStreamExporter().deflate_name
    results: dict[str, dict[str, list[float]]] = {
        name: {"lifeboat": [], "qemu-img": [], "lifeboat_cpu": [], "qemu-img_cpu": []} for name, _ in variants
    }
    sizes: dict[str, dict[str, int]] = {}
    checked: set[str] = set()

    for run_no in range(args.runs):
        print(f"run {run_no + 1}/{args.runs}: load {os.getloadavg()}", flush=True)
        for name, fmt in variants:
            out_lb = work / f"lifeboat.{fmt}"
            out_q = work / f"qemu.{fmt}"
            qfmt = EXPORTERS.get(fmt).qemu_format

            def lb(fmt: str = fmt, name: str = name, out: Path = out_lb) -> None:
                w = EXPORTERS.get(fmt)()
                if name.endswith("(zlib)"):
                    import zlib

                    assert isinstance(w, VmdkStreamExporter)
                    w.deflate_name, w.deflate = "zlib", lambda d: zlib.compress(d, 1)
                out.unlink(missing_ok=True)
                w.write(reader, out)

            def qemu(fmt: str = fmt, qfmt: str = qfmt, out: Path = out_q) -> None:
                out.unlink(missing_ok=True)
                run(["qemu-img", "convert", "-f", "raw", "-O", qfmt, *QEMU_OPTS.get(fmt, []), str(raw), str(out)])
                fsync_path(out)

            steps = [("lifeboat", lb, [arc_dir]), ("qemu-img", qemu, [raw])]
            if run_no % 2:
                steps.reverse()
            for tool, fn, inputs in steps:
                prepare_cache(args.cache, inputs)
                secs, cpu = timed(fn)
                results[name][tool].append(secs)
                results[name][f"{tool}_cpu"].append(cpu)
                load = os.getloadavg()[0]
                print(f"  {name:20} {tool:9} {secs:7.2f} s  cpu {cpu:6.2f} s  load {load:.1f}", flush=True)
            sizes[name] = {"lifeboat": out_lb.stat().st_blocks * 512, "qemu-img": out_q.stat().st_blocks * 512}
            if name not in checked:
                cmp = subprocess.run(["qemu-img", "compare", "-f", qfmt, "-F", "raw", str(out_lb), str(raw)],
                                     capture_output=True, text=True)
                if cmp.returncode != 0:
                    print(f"  {name}: lifeboat image differs from the raw restore: {cmp.stdout}{cmp.stderr}")
                    return 1
                checked.add(name)
            out_lb.unlink(missing_ok=True)
            out_q.unlink(missing_ok=True)

    print()
    print(f"Export of a {image.stat().st_size / 1024**3:g} GiB ext4 point, median of {args.runs} run(s), "
          f"cache {args.cache}; vmdk-stream deflate: {stream_backend}")
    print("| format | lifeboat export s (cpu s) | qemu-img convert s (cpu s) | speed-up | lifeboat MiB | qemu MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    table: dict[str, Any] = {}
    for name, _ in variants:
        lb_s = statistics.median(results[name]["lifeboat"])
        q_s = statistics.median(results[name]["qemu-img"])
        lb_c = statistics.median(results[name]["lifeboat_cpu"])
        q_c = statistics.median(results[name]["qemu-img_cpu"])
        table[name] = {"lifeboat_s": lb_s, "qemu_img_s": q_s, "speedup": q_s / lb_s, "sizes": sizes[name],
                       "runs": results[name]}
        print(f"| {name} | {lb_s:.2f} ({lb_c:.1f}) | {q_s:.2f} ({q_c:.1f}) | {q_s / lb_s:.1f}x "
              f"| {sizes[name]['lifeboat'] / 2**20:.0f} | {sizes[name]['qemu-img'] / 2**20:.0f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine_info(), "results": table}, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
