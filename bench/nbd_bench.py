"""Benchmark of ``lifeboat serve`` against its peers, all in one run on this machine.

Peers: qemu-nbd serving the raw image and a compressed qcow2 of it, and nbdkit's Python plugin
serving the *same* archive through the *same* ``nbdserver.volume.PointVolume`` (the design
alternative that ``nbdserver/__init__.py`` explains we did not take). Measured:

1. sequential read of a 1 GiB ext4 image with ``nbdcopy`` (first pass on a fresh server, and
   the best of three), 2. 4 KiB random reads with fio (queue depth 16, 10 s, fresh server and
   after a pass), 3. seconds until the sample guest prints its boot line, booting from lifeboat
   (``--writable``) or qemu-nbd (raw), for a 256 MiB, 1 GiB and 64 GiB virtual disk, 4. with the
   archive throttled to 50 MB/s, a 2 GiB point: booting with ``--hydrate-to`` against
   restore-then-boot.

Run: ``.venv/bin/python bench/nbd_bench.py`` (about 10 minutes; inputs are cached in
``--workdir``, by default ``$LIFEBOAT_BENCH_DIR/nbd``, i.e. ``/var/tmp/lifeboat-bench/nbd``).
Prints a table and writes it into this folder's README.md (its own section).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples import sample_guest  # noqa: E402
from lifeboat.archive import Archive  # noqa: E402
from lifeboat.archive.files import FileSource  # noqa: E402
from lifeboat.archive.restore import restore  # noqa: E402
from lifeboat.archive.store import DEFAULT_CHUNK_SIZE  # noqa: E402
from lifeboat.archive.throttle import ThrottledBackend  # noqa: E402

GiB = 1024**3
MiB = 1024**2
THROTTLE = 50_000_000  # bytes/s: "50 MB/s"
README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- BEGIN nbd_bench (written by bench/nbd_bench.py) -->", "<!-- END nbd_bench -->"
TOOLS = ("nbdcopy", "nbdinfo", "fio", "qemu-img", "qemu-nbd", "nbdkit", "qemu-system-x86_64", "mkfs.ext4")

NBDKIT_PLUGIN = '''\
"""nbdkit peer for bench/nbd_bench.py: lifeboat's PointVolume behind nbdkit's protocol code."""
import sys

import nbdkit

API_VERSION = 2
_cfg = {}
vol = None


def config(key, value):
    _cfg[key] = value
    if key == "path":
        sys.path[:0] = value.split(":")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready():
    global vol
    from lifeboat.archive import Archive
    from lifeboat.nbdserver.volume import PointVolume

    arc = Archive.open(_cfg["archive"])
    arc.cache.max_bytes = int(_cfg.get("cache", 1 << 30))
    vol = PointVolume(arc.reader(arc.resolve(_cfg["selector"])))


def open(readonly):
    return 1


def get_size(h):
    return vol.size


def can_multi_conn(h):
    return True


def block_size(h):
    return (1, 4096, 32 * 1024 * 1024)


def pread(h, buf, offset, flags):
    data = vol.read_fast(offset, len(buf))
    buf[:] = data if data is not None else vol.read(offset, len(buf))


def extents(h, count, offset, flags):
    out, pos = [], offset
    for n, f in vol.extents(offset, count):
        out.append((pos, n, f))
        pos += n
    return out
'''


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command, failing loudly."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A running NBD server started by this benchmark (and stopped by it, by its own pid)."""

    name: str
    proc: subprocess.Popen[str]
    url: str
    started: float  # seconds from launch until it listened

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def lifeboat_serve(archive: Path, selector: str, *args: str) -> Server:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lifeboat", "--archive", str(archive), "serve", selector,
                             "--listen", "127.0.0.1:0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("nbd://"):
        proc.kill()
        raise RuntimeError(f"lifeboat serve printed {url!r}")
    return Server("lifeboat", proc, url, time.monotonic() - t0)


def qemu_nbd(image: Path, fmt: str, *, writable: bool = False) -> Server:
    port = free_port()
    t0 = time.monotonic()
    cmd = ["qemu-nbd", "-f", fmt, "-x", "disk", "-b", "127.0.0.1", "-p", str(port), "-t", "--cache=writeback"]
    if not writable:
        cmd.append("-r")
    proc = subprocess.Popen([*cmd, str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    wait_port(port, proc)
    return Server(f"qemu-nbd {fmt}", proc, f"nbd://127.0.0.1:{port}/disk", time.monotonic() - t0)


def nbdkit_peer(workdir: Path, archive: Path, selector: str) -> Server:
    plugin = workdir / "lifeboat_nbdkit_plugin.py"
    plugin.write_text(NBDKIT_PLUGIN)
    site = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "python", str(plugin),
                             f"path={REPO}:{site}", f"archive={archive}", f"selector={selector}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    wait_port(port, proc)
    return Server("nbdkit python", proc, f"nbd://127.0.0.1:{port}/", time.monotonic() - t0)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- inputs


def data_image(workdir: Path) -> Path:
    """1 GiB ext4 holding /usr/share (real files, a valid file system)."""
    img = workdir / "data.img"
    if not img.exists():
        log("building the 1 GiB ext4 data image (mkfs.ext4 -d /usr/share)")
        tmp = img.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.truncate(GiB)
        proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-d", "/usr/share", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:  # /usr/share did not fit: fall back to a part of it
            with open(tmp, "wb") as f:
                f.truncate(GiB)
            sh(["mkfs.ext4", "-q", "-F", "-d", "/usr/share/doc", str(tmp)])
        tmp.rename(img)
    return img


def qcow2_of(raw: Path) -> Path:
    out = raw.with_suffix(".qcow2")
    if not out.exists():
        log("compressing it to qcow2 (qemu-img convert -c)")
        sh(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(out) + ".tmp"])
        Path(str(out) + ".tmp").rename(out)
    return out


def guest_images(workdir: Path) -> dict[str, Path]:
    """The sample guest as 256 MiB, 1 GiB and 64 GiB disks, and a 2 GiB one full of data."""
    base = sample_guest.build()
    out = {}
    for name, size in (("guest256m", 256 * MiB), ("guest1g", GiB), ("guest64g", 64 * GiB)):
        p = workdir / f"{name}.img"
        if not p.exists():
            sample_guest.copy_image(base, p)
            os.truncate(p, size)
        out[name] = p
    p = workdir / "guest2g.img"
    if not p.exists():
        log("building the 2 GiB point: the sample guest followed by 1.75 GiB of random data")
        tmp = p.with_suffix(".tmp")
        sample_guest.copy_image(base, tmp)
        rng = random.Random(2)
        with open(tmp, "r+b") as f:
            f.seek(256 * MiB)
            for _ in range(7 * 256):
                f.write(rng.randbytes(MiB))
        tmp.rename(p)
    out["guest2g"] = p
    return out


def archive_of(workdir: Path, images: dict[str, Path]) -> Path:
    arc_dir = workdir / "archive"
    done = workdir / "archive.done"
    key = json.dumps({"images": sorted(images), "chunk_size": DEFAULT_CHUNK_SIZE})  # rebuilt when either changes
    if done.exists() and done.read_text() == key:
        return arc_dir
    shutil.rmtree(arc_dir, ignore_errors=True)
    arc = Archive.init(str(arc_dir))
    for machine, img in images.items():
        log(f"backing up {img.name} ({img.stat().st_size // MiB} MiB) as {machine}")
        with FileSource(img) as src:
            arc.backup(machine, src)
    done.write_text(key)
    return arc_dir


def clear_overlays(archive: Path) -> None:
    shutil.rmtree(archive / "overlays", ignore_errors=True)


# --------------------------------------------------------------------------- measurements


def nbdcopy_seconds(url: str) -> float:
    t0 = time.monotonic()
    sh(["nbdcopy", url, "null:"])
    return time.monotonic() - t0


def fio_iops(url: str, seconds: int = 10) -> float:
    out = sh(["fio", "--name=rand4k", "--ioengine=nbd", f"--uri={url}", "--rw=randread", "--bs=4k",
              "--iodepth=16", f"--runtime={seconds}", "--time_based", "--size=1G", "--output-format=json"]).stdout
    return float(json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"])


def read_benchmarks(workdir: Path, archive: Path, raw: Path, qcow2: Path, rounds: int,
                    fio_seconds: int) -> dict[str, dict[str, float]]:
    """Medians over ``rounds``; servers interleaved (order rotating), so that load from anything
    else on the machine falls on all of them alike."""
    makers: list[tuple[str, Callable[[], Server]]] = [
        ("lifeboat", lambda: lifeboat_serve(archive, "data")),
        ("nbdkit python (same Volume)", lambda: nbdkit_peer(workdir, archive, "data")),
        ("qemu-nbd raw", lambda: qemu_nbd(raw, "raw")),
        ("qemu-nbd qcow2 (compressed)", lambda: qemu_nbd(qcow2, "qcow2")),
    ]
    samples: dict[str, dict[str, list[float]]] = {name: {} for name, _ in makers}
    for k in range(rounds):
        for name, make in makers[k % len(makers):] + makers[: k % len(makers)]:
            r = samples[name]
            with running(make()) as s:
                r.setdefault("fio_cold", []).append(fio_iops(s.url, fio_seconds))
            with running(make()) as s:
                times = [nbdcopy_seconds(s.url) for _ in range(3)]
                r.setdefault("seq_first", []).append(times[0])
                r.setdefault("seq_best", []).append(min(times))
                r.setdefault("fio_warm", []).append(fio_iops(s.url, fio_seconds))
    results = {name: {m: statistics.median(v) for m, v in got.items()} for name, got in samples.items()}
    for name, med in results.items():
        log(f"{name}: nbdcopy first {med['seq_first']:.2f} s, best {med['seq_best']:.2f} s; "
            f"fio {med['fio_cold']:.0f} IOPS fresh, {med['fio_warm']:.0f} after a pass "
            f"(medians of {rounds}: {samples[name]})")
    return results


def boot_seconds(drive: str) -> float:
    res = sample_guest.boot(drive, timeout=300)
    t = res.seconds_to("booted")
    if t is None or not res.matched:
        raise RuntimeError(f"the guest did not boot from {drive}:\n{res.console[-2000:]}\n{res.stderr}")
    return t


def boot_benchmarks(workdir: Path, archive: Path, images: dict[str, Path], runs: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for machine in ("guest256m", "guest1g", "guest64g"):
        copy = workdir / f"{machine}.qemu-nbd.img"
        if not copy.exists():
            sh(["cp", "--sparse=always", str(images[machine]), str(copy)])
        lb: list[float] = []
        qn: list[float] = []
        start: list[float] = []
        for _ in range(runs):  # interleaved, so drift on a shared machine hits both alike
            clear_overlays(archive)
            with running(lifeboat_serve(archive, machine, "--writable")) as s:
                start.append(s.started)
                lb.append(boot_seconds(s.url))
            with running(qemu_nbd(copy, "raw", writable=True)) as s:
                qn.append(boot_seconds(s.url))
        results[machine] = {"lifeboat": statistics.median(lb), "qemu-nbd raw": statistics.median(qn),
                            "serve_start": statistics.median(start)}
        log(f"{machine}: boot line after {results[machine]['lifeboat']:.2f} s (lifeboat) vs "
            f"{results[machine]['qemu-nbd raw']:.2f} s (qemu-nbd raw); lifeboat listened "
            f"{results[machine]['serve_start']:.2f} s after launch (runs: {lb} vs {qn})")
        clear_overlays(archive)
    return results


def throttled_benchmark(workdir: Path, archive: Path) -> dict[str, float]:
    target = workdir / "hydrated.img"
    restored = workdir / "restored.img"
    for p in (target, Path(f"{target}.hydrate"), restored):
        p.unlink(missing_ok=True)
    clear_overlays(archive)
    s = lifeboat_serve(archive, "guest2g", "--writable", "--hydrate-to", str(target),
                       "--archive-rate", str(THROTTLE))
    try:
        hydrate_boot = s.started + boot_seconds(s.url)
    finally:
        s.stop()
    log(f"hydrate-to boot: {hydrate_boot:.2f} s")

    arc = Archive.open(str(archive))
    arc.backend = ThrottledBackend(arc.backend, THROTTLE)
    t0 = time.monotonic()
    info = arc.resolve("guest2g")
    restore(arc.reader(info), restored)
    restore_s = time.monotonic() - t0
    boot_s = boot_seconds(str(restored))
    log(f"restore {restore_s:.1f} s (read {arc.backend.bytes_read / 1e6:.0f} MB at 50 MB/s) then boot {boot_s:.2f} s")
    for p in (target, Path(f"{target}.hydrate"), restored):
        p.unlink(missing_ok=True)
    clear_overlays(archive)
    return {"hydrate_boot": hydrate_boot, "restore": restore_s, "restore_boot": boot_s,
            "restore_then_boot": restore_s + boot_s}


# --------------------------------------------------------------------------- report


def table(reads: dict[str, dict[str, float]], boots: dict[str, dict[str, float]],
          throttled: dict[str, float]) -> str:
    lb = reads["lifeboat"]
    kit = reads["nbdkit python (same Volume)"]
    raw = reads["qemu-nbd raw"]
    q2 = reads["qemu-nbd qcow2 (compressed)"]
    rows = [
        "| measurement | lifeboat | nbdkit python plugin, same Volume | qemu-nbd raw | qemu-nbd qcow2 (compressed) "
        "| lifeboat vs target peer | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| nbdcopy 1 GiB, fresh server (s) | {lb['seq_first']:.2f} | {kit['seq_first']:.2f} | {raw['seq_first']:.2f} "
        f"| {q2['seq_first']:.2f} | {q2['seq_first'] / lb['seq_first']:.2f}x qcow2 speed | >= 1x qcow2 |",
        f"| nbdcopy 1 GiB, best of 3 (s) | {lb['seq_best']:.2f} | {kit['seq_best']:.2f} | {raw['seq_best']:.2f} "
        f"| {q2['seq_best']:.2f} | {q2['seq_best'] / lb['seq_best']:.2f}x qcow2 speed | >= 1x qcow2 |",
        f"| fio 4K random read QD16, fresh server (IOPS) | {lb['fio_cold']:.0f} | {kit['fio_cold']:.0f} "
        f"| {raw['fio_cold']:.0f} | {q2['fio_cold']:.0f} | {lb['fio_cold'] / q2['fio_cold']:.2f}x qcow2 IOPS "
        "| >= 2x qcow2 |",
        f"| fio 4K random read QD16, after a pass (IOPS) | {lb['fio_warm']:.0f} | {kit['fio_warm']:.0f} "
        f"| {raw['fio_warm']:.0f} | {q2['fio_warm']:.0f} | {lb['fio_warm'] / q2['fio_warm']:.2f}x qcow2 IOPS "
        "| >= 2x qcow2 |",
    ]
    for machine, label in (("guest256m", "256 MiB"), ("guest1g", "1 GiB"), ("guest64g", "64 GiB")):
        b = boots[machine]
        target = "<= 1x (no slower)" if machine == "guest64g" else "<= 1.2x"
        rows.append(f"| sample guest boot line, {label} disk (s, median) | {b['lifeboat']:.2f} | - "
                    f"| {b['qemu-nbd raw']:.2f} | - | {b['lifeboat'] / b['qemu-nbd raw']:.2f}x raw time | {target} |")
    rows.append(f"| 2 GiB point, archive at 50 MB/s: boot with --hydrate-to (s) | {throttled['hydrate_boot']:.2f} | - "
                f"| restore {throttled['restore']:.1f} + boot {throttled['restore_boot']:.2f} = "
                f"{throttled['restore_then_boot']:.1f} (restore-then-boot) | - "
                f"| {throttled['restore_then_boot'] / throttled['hydrate_boot']:.1f}x sooner | >= 5x sooner |")
    return "\n".join(rows)


def write_readme(text: str) -> None:
    section = f"{BEGIN}\n{text}\n{END}"
    if README.exists():
        cur = README.read_text()
        if BEGIN in cur and END in cur:
            new = cur[: cur.index(BEGIN)] + section + cur[cur.index(END) + len(END):]
        else:
            new = cur.rstrip("\n") + "\n\n" + section + "\n"
    else:
        new = "# Benchmarks\n\nEach section is written by the script it names; run it again to refresh it.\n\n" \
              + section + "\n"
    README.write_text(new)


def machine_note() -> str:
    cpus = os.cpu_count()
    model = ""
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        model = m.group(1) if m else ""
    return f"{platform.system()} {platform.release()}, {cpus} vCPUs ({model}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path,
                    default=Path(os.environ.get("LIFEBOAT_BENCH_DIR", "/var/tmp/lifeboat-bench")) / "nbd")
    ap.add_argument("--boot-runs", type=int, default=5)
    ap.add_argument("--read-rounds", type=int, default=3)
    ap.add_argument("--fio-seconds", type=int, default=5)
    ap.add_argument("--no-readme", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        log(f"missing tools: {', '.join(missing)} (bash scripts/setup.sh)")
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    raw = data_image(args.workdir)
    qcow2 = qcow2_of(raw)
    images = {"data": raw, **guest_images(args.workdir)}
    archive = archive_of(args.workdir, images)
    arc = Archive.open(str(archive))
    chunk = arc.chunk_size
    stored = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file() and "overlays" not in p.parts)

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    reads = read_benchmarks(args.workdir, archive, raw, qcow2, args.read_rounds, args.fio_seconds)
    boots = boot_benchmarks(args.workdir, archive, images, args.boot_runs)
    throttled = throttled_benchmark(args.workdir, archive)
    tbl = table(reads, boots, throttled)
    note = textwrap.dedent(f"""\
        ## NBD server (`bench/nbd_bench.py`)

        Run {time.strftime('%Y-%m-%d %H:%M')} on {machine_note()}; archive chunk size {chunk // 1024} KiB,
        zstd; packs hold {stored / 1e9:.2f} GB for all inputs; {time.monotonic() - started:.0f} s of measuring;
        load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after (the machine is shared).
        Reads: medians of {args.read_rounds} interleaved rounds (fio {args.fio_seconds} s each); boots: medians
        of {args.boot_runs} interleaved runs.
        The 1 GiB image is ext4 filled from /usr/share; boots are the sample guest (QEMU TCG) until it prints
        `LIFEBOAT-GUEST: booted`, lifeboat serving `--writable`, qemu-nbd serving a writable raw copy.
        "lifeboat vs target peer" divides so that more than 1 is better for speed and IOPS; for boot
        times it is lifeboat's time over qemu-nbd's (less is better).
        """)
    text = note + "\n" + tbl + "\n"
    print(text)
    if not args.no_readme:
        write_readme(text.rstrip("\n"))
        log(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
