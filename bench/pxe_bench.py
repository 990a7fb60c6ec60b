"""Benchmark of a bare-metal restore with the pxe target: power-on to the restored guest's boot line.

The stand-in server of the tests (``tests/targets/pxeserver.py``: a blank libvirt domain under TCG,
its Redfish BMC a real sushy-emulator) restores the sample guest's point (256 MiB) from an archive:
``lifeboat export`` writes the raw image the driver serves, then the driver powers the server on
to netboot; the phases are read from the driver's events and the server's console: the iPXE script
fetched, the recovery environment's kernel up, the disk written, the restored guest's boot line.

In the same run on the same server: the same point restored in instant mode (``restore: instant``:
the restored guest starts from NBD while the disk fills; also timed to the end of the fill), and a
plain boot of the restored disk (the floor). The ratio printed is full restore / instant restore,
power-on to the restored guest's boot line.

Run: ``LIFEBOAT_PXE_TEST_SLOT=N .venv/bin/python bench/pxe_bench.py [--data-mib M]`` (libvirtd
running; about 4 minutes; ``--data-mib`` fills M MiB of the guest's partition 2 with random data
first: a denser point). Prints a table;
``--readme`` also writes it into this folder's README.md (its own section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.sample_guest import PARTITION2_OFFSET, build, copy_image, set_kernel_args  # noqa: E402
from lifeboat.targets.base import Disk, Guest, MemoryLog, NetworkSpec, TargetContext  # noqa: E402
from lifeboat.targets.pxe import PxeTarget, read_events  # noqa: E402
from tests.targets.pxeserver import PxeServer, stand_in_server  # noqa: E402

README = Path(__file__).with_name("README.md")
SECTION = "## Bare metal over PXE (`bench/pxe_bench.py`, issue 13)"
BOOT_LINE = "LIFEBOAT-GUEST: booted"


def lifeboat(*args: str) -> None:
    """The CLI, from this checkout."""
    subprocess.run([sys.executable, "-m", "lifeboat", *args], check=True, cwd=REPO, capture_output=True)


def wait_console(server: PxeServer, text: str, after: int, timeout: float, poll: object = None) -> float:
    """Seconds since the epoch when ``text`` appeared in the console past offset ``after``."""
    deadline = time.monotonic() + timeout
    while text not in server.console_text()[after:]:
        if callable(poll):
            poll()
        if time.monotonic() > deadline:
            raise SystemExit(f"no {text!r} on the console after {timeout} s:\n{server.console_text()[-2000:]}")
        time.sleep(0.2)
    return time.time()


def export(archive: Path, work: Path) -> tuple[Path, float]:
    """The point as the raw image the driver serves, and the seconds ``lifeboat export`` took."""
    t = time.time()
    image = work / "point.raw"
    lifeboat("export", "sample-guest@latest", str(image), "--format", "raw", "--archive", str(archive))
    return image, time.time() - t


def restore(server: PxeServer, image: Path, work: Path, mode: str) -> dict[str, float]:
    """Power-on to boot line through the driver with ``restore: MODE``; the phases in seconds.
    Instant mode: also to the end of the background fill (the system on its local disk alone)."""
    server.blank()
    settings = server.settings(restore=mode)
    said = TargetContext(log=lambda m: print(f"  [{mode}] {m}", file=sys.stderr))
    driver = PxeTarget.variant(settings)(settings, said)
    assert isinstance(driver, PxeTarget)
    guest = Guest("bench", "20260101T000000-bench00", work / mode, NetworkSpec("none"))
    guest.workdir.mkdir()
    log = MemoryLog("pxe")
    driver.prepare()
    driver.provision(guest, Disk(size=image.stat().st_size, image_path=image, image_format="raw"), log)
    t0 = time.time()
    driver.boot(guest, log)
    boot_line = wait_console(server, BOOT_LINE, 0, 1200, lambda: driver.poll(guest, log))
    deadline = time.monotonic() + 1200
    while not driver.filled(guest, log):
        if time.monotonic() > deadline:
            raise SystemExit(f"[{mode}] the restore did not complete:\n{server.console_text()[-2000:]}")
        driver.poll(guest, log)
        time.sleep(0.2)
    events = read_events(guest.workdir / "pxe" / "events.jsonl")
    netboot = next(e["time"] for e in events if e["event"] == "netboot")
    done = next(e["time"] for e in events if e["event"] == "done")
    driver.teardown(log)
    out = {"power_on_to_ipxe_s": netboot - t0, "power_on_to_boot_line_s": boot_line - t0}
    if mode == "instant":
        booting = next(e["time"] for e in events if e["event"] == "booting")
        out |= {"ipxe_to_system_started_s": booting - netboot, "power_on_to_filled_s": done - t0}
    else:
        out |= {"ipxe_to_written_s": done - netboot, "written_to_boot_line_s": boot_line - done}
    return out


def plain_boot(server: PxeServer) -> float:
    """The peer: the restored disk in place, power-on (from disk) to boot line, in seconds."""
    driver = PxeTarget(server.settings(), TargetContext())
    bmc = driver.bmc()
    bmc.power_off()
    bmc.set_next_boot("disk")
    offset = len(server.console_text())
    t0 = time.time()
    bmc.power_on()
    seen = wait_console(server, BOOT_LINE, offset, 600)
    bmc.power_off()
    return seen - t0


def note(data_mib: int) -> str:
    """What the figures mean, for the README."""
    what = (
        "The point is sparse (most of its 256 MiB are holes)."
        if not data_mib
        else f"The point holds {data_mib} MiB of random data in partition 2 besides the guest's files."
    )
    return (
        what + " Instant mode saves the write before the boot and the power cycle after it; here the "
        "write is short (a local file over a host bridge), so the gain is mostly the power cycle and "
        "second boot. Over a real link the write grows with the point's data, and so does the fill, "
        "but only full restore waits for it before the boot line."
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    ap.add_argument("--data-mib", type=int, default=0,
                    help="random data written into the guest's partition 2 before the backup (a denser point)")
    args = ap.parse_args()
    section = SECTION if not args.data_mib else (
        f"## Bare metal over PXE, a point with {args.data_mib} MiB of data (`bench/pxe_bench.py --data-mib "
        f"{args.data_mib}`, issue 13)"
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="pxe-bench-") as tmp:
        work = Path(tmp)
        archive = work / "archive"
        disk = copy_image(build(), work / "guest.img")
        set_kernel_args(disk, "lifeboat.stay=1")  # the guest keeps running (instant mode fills meanwhile)
        with open(disk, "r+b") as f:  # past the guest's record and its workload's first slots
            f.seek(PARTITION2_OFFSET + 1024 * 1024)
            for _ in range(args.data_mib):
                f.write(os.urandom(1024 * 1024))
        lifeboat("archive", "init", "--archive", str(archive))
        lifeboat("backup", "sample-guest", str(disk), "--archive", str(archive))
        (work / "bmc").mkdir()
        with stand_in_server("qemu:///system", work / "bmc") as server:
            image, export_s = export(archive, work)
            full = restore(server, image, work, "full")
            instant = restore(server, image, work, "instant")
            peer = plain_boot(server)
    ratio = full["power_on_to_boot_line_s"] / instant["power_on_to_boot_line_s"]
    rows = [
        ("lifeboat export of the point (raw, 256 MiB)", export_s),
        ("full: power-on to iPXE script fetched", full["power_on_to_ipxe_s"]),
        ("full: iPXE script to disk written (kernel, initramfs, DHCP, 256 MiB)", full["ipxe_to_written_s"]),
        ("full: disk written to the restored guest's boot line (power cycle)", full["written_to_boot_line_s"]),
        ("**full restore: power-on to boot line**", full["power_on_to_boot_line_s"]),
        ("instant: power-on to iPXE script fetched", instant["power_on_to_ipxe_s"]),
        ("instant: iPXE script to the restored system started (NBD, mirror, switch_root)",
         instant["ipxe_to_system_started_s"]),
        ("**instant restore: power-on to boot line**", instant["power_on_to_boot_line_s"]),
        ("instant: power-on to the disk filled and the system on it alone", instant["power_on_to_filled_s"]),
        ("plain boot of the restored disk: power-on to boot line", peer),
    ]
    cpu = platform.processor() or platform.machine()
    table = "\n".join(
        [
            section,
            "",
            f"One run, {time.strftime('%Y-%m-%d')}, {cpu}, TCG guests (no KVM), 2 cores shared with other work.",
            "",
            "| phase | seconds |",
            "| --- | ---: |",
            *[f"| {name} | {value:.1f} |" for name, value in rows],
            "",
            f"Full restore / instant restore, power-on to boot line: **{ratio:.2f}x** (full / plain boot: "
            f"{full['power_on_to_boot_line_s'] / peer:.2f}x). "
            + note(args.data_mib),
            "",
        ]
    )
    print(table)
    print(json.dumps({"export_s": export_s, "full": full, "instant": instant, "plain_boot_s": peer, "ratio": ratio}))
    if args.readme:
        text = README.read_text() if README.exists() else ""
        if section in text:
            head, rest = text.split(section, 1)
            tail = rest.split("\n## ", 1)
            text = head + table + ("\n## " + tail[1] if len(tail) > 1 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + table
        README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
