"""Replication benchmark: ``lifeboat replicate`` against ``rclone sync`` of the archive directory.

On the cached realistic image (``bench.common.realistic_image``, 2.5 GiB ext4 of real files) and its
1 %-changed copy (``one_percent_change``): the image is backed up into a source archive, then

- full: the whole archive is copied into an empty directory,
- incremental: the changed copy is backed up (an incremental point), and only what is new is
  copied into the replica of the step before,

by each tool in turn, in the same run: ``lifeboat replicate --to DIR`` (every pack checked before
it is sent and read back after, manifests last) and ``rclone sync SRC DIR`` (Debian's rclone,
defaults: 4 transfers, size and modification time compared, no content check). Each time includes
fsync of the destination. The page cache is dropped before each step (root), else the source is
warm for every tool alike. Each figure is the median of ``--runs`` runs, tools in rotated order.
Every replica is checked outside the timing: ``lifeboat verify`` on it, and the newest point
restored from it has the changed image's SHA-256.

With ``--boot``, instead: time to the sample guest's boot line (``LIFEBOAT-GUEST: booted`` on its
console, QEMU/TCG) from a point in an S3 archive (SeaweedFS on loopback, as in the tests), two
ways in the same run: ``lifeboat serve --writable --hydrate-to DISK`` from the bucket and QEMU on
its export at once (demand first, pack cache, read-ahead), against ``lifeboat restore`` of the
whole point from the bucket first and QEMU on the restored disk (and, for reference, ``lifeboat
serve`` without hydration). Each time runs from the start of the first lifeboat command to the
boot line; the ratio is download-first / hydrate. ``--data-mib N`` first writes N MiB of random
data into the guest's data partition (from 16 MiB into it), which the boot never reads: a machine
whose disk holds more than its boot needs, as real ones do. ``--link-rate`` puts the bucket behind
a link of that speed (``tests/archive/faultproxy.py``), as an off-site store is.

Usage::

    .venv/bin/python bench/replicate_bench.py [--runs 3] [--size-gib 2.5] [--json-out FILE]
    .venv/bin/python bench/replicate_bench.py --boot [--runs 3] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import (  # noqa: E402
    BENCH_DIR,
    drop_caches,
    du_bytes,
    fsync_tree,
    machine_info,
    one_percent_change,
    realistic_image,
    run,
    sha256_file,
)

from examples.sample_guest import PARTITION2_OFFSET, boot, build, copy_image  # noqa: E402
from tests.archive.faultproxy import FaultProxy  # noqa: E402
from tests.archive.s3servers import BUCKET, CREDENTIALS, client, seaweedfs_argv, serve  # noqa: E402

LIFEBOAT = [sys.executable, "-m", "lifeboat"]
BOOTED = "LIFEBOAT-GUEST: booted"
BOOT_TIMEOUT = 600


def lifeboat(*argv: str) -> str:
    """Run ``lifeboat ARGV``; its stdout."""
    return run([*LIFEBOAT, *argv]).stdout


def timed(step: Callable[[], None], dest: Path) -> float:
    """Seconds for ``step`` plus fsync of what it wrote, from a dropped (or warm) page cache."""
    drop_caches()
    start = time.monotonic()
    step()
    fsync_tree(dest)
    return time.monotonic() - start


def copy_step(tool: str, src: Path, dest: Path) -> Callable[[], None]:
    """The copy of ``src`` into ``dest`` as ``tool`` does it."""
    argv = ([*LIFEBOAT, "replicate", "--to", str(dest), "--archive", str(src), "--json"] if tool == "lifeboat"
            else ["rclone", "sync", str(src), str(dest)])

    def step() -> None:
        run(argv)

    return step


def check(replica: Path, image: Path, work: Path) -> None:
    """The replica verifies clean and its newest point restores ``image``."""
    lifeboat("verify", "--archive", str(replica))
    out = work / "restored.img"
    out.unlink(missing_ok=True)
    lifeboat("restore", "bench", str(out), "--archive", str(replica))
    if sha256_file(out) != sha256_file(image):
        raise SystemExit(f"{replica}: the restored point differs from {image}")
    out.unlink()


def one_run(image: Path, changed: Path, work: Path, order: list[str]) -> dict[str, dict[str, float]]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "src"
    lifeboat("archive", "init", "--archive", str(src))
    lifeboat("backup", "bench", str(image), "--archive", str(src))
    fig: dict[str, dict[str, float]] = {t: {} for t in order}
    for tool in order:
        dest = work / tool
        fig[tool]["full_s"] = timed(copy_step(tool, src, dest), dest)
        fig[tool]["full_bytes"] = du_bytes(dest)
    lifeboat("backup", "bench", str(changed), "--archive", str(src))
    before = {t: du_bytes(work / t) for t in order}
    for tool in order:
        dest = work / tool
        fig[tool]["incremental_s"] = timed(copy_step(tool, src, dest), dest)
        fig[tool]["incremental_bytes"] = du_bytes(dest) - before[tool]
        check(dest, changed, work)
    shutil.rmtree(work)
    return fig


def _booted(drive: str) -> float:
    """Seconds from now to the guest's boot line, booting ``drive`` (a file or an NBD URL)."""
    start = time.monotonic()
    result = boot(drive, timeout=BOOT_TIMEOUT, expect=BOOTED + "\n", linger=0)  # the whole line: its event is in
    line = result.seconds_to("booted")
    if not result.matched or line is None:
        raise SystemExit(f"the guest did not boot from {drive}:\n{result.console[-2000:]}\n{result.stderr}")
    return time.monotonic() - start - result.elapsed + line


def boot_served(location: str, work: Path, env: dict[str, str], hydrate: bool = True) -> float:
    """``lifeboat serve`` (``--hydrate-to``) from the bucket, QEMU on its export: seconds to the boot line."""
    start = time.monotonic()
    extra = ["--hydrate-to", str(work / "hydrated.img")] if hydrate else []
    proc = subprocess.Popen([*LIFEBOAT, "--archive", location, "serve", "guest", "--writable", "--listen",
                             "127.0.0.1:0", *extra, "--overlay", str(work / "unused.cow")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("nbd://"):
            raise SystemExit(f"lifeboat serve printed {url!r}")
        return time.monotonic() - start + _booted(url)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def boot_downloaded(location: str, work: Path, env: dict[str, str]) -> float:
    """``lifeboat restore`` of the whole point from the bucket, then QEMU on the local disk."""
    start = time.monotonic()
    run([*LIFEBOAT, "--archive", location, "restore", "guest", str(work / "restored.img")], env=env)
    return time.monotonic() - start + _booted(str(work / "restored.img"))


def guest_with_data(work: Path, data_mib: int) -> Path:
    """The sample guest with ``data_mib`` MiB of random data in its data partition (16 MiB in)."""
    image = copy_image(build(), work / "guest.raw")
    rng = random.Random(5)
    with image.open("r+b") as f:
        f.seek(PARTITION2_OFFSET + 16 * 1024 * 1024)
        for _ in range(data_mib):
            f.write(rng.randbytes(1024 * 1024))
    return image


def boot_bench(runs: int, json_out: str | None, link_rate: int | None, data_mib: int) -> None:
    """Time to the boot line from the off-site copy: hydrate while booting against download first
    (through a link of ``link_rate`` bytes/s when given)."""
    work = BENCH_DIR / "offsite-boot"
    shutil.rmtree(work, ignore_errors=True)
    (work / "weed").mkdir(parents=True)
    image = guest_with_data(work, data_mib)
    image_bytes = image.stat().st_size
    argv, url = seaweedfs_argv(work / "weed")
    with serve(argv, url, work / "weed" / "log") as endpoint:
        client(endpoint).create_bucket(Bucket=BUCKET)
        env = {**os.environ, **CREDENTIALS, "LIFEBOAT_S3_ENDPOINT": endpoint, "AWS_CONFIG_FILE": os.devnull,
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
        location = f"s3://{BUCKET}/bench"
        run([*LIFEBOAT, "--archive", location, "archive", "init"], env=env)
        run([*LIFEBOAT, "--archive", location, "backup", "guest", str(image)], env=env)
        link = FaultProxy(endpoint, every=0, rate=link_rate) if link_rate else None
        if link is not None:
            env["LIFEBOAT_S3_ENDPOINT"] = link.endpoint
        ways: dict[str, Callable[[str, Path, dict[str, str]], float]] = {
            "hydrate": boot_served, "download_first": boot_downloaded,
            "serve_only": lambda loc, w, e: boot_served(loc, w, e, hydrate=False)}
        figures: dict[str, list[float]] = {w: [] for w in ways}
        for i in range(runs):
            for way in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
                for leftover in [*work.glob("*.img*"), *work.glob("*.cow")]:
                    leftover.unlink()
                figures[way].append(ways[way](location, work, env))
                print(f"run {i + 1}: {way} {figures[way][-1]:.2f} s", file=sys.stderr)
        if link is not None:
            link.close()
    shutil.rmtree(work, ignore_errors=True)
    median = {w: statistics.median(v) for w, v in figures.items()}
    where = (f"{link_rate / 1e6:g} MB/s link" if link_rate else "loopback") + f", {data_mib} MiB of data unread"
    print(f"boot line from S3 ({where}): hydrate {median['hydrate']:.2f} s, download first "
          f"{median['download_first']:.2f} s (ratio {median['download_first'] / median['hydrate']:.2f}); "
          f"served without hydrating {median['serve_only']:.2f} s")
    if json_out:
        Path(json_out).write_text(json.dumps({"machine": machine_info(), "image_bytes": image_bytes,
                                              "link_rate": link_rate, "data_mib": data_mib,
                                              "runs": figures, "median": median}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-gib", type=float, default=2.5)
    ap.add_argument("--json-out")
    ap.add_argument("--boot", action="store_true", help="time to the boot line from S3 instead (see above)")
    ap.add_argument("--link-rate", help="with --boot: reach the bucket through a link of this many MB/s (e.g. 4M)")
    ap.add_argument("--data-mib", type=int, default=0, help="with --boot: MiB of data the boot does not read")
    args = ap.parse_args()
    if args.boot:
        rate = int(float(args.link_rate.rstrip("M")) * 1e6) if args.link_rate else None
        boot_bench(args.runs, args.json_out, rate, args.data_mib)
        return
    if shutil.which("rclone") is None:
        raise SystemExit("rclone is not installed (scripts/setup.sh installs it)")
    image = realistic_image(args.size_gib)
    changed = one_percent_change(image)
    info = machine_info()
    print(json.dumps(info), file=sys.stderr)
    print("rclone:", run(["rclone", "version"]).stdout.splitlines()[0], file=sys.stderr)
    tools = ["lifeboat", "rclone"]
    runs = []
    for i in range(args.runs):
        order = tools[i % 2:] + tools[:i % 2]
        fig = one_run(image, changed, BENCH_DIR / "replicate-run", order)
        print(f"run {i + 1}: {json.dumps(fig)}", file=sys.stderr)
        runs.append(fig)
    median = {t: {k: statistics.median(r[t][k] for r in runs) for k in runs[0][t]} for t in tools}
    size = image.stat().st_size
    for t in tools:
        m = median[t]
        print(f"{t:9s} full {m['full_s']:6.2f} s ({m['full_bytes'] / m['full_s'] / 1e6:5.0f} MB/s)  "
              f"incremental {m['incremental_s']:6.2f} s ({m['incremental_bytes'] / 1e6:.1f} MB copied)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": info, "image_bytes": size, "runs": runs,
                                                   "median": median}, indent=2))


if __name__ == "__main__":
    main()
