"""Agent benchmark: dirty-bitmap incrementals against borg, and the RPO that ``protect`` achieves.

Part 1, incremental of a 1 % change (one run, tools side by side, ``--runs`` repetitions, medians):
the cached 2.5 GiB ext4 image of ``bench.common.realistic_image`` is served by
``qemu-storage-daemon`` (QEMU's block layer with QMP, no guest); lifeboat takes a full point
through QMP, then the blocks that differ in ``one_percent_change`` are written through QEMU
(its NBD server), so the dirty bitmap sees exactly that change; then, timed:

- ``lifeboat backup vm qmp+unix://...`` (incremental-bitmap: reads only the dirty extents);
- ``borg create`` of the same image file after the same blocks were written into it (borg 1.2,
  ``--chunker-params fixed,4194304 --compression zstd,3``, the same path so its files cache applies);
- ``lifeboat backup vm FILE`` of that file (hash-scan: reads and hashes everything), which shows
  what a persistent map of chunk hashes could save at most (its hashing share, measured apart).

The page cache is dropped before each timed step (root), so every tool reads from the disk.
Every lifeboat point is restored once and compared with the changed image (SHA-256, untimed).

Part 2, RPO under load: the sample guest writes 2 MiB records back to back (about 20 MB/s under
TCG, measured and reported), ``lifeboat protect --rpo 1`` runs for ``--rpo-seconds`` (default
300), and the achieved RPO (age of the newest point) is sampled every 0.1 s from its /status
endpoint: median and 99th percentile, plus the per-cycle worst ages that protect reports itself.

Usage::

    .venv/bin/python bench/agent_bench.py [--runs 3] [--rpo-seconds 300] [--json-out FILE] [--skip-rpo]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import BENCH_DIR, drop_caches, load_meta, machine_info, one_percent_change, realistic_image, run

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from examples import sample_guest as sg  # noqa: E402
from lifeboat.agent.nbd import NbdConnection  # noqa: E402
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT  # noqa: E402
from lifeboat.plumbing.qmp import QmpClient  # noqa: E402

BLOCK = 4096  # the change is 1 % of 4 KiB blocks: written as such, as a guest's file system would
MiB = 1024 * 1024


def log(msg: str) -> None:
    """Progress on stderr."""
    print(msg, file=sys.stderr, flush=True)


CPU: dict[str, list[float]] = {}
ENGINE_SECONDS: dict[str, list[float]] = {}
# One capture timed inside an already started Python (what each capture of ``protect`` costs):
# imports and the archive's opening happen before the clock starts, the page cache is dropped.
ENGINE = """
import json, os, sys, time
from lifeboat.agent.plan import capture
from lifeboat.orchestrator.sources import open_source
from lifeboat.archive import Archive
arc = Archive.open(sys.argv[1])
os.sync()
open("/proc/sys/vm/drop_caches", "w").write("3\\n")
t0 = time.perf_counter()
with open_source(sys.argv[2]) as src:
    info, plan = capture(arc, "vm", src)
print(json.dumps({"seconds": time.perf_counter() - t0, "mode": plan.mode, "bytes_read": info.bytes_read}))
"""


def timed(cmd: list[str], env: dict[str, str] | None = None, label: str | None = None) -> tuple[float, str]:
    """Wall seconds of a command (after dropping caches) and its stdout; its CPU seconds go to ``CPU[label]``."""
    drop_caches()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    if label:
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        CPU.setdefault(label, []).append(round(cpu, 2))
    return elapsed, proc.stdout


def diff_extents(base: Path, changed: Path) -> list[tuple[int, int]]:
    """(offset, length) of the 4 KiB blocks that differ, merged."""
    out: list[tuple[int, int]] = []
    with base.open("rb") as fa, changed.open("rb") as fb:
        ma = mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ)
        mb = mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ)
        for off in range(0, len(ma), BLOCK):
            if ma[off:off + BLOCK] != mb[off:off + BLOCK]:
                if out and out[-1][0] + out[-1][1] == off:
                    out[-1] = (out[-1][0], out[-1][1] + BLOCK)
                else:
                    out.append((off, min(BLOCK, len(ma) - off)))
        ma.close()
        mb.close()
    return out


def sha256(path: Path) -> str:
    """SHA-256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while buf := f.read(16 * MiB):
            h.update(buf)
    return h.hexdigest()


class StorageDaemon:
    """qemu-storage-daemon serving one raw image as node ``disk0`` with a QMP socket."""

    def __init__(self, disk: Path, work: Path) -> None:
        self.qmp_path = work / "qmp.sock"
        self.proc = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={disk}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not self.qmp_path.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("qemu-storage-daemon did not start")
            time.sleep(0.05)

    @property
    def spec(self) -> str:
        return f"qmp+unix://{self.qmp_path}?node=disk0"

    def qmp(self, command: str, **args: Any) -> Any:
        with QmpClient(str(self.qmp_path)) as q:
            return q.cmd(command, **args)

    def apply(self, changed: Path, extents: list[tuple[int, int]]) -> None:
        """Write the changed image's bytes of ``extents`` through QEMU (so its bitmaps see them)."""
        sock = self.qmp_path.with_name("writer.sock")
        self.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        self.qmp("block-export-add", type="nbd", id="writer", **{"node-name": "disk0"}, name="writer",
                 writable=True)
        conn = NbdConnection(str(sock), "writer")
        with changed.open("rb") as f:
            for off, length in extents:
                f.seek(off)
                conn.write(off, f.read(length))
        conn.flush()
        conn.close()
        self.qmp("block-export-del", id="writer", mode="hard")
        self.qmp("nbd-server-stop")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def write_extents(target: Path, source: Path, extents: list[tuple[int, int]]) -> None:
    """Copy ``extents`` of ``source`` into ``target`` in place, durably."""
    with source.open("rb") as fi, target.open("r+b") as fo:
        for off, length in extents:
            fi.seek(off)
            fo.seek(off)
            fo.write(fi.read(length))
        fo.flush()
        os.fsync(fo.fileno())


def lifeboat_bitmap(run_dir: Path, base: Path, changed: Path, extents: list[tuple[int, int]], cs: int,
                    want: str | None) -> tuple[float, dict[str, Any]]:
    """Full points through QMP into two archives (each tracks with its own bitmap), the change
    written once through QEMU, then the timed incrementals: the command into the first archive,
    the engine alone (``ENGINE``) into the second; the same work both times."""
    disk = run_dir / "qsd-disk.img"
    run(["cp", "--sparse=always", str(base), str(disk)])
    envs = [{**os.environ, "LIFEBOAT_ARCHIVE": str(run_dir / f"lifeboat-archive-{cs}-{k}")} for k in "ab"]
    for env in envs:
        run([*LIFEBOAT, "archive", "init", "--chunk-size", str(cs)], env=env)
    qsd = StorageDaemon(disk, run_dir)
    try:
        full_s, _ = timed([*LIFEBOAT, "backup", "vm", qsd.spec, "--json"], envs[0])
        run([*LIFEBOAT, "backup", "vm", qsd.spec, "--json"], env=envs[1])
        qsd.apply(changed, extents)
        inc_s, out = timed([*LIFEBOAT, "backup", "vm", qsd.spec, "--json"], envs[0], f"lifeboat-bitmap@{cs}")
        _, engine = timed([sys.executable, "-c", ENGINE, envs[1]["LIFEBOAT_ARCHIVE"], qsd.spec], envs[1])
    finally:
        qsd.stop()
    disk.unlink()
    doc = json.loads(out)
    eng = json.loads(engine)
    if doc["mode"] != "incremental-bitmap" or eng["mode"] != "incremental-bitmap":
        raise RuntimeError(f"expected incremental-bitmap points: {doc} {eng}")
    ENGINE_SECONDS.setdefault(f"lifeboat-bitmap@{cs}", []).append(round(eng["seconds"], 3))
    if want:
        restored = run_dir / "restored.img"
        run([*LIFEBOAT, "restore", f"vm@{doc['point']}", str(restored)], env=envs[0])
        if sha256(restored) != want:
            raise RuntimeError("the bitmap incremental does not restore to the changed image")
        restored.unlink()
    for env in envs:
        shutil.rmtree(env["LIFEBOAT_ARCHIVE"], ignore_errors=True)
    return inc_s, {"full_seconds": round(full_s, 2), "bytes_read": doc["bytes_read"],
                   "changed_bytes": doc["changed_bytes"], "bytes_new": doc["bytes_new"],
                   "bytes_stored": doc["bytes_stored"], "engine_bytes_read": eng["bytes_read"]}


Extents = list[tuple[int, int]]


def lifeboat_hash_scan(run_dir: Path, base: Path, changed: Path, extents: Extents) -> tuple[float, dict[str, Any]]:
    """The same change backed up from the image file by read-and-hash (default chunk size)."""
    env = {**os.environ, "LIFEBOAT_ARCHIVE": str(run_dir / "lifeboat-archive-file")}
    run([*LIFEBOAT, "archive", "init"], env=env)
    plain = run_dir / "plain.img"
    run(["cp", "--sparse=always", str(base), str(plain)])
    run([*LIFEBOAT, "backup", "file", str(plain), "--json"], env=env)
    write_extents(plain, changed, extents)
    hs_s, out = timed([*LIFEBOAT, "backup", "file", str(plain), "--json"], env, "lifeboat-hash-scan")
    drop_caches()
    t0 = time.perf_counter()
    with plain.open("rb") as f:
        while f.read(16 * MiB):
            pass
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with plain.open("rb") as f:
        while buf := f.read(MiB):
            hashlib.sha256(buf).digest()
    hash_s = time.perf_counter() - t0  # warm now: reading + SHA-256 on one core
    plain.unlink()
    shutil.rmtree(run_dir / "lifeboat-archive-file", ignore_errors=True)
    return hs_s, {"read_only_cold_seconds": round(read_s, 2),
                  "read_and_sha256_warm_one_core_seconds": round(hash_s, 2),
                  "bytes_new": json.loads(out)["bytes_new"]}


def borg_incremental(run_dir: Path, base: Path, changed: Path, extents: Extents) -> tuple[float, dict[str, Any]]:
    """borg create of the image, the same blocks written into it, then the timed borg create."""
    repo = run_dir / "borg-repo"
    disk = run_dir / "borg-disk.img"
    run(["cp", "--sparse=always", str(base), str(disk)])
    benv = {**os.environ, "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_BASE_DIR": str(run_dir / "borg-home")}
    run(["borg", "init", "-e", "none", str(repo)], env=benv)
    opts = ["--chunker-params", "fixed,4194304", "--compression", "zstd,3"]
    full_s, _ = timed(["borg", "create", *opts, f"{repo}::full", str(disk)], benv)
    write_extents(disk, changed, extents)
    inc_s, _ = timed(["borg", "create", *opts, f"{repo}::inc", str(disk)], benv, "borg")
    disk.unlink()
    shutil.rmtree(repo, ignore_errors=True)
    return inc_s, {"full_seconds": round(full_s, 2)}


def bench_incremental(runs: int, work: Path, size_gib: float, chunk_sizes: list[int]) -> dict[str, Any]:
    """Part 1 (see the module doc)."""
    base = realistic_image(size_gib)
    changed = one_percent_change(base)
    meta = load_meta(changed) or {}
    log("agent bench: computing the changed extents")
    extents = diff_extents(base, changed)
    want = meta.get("sha256") or sha256(changed)
    tools = [f"lifeboat-bitmap@{cs}" for cs in chunk_sizes] + ["borg", "lifeboat-hash-scan"]
    results: dict[str, list[float]] = {t: [] for t in tools}
    details: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    for r in range(runs):
        run_dir = work / f"run{r}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        for tool in tools[r % len(tools):] + tools[:r % len(tools)]:
            if tool.startswith("lifeboat-bitmap@"):
                secs, det = lifeboat_bitmap(run_dir, base, changed, extents, int(tool.split("@")[1]),
                                            want if r == 0 else None)
            elif tool == "borg":
                secs, det = borg_incremental(run_dir, base, changed, extents)
            else:
                secs, det = lifeboat_hash_scan(run_dir, base, changed, extents)
            results[tool].append(round(secs, 3))
            details[tool].append(det)
        log(f"agent bench: run {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in results.items()))
        shutil.rmtree(run_dir, ignore_errors=True)
    med = {k: round(statistics.median(v), 3) for k, v in results.items()}
    cpu = {k: round(statistics.median(v), 2) for k, v in CPU.items()}
    engine = {k: round(statistics.median(v), 3) for k, v in ENGINE_SECONDS.items()}
    return {
        "image": str(base), "image_bytes": base.stat().st_size,
        "changed_bytes_4k_blocks": sum(n for _, n in extents),
        "changed_fraction_4k": meta.get("fraction_changed"), "runs": runs, "seconds": results,
        "median_seconds": med, "median_cpu_seconds": cpu, "engine_seconds": ENGINE_SECONDS,
        "median_engine_seconds": engine,
        "speedup_vs_borg": {t: round(med["borg"] / med[t], 1) for t in tools if t.startswith("lifeboat-bitmap")},
        "engine_speedup_vs_borg": {t: round(med["borg"] / v, 1) for t, v in engine.items()},
        "details": details,
    }


def bench_rpo(seconds: float, work: Path) -> dict[str, Any]:
    """Part 2 (see the module doc)."""
    rdir = work / "rpo"
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir(parents=True)
    raw = sg.copy_image(sg.build(), rdir / "disk.raw")
    sg.set_kernel_args(raw, "lifeboat.stay=1 lifeboat.workload=1 lifeboat.workload_ms=0 lifeboat.workload_kib=2048")
    disk = rdir / "disk.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)])
    raw.unlink()
    qmp = rdir / "qmp.sock"
    cmd = sg.qemu_command(str(disk), fmt="qcow2", extra_args=["-qmp", f"unix:{qmp},server=on,wait=off"])
    guest = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wrote: list[tuple[float, int]] = []
    ready = threading.Event()

    def console() -> None:
        assert guest.stdout is not None
        for line in guest.stdout:
            m = re.search(rb"LIFEBOAT-GUEST: wrote (\d+)", line)
            if m:
                wrote.append((time.monotonic(), int(m.group(1))))
                if len(wrote) >= 3:
                    ready.set()

    threading.Thread(target=console, daemon=True).start()
    if not ready.wait(120):
        guest.kill()
        raise RuntimeError("the guest's workload did not start")
    env = {**os.environ, "LIFEBOAT_ARCHIVE": str(rdir / "archive")}
    run([*LIFEBOAT, "archive", "init"], env=env)
    spec = f"qmp+unix://{qmp}?node=virtio0"
    prot = subprocess.Popen([*LIFEBOAT, "protect", "vm", spec, "--rpo", "1", "--no-index",  # the capture alone
                             "--metrics-listen", "127.0.0.1:0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = None
    assert prot.stderr is not None
    for line in prot.stderr:
        m = re.search(r"127\.0\.0\.1:(\d+)/metrics", line)
        if m:
            port = int(m.group(1))
            break
    threading.Thread(target=lambda: [None for _ in prot.stderr or []], daemon=True).start()
    samples: list[float] = []
    status: dict[str, Any] = {}
    try:
        # wait for the first (full) point, then sample for the asked duration
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5).read())
            if status["captures"] >= 1:
                break
            time.sleep(0.2)
        t_start = time.monotonic()
        n_start = wrote[-1][1]
        while time.monotonic() - t_start < seconds:
            status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5).read())
            if status["rpo_seconds"] is not None:
                samples.append(status["rpo_seconds"])
            time.sleep(0.1)
        t_end = time.monotonic()
        n_end = wrote[-1][1]
    finally:
        prot.send_signal(signal.SIGTERM)
        prot.wait(timeout=120)
        guest.kill()
        guest.wait()
    mb_s = (n_end - n_start) * 2 * MiB / (t_end - t_start) / 1e6
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {
        "seconds": seconds, "guest_write_mb_s": round(mb_s, 1), "samples": len(samples),
        "rpo_median_seconds": round(statistics.median(samples), 3), "rpo_p99_seconds": round(p99, 3),
        "rpo_max_seconds": round(max(samples), 3),
        "per_cycle": status.get("achieved"), "captures": status.get("captures"),
        "captures_by_mode": status.get("captures_by_mode"), "failures": status.get("failures"),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/agent_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="repetitions of part 1; medians reported (default 3)")
    p.add_argument("--size-gib", type=float, default=2.5, help="image size for part 1 (default 2.5)")
    p.add_argument("--chunk-sizes", default="4194304",
                   help="archive chunk sizes for the bitmap incremental, comma-separated (default 4194304, "
                        "the archive's default)")
    p.add_argument("--rpo-seconds", type=float, default=300, help="duration of part 2 (default 300)")
    p.add_argument("--skip-incremental", action="store_true", help="run part 2 only")
    p.add_argument("--skip-rpo", action="store_true", help="run part 1 only")
    p.add_argument("--json-out", type=Path, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = BENCH_DIR / "agent-work"
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine_info()}
    # Byte-compile the project once, as an installed package is: every timed `lifeboat` command
    # then starts as it does for a user, even where PYTHONDONTWRITEBYTECODE is set.
    run([sys.executable, "-m", "compileall", "-q", *(str(REPO / d) for d in ("archive", "agent", "orchestrator"))])
    try:
        if not args.skip_incremental:
            sizes = [int(x) for x in args.chunk_sizes.split(",")]
            result["incremental"] = bench_incremental(args.runs, work, args.size_gib, sizes)
        if not args.skip_rpo:
            result["rpo"] = bench_rpo(args.rpo_seconds, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
