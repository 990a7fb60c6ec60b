"""A test target whose "machine" is a local process, for the engine's logic (order, parallelism,
failures, hooks, resume) without a hypervisor. It exercises the image-upload path of the driver
interface: the engine restores the point into an image file, the process "boots" by reading that
image and printing ``LIFEBOAT-GUEST:`` lines to its console file, then stays alive.

Registered with ``LIFEBOAT_PLUGINS=targets:proc=tests.orchestrator.procdriver:ProcTarget``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lifeboat.plumbing.proc import process_matches
from lifeboat.targets.base import Disk, Guest, HasConsole, ResourceLog, TakesImage, TargetError

PLUGIN = "targets:proc=tests.orchestrator.procdriver:ProcTarget"

GUEST = r"""
import sys, time
token, image, console, delay, fail = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1"
with open(console, "a", buffering=1) as out:
    time.sleep(delay)
    if fail:
        out.write("LIFEBOAT-GUEST: panic\n")
        sys.exit(3)
    head = open(image, "rb").read(64).split(b"\0", 1)[0].decode()
    out.write("LIFEBOAT-GUEST: booted\n")
    out.write(f"LIFEBOAT-GUEST: disk {head}\n")
    while True:
        out.write("LIFEBOAT-GUEST: alive\n")
        time.sleep(0.3)
"""


class ProcTarget(TakesImage, HasConsole):
    """A process standing in for a machine (see the module docstring)."""

    name = "proc"
    schema_file = Path(__file__).with_name("proc.schema.json")

    def image_formats(self) -> list[str]:
        """The engine writes the point as a raw file into ``Disk.image_path``."""
        return ["raw"]

    def supports_network(self, mode: str) -> bool:
        """Any: it has no network."""
        return True

    def prepare(self) -> None:
        """Nothing to check."""

    def provision(self, guest: Guest, disk: Disk, log: ResourceLog) -> None:
        """Record the console file and the process-to-be."""
        assert disk.image_path is not None
        log.record("file", str(guest.workdir / "console.log"), {})
        log.record("process", guest.token, {"token": guest.token, "image": str(disk.image_path)})

    def boot(self, guest: Guest, log: ResourceLog) -> None:
        """Start the process; adopt it if it runs."""
        res = next(r for r in log.resources() if r.kind == "process")
        if res.data.get("pid") and process_matches(int(res.data["pid"]), guest.token):
            self.context.log(f"{guest.name}: adopted pid {res.data['pid']}")
            return
        cmd = [
            sys.executable,
            "-c",
            GUEST,
            guest.token,
            res.data["image"],
            str(guest.workdir / "console.log"),
            str(self.settings["delay"]),
            "1" if self.settings["fail"] else "0",
        ]
        proc = subprocess.Popen(
            cmd, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )  # a kept machine must not hold the CLI's pipes
        log.update(res, {"pid": proc.pid})

    def is_running(self, guest: Guest, log: ResourceLog) -> bool:
        """The process is alive."""
        res = next(r for r in log.resources() if r.kind == "process")
        return bool(res.data.get("pid")) and process_matches(int(res.data["pid"]), guest.token)

    def poll(self, guest: Guest, log: ResourceLog) -> None:
        """Lost when the process exited."""
        if not self.is_running(guest, log):
            raise TargetError(f"{guest.name}: the process exited")

    def console_path(self, guest: Guest, log: ResourceLog) -> Path | None:
        """The console file."""
        return guest.workdir / "console.log"
