"""Benchmark of a bare-metal restore with the pxe target: power-on to the restored guest's boot line.

The stand-in server of the tests (``tests/targets/pxeserver.py``: a blank libvirt domain under TCG,
its Redfish BMC a real sushy-emulator) restores the sample guest's point (256 MiB) from an archive:
``lifeboat export`` writes the raw image the driver serves, then the driver powers the server on
to netboot; the phases are read from the driver's events and the server's console: the iPXE script
fetched, the recovery environment's kernel up, the disk written, the restored guest's boot line.

Its peer, in the same run on the same server: the server powered on with the restored disk already
in place (a plain boot from disk), the floor that instant mode (not built: it would boot the system
while the disk fills) could approach. The ratio printed is full restore / plain boot.

Run: ``.venv/bin/python bench/pxe_bench.py`` (libvirtd running; about 3 minutes). Prints a table;
``--readme`` also writes it into this folder's README.md (its own section).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.sample_guest import build, copy_image  # noqa: E402
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


def full_restore(server: PxeServer, archive: Path, work: Path) -> dict[str, float]:
    """Export, then power-on to boot line through the driver; the phases in seconds."""
    t = time.time()
    image = work / "point.raw"
    lifeboat("export", "sample-guest@latest", str(image), "--format", "raw", "--archive", str(archive))
    export_s = time.time() - t
    server.blank()
    settings = server.settings()
    driver = PxeTarget(settings, TargetContext(log=lambda m: print("  " + m, file=sys.stderr)))
    guest = Guest("bench", "20260101T000000-bench00", work / "guest", NetworkSpec("none"))
    guest.workdir.mkdir()
    log = MemoryLog("pxe")
    driver.prepare()
    driver.provision(guest, Disk(size=image.stat().st_size, image_path=image, image_format="raw"), log)
    t0 = time.time()
    driver.boot(guest, log)
    boot_line = wait_console(server, BOOT_LINE, 0, 1200, lambda: driver.poll(guest, log))
    events = read_events(guest.workdir / "pxe" / "events.jsonl")
    netboot = next(e["time"] for e in events if e["event"] == "netboot")
    done = next(e["time"] for e in events if e["event"] == "done")
    driver.teardown(log)
    return {
        "export_s": export_s,
        "power_on_to_ipxe_s": netboot - t0,
        "ipxe_to_written_s": done - netboot,
        "written_to_boot_line_s": boot_line - done,
        "power_on_to_boot_line_s": boot_line - t0,
    }


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pxe-bench-") as tmp:
        work = Path(tmp)
        archive = work / "archive"
        disk = copy_image(build(), work / "guest.img")
        lifeboat("archive", "init", "--archive", str(archive))
        lifeboat("backup", "sample-guest", str(disk), "--archive", str(archive))
        (work / "bmc").mkdir()
        with stand_in_server("qemu:///system", work / "bmc") as server:
            full = full_restore(server, archive, work)
            peer = plain_boot(server)
    ratio = full["power_on_to_boot_line_s"] / peer
    rows = [
        ("lifeboat export of the point (raw, 256 MiB)", full["export_s"]),
        ("power-on to iPXE script fetched", full["power_on_to_ipxe_s"]),
        ("iPXE script to disk written (kernel, initramfs, DHCP, 256 MiB)", full["ipxe_to_written_s"]),
        ("disk written to the restored guest's boot line (power cycle)", full["written_to_boot_line_s"]),
        ("**pxe full restore: power-on to boot line**", full["power_on_to_boot_line_s"]),
        ("**peer: plain boot of the restored disk: power-on to boot line**", peer),
    ]
    cpu = platform.processor() or platform.machine()
    table = "\n".join(
        [
            SECTION,
            "",
            f"One run, {time.strftime('%Y-%m-%d')}, {cpu}, TCG guests (no KVM), 2 cores shared with other work.",
            "",
            "| phase | seconds |",
            "| --- | ---: |",
            *[f"| {name} | {value:.1f} |" for name, value in rows],
            "",
            f"Full restore / plain boot: **{ratio:.1f}x**. Instant mode (boot while the disk fills) is not "
            "built; it would aim at the plain boot's figure plus the recovery environment's boot.",
            "",
        ]
    )
    print(table)
    print(json.dumps({**full, "plain_boot_s": peer, "ratio": ratio}))
    if args.readme:
        text = README.read_text() if README.exists() else ""
        if SECTION in text:
            head, rest = text.split(SECTION, 1)
            tail = rest.split("\n## ", 1)
            text = head + table + ("\n## " + tail[1] if len(tail) > 1 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + table
        README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
