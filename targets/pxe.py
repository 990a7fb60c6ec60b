"""The ``pxe`` target: a physical server restored through its BMC and a netbooted recovery environment
(V2P, P2P onto dissimilar hardware; ReaR and Ironic are the anchors).

The call order of ``targets/base.py``, for one server:

- ``provision``: builds (or finds cached) the recovery environment (``targets/pxeenv.py``) and starts
  ``targets/pxeserve.py``, which serves over HTTP the iPXE script, the kernel and initramfs, and the
  point's raw image (the engine writes it: the driver ``TakesImage`` in ``raw``); the site's DHCP
  points PXE at ``HTTP_URL/boot.ipxe`` (in the tests, a libvirt network's DHCP does).
- ``boot``: through the BMC (``targets/bmc.py``: Redfish or IPMI): next boot from the network, power off if on, power
  on. The server netboots; its recovery environment chooses the disk by the ``disk`` rule, writes the
  point and reports progress to the HTTP server, which keeps the events in a file.
- ``poll`` (while the engine waits for health): logs progress; once the restore is done, sets the
  next boot to the disk and power-cycles the server, which boots the restored system; a failure the
  environment reports (no disk matching the rule, a disk too small, a write error) or a server that
  never fetched the iPXE script within ``netboot_timeout`` is a ``TargetError`` naming the server,
  and the server is powered off unless ``on_failure: leave``. PXE loses a boot now and then (an
  offer missed, a ROM that gives up and falls through to an empty disk), so the timeout is split
  into ``netboot_attempts`` tries, the server power-cycled onto the network again after each.
  Once the server is powered off after a failure, or boots its restored disk, the HTTP server and
  dnsmasq are stopped at once: a recovery run (``teardown: never``) would leave them running.
- ``teardown``: powers the server off, stops the HTTP server and dnsmasq, removes their files.

With ``restore: instant`` (``targets/pxeinstant.py``), the environment starts the restored system
at once from the point over NBD (a dm-mirror of NBD and the local disk, filled in the background);
``poll`` logs ``booting`` and the fill's progress, and once the environment switched the system
over to its local disk, sets the next boot to the disk (no power cycle: the system runs on) and
stops serving. The health checks see the system as soon as it is up.

In instant mode the driver ``FillsLocalDisk``: the engine's localize step (``move_to_local``) polls
it until the disk is filled.

Onto a larger disk, the last MBR or GPT partition grows, and an ext2/3/4 file system in it with it
(``targets/pxegrow.py``: the orchestrator names the partition in the plan, the environment runs
``e2fsck`` and ``resize2fs``); other file systems stay their size (logged).

Not built yet (issue 13): partition growth in instant mode.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from lifeboat.plumbing.proc import log_tail, process_matches, start_service
from lifeboat.targets import pxedhcp, pxeenv, pxegrow, pxeinstant
from lifeboat.targets.base import (
    Disk,
    FillsLocalDisk,
    Guest,
    HasConsole,
    Physical,
    Resource,
    ResourceLog,
    TakesImage,
    Target,
    TargetContext,
    TargetError,
    TargetUnavailable,
)
from lifeboat.targets.bmc import Bmc, connect

IPXE_SCRIPT = """#!ipxe
echo lifeboat: booting the recovery environment for {server}
kernel {url}/vmlinuz initrd=initrd.gz console={console} panic=30 lifeboat.url={url}
initrd {url}/initrd.gz
boot
"""


class RestoreFailed(TargetError):
    """The recovery environment on the server reported a failure, or the server never netbooted."""


def disk_rule(setting: str | dict[str, str]) -> dict[str, str]:
    """The ``disk`` setting as the environment's three rule variables."""
    rule = {"path": setting} if isinstance(setting, str) else setting
    return {"RULE_PATH": rule.get("path", ""), "RULE_SERIAL": rule.get("serial", ""), "RULE_SIZE": rule.get("size", "")}


def shell_quote(value: str) -> str:
    """``value`` as one single-quoted shell word."""
    return "'" + value.replace("'", "'\\''") + "'"


def read_events(path: Path) -> list[dict[str, Any]]:
    """The serving process's events so far (a partly written last line is left for later)."""
    try:
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("\n")]


class PxeTarget(Physical, TakesImage):
    """A bare-metal server driven through its BMC (see the module docstring)."""

    name = "pxe"

    def __init__(self, settings: dict[str, Any], context: TargetContext) -> None:
        super().__init__(settings, context)
        self._bmcs: dict[str, Bmc] = {}  # by the label messages name the server with

    @classmethod
    def variant(cls, settings: dict[str, Any]) -> type[Target]:
        """With ``console_log`` (the server's console captured to a file), a driver ``HasConsole``;
        with ``restore: instant``, one that ``FillsLocalDisk``."""
        if settings.get("restore") == "instant":
            return PxeInstantConsoleTarget if settings.get("console_log") else PxeInstantTarget
        return PxeConsoleTarget if settings.get("console_log") else PxeTarget

    def supports_network(self, mode: str) -> bool:
        """The server sits on its own network: ``mapped`` (the runbook names it) or ``none``."""
        return mode in ("none", "mapped")

    def image_formats(self) -> list[str]:
        """The recovery environment writes a raw image, block for block."""
        return ["raw"]

    def http_url(self) -> str:
        """lifeboat's HTTP server as the server reaches it."""
        url = self.settings.get("http_url")
        if url:
            return str(url).rstrip("/")
        host, port = str(self.settings["http_listen"]).rsplit(":", 1)
        if host in ("0.0.0.0", "::", ""):
            raise TargetError("pxe settings: http_url is needed when http_listen listens on every address")
        return f"http://{host}:{port}"

    def label(self, guest: Guest | None = None) -> str:
        """How messages name the server: the machine, its BMC and MAC."""
        where = f"server at BMC {self.settings['bmc']['address']}"
        if self.settings.get("mac"):
            where += f", MAC {self.settings['mac']}"
        return f"{guest.name} ({where})" if guest else where

    def bmc(self, guest: Guest | None = None) -> Bmc:
        """The server's BMC client, connected once per driver instance (one server per instance:
        its settings name one BMC)."""
        label = self.label(guest)
        if label not in self._bmcs:
            self._bmcs[label] = connect(label, self.settings["bmc"])
        return self._bmcs[label]

    # -- lifecycle ------------------------------------------------------------------------------
    def prepare(self) -> None:
        """The sushy client, the kernel, busybox, dnsmasq for proxy DHCP, and a BMC that answers and
        accepts the credentials."""
        library = "pyghmi" if self.settings["bmc"].get("protocol") == "ipmi" else "sushy"
        try:
            importlib.import_module(library)
        except ImportError:
            raise TargetUnavailable(f"the pxe target needs the {library} library (pip install {library})") from None
        pxeenv.kernel_version()
        if not pxeenv.BUSYBOX.exists():
            raise TargetUnavailable(f"{pxeenv.BUSYBOX} is missing: install busybox-static")
        dhcp = self._dhcp()
        if dhcp:
            if not Path(pxedhcp.DNSMASQ).exists():
                raise TargetUnavailable(f"{pxedhcp.DNSMASQ} is missing: install dnsmasq-base (proxy DHCP)")
            first = dhcp.get("first_stage")
            if first and not Path(first).is_file():
                raise TargetError(f"pxe settings: dhcp.first_stage {first} is not a file (Debian ipxe's undionly.kpxe)")
        self.http_url()
        self.bmc().power_state()

    def _files(self, guest: Guest) -> dict[str, Path]:
        d = guest.workdir / "pxe"
        return {"dir": d, "config": d / "serve.json", "events": d / "events.jsonl", "log": d / "serve.log"}

    def provision(self, guest: Guest, disk: Disk, log: ResourceLog) -> None:
        """The recovery environment, the serving process's files, and the serving process."""
        if disk.image_path is None:
            raise TargetError(f"{guest.name}: the pxe target needs the point as a raw image")
        env = pxeenv.build()
        f = self._files(guest)
        log.record("dir", str(f["dir"]), {})
        f["dir"].mkdir(parents=True, exist_ok=True)
        url = self.http_url()
        plan = {"POINT_SIZE": str(disk.size), "SERVER": guest.name, **disk_rule(self.settings["disk"])}
        if self.settings["restore"] == "instant":
            parts, boot_part = pxeinstant.partitions(disk.image_path)
            plan.update(
                {"RESTORE": "instant", "PARTS": parts, "BOOT_PART": str(boot_part),
                 "REGION": str(pxeinstant.REGION_SECTORS)}
            )  # fmt: skip
            host = str(self.settings["http_listen"]).rsplit(":", 1)[0]
            port = pxeinstant.start_nbd(disk.image_path, f["dir"], host, guest.token, log, self.label(guest))
            plan["NBD_PORT"] = str(port)
        else:
            plan.update(pxegrow.plan(disk.image_path))
        config = {
            "listen": self.settings["http_listen"],
            "image": str(disk.image_path),
            "kernel": str(env.kernel),
            "initrd": str(env.initrd),
            "events": str(f["events"]),
            "ipxe": IPXE_SCRIPT.format(server=guest.name, url=url, console=self.settings["console"]),
            "instant": str(env.instant),
            "grow": str(env.grow),
            "plan": "".join(f"{k}={shell_quote(v)}\n" for k, v in plan.items()),
        }
        if self.settings["restore"] == "instant":
            config["ipxe"] = pxeenv.with_archive(config["ipxe"], url, "instant.gz")
        elif plan.get("GROW_FS") in pxegrow.EXT:
            config["ipxe"] = pxeenv.with_archive(config["ipxe"], url, "grow.gz")
        f["config"].write_text(json.dumps(config, indent=1))
        res = log.record("process", "pxeserve", {"token": guest.token, "pid": None})
        if not (res.data.get("pid") and process_matches(int(res.data["pid"]), guest.token)):
            self._start_http(guest, log, res)
        if self._dhcp():
            self._start_dhcp(guest, log, f"{url}/boot.ipxe")

    def _start_http(self, guest: Guest, log: ResourceLog, res: Resource) -> None:
        """The serving process (``targets/pxeserve.py``) for the files ``provision`` wrote."""
        f = self._files(guest)
        f["events"].unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "lifeboat.targets.pxeserve", str(f["config"]), guest.token]

        def listening() -> bool:
            return any(e["event"] == "listening" for e in read_events(f["events"]))

        if not start_service(cmd, f["log"], listening, lambda pid: log.update(res, {"pid": pid}), cwd=f["dir"]):
            raise TargetError(
                f"{guest.name}: the HTTP server for the recovery environment did not start on "
                f"{self.settings['http_listen']}: {log_tail(f['log'])}"
            )
        self.context.log(f"{guest.name}: serving the recovery environment at {self.http_url()}/boot.ipxe")

    def _dhcp(self) -> dict[str, Any] | None:
        """The ``dhcp`` settings when lifeboat answers PXE itself (proxy DHCP), else None."""
        dhcp = self.settings.get("dhcp") or {}
        return dhcp if dhcp.get("mode") == "proxy" else None

    def _start_dhcp(self, guest: Guest, log: ResourceLog, boot_url: str) -> None:
        """dnsmasq in proxy-DHCP mode (``targets/pxedhcp.py``), recorded before it starts."""
        dhcp = self._dhcp()
        assert dhcp is not None
        folder = self._files(guest)["dir"] / "dhcp"
        res = log.record("process", "dnsmasq", {"token": guest.token, "pid": None})
        if res.data.get("pid") and process_matches(int(res.data["pid"]), guest.token):
            return
        config = pxedhcp.write_files(dhcp, boot_url, folder, f"dnsmasq-{guest.token}.conf")
        dnslog = folder / "dnsmasq.log"
        dnslog.unlink(missing_ok=True)

        def started() -> bool:
            return dnslog.exists() and "started" in dnslog.read_text(errors="replace")

        if not start_service(pxedhcp.dnsmasq_command(config), folder / "dnsmasq.out", started,
                             lambda pid: log.update(res, {"pid": pid})):
            raise TargetError(
                f"{guest.name}: dnsmasq (proxy DHCP on {dhcp['interface']}, {dhcp['subnet']}) did not start: "
                f"{log_tail(folder / 'dnsmasq.out')} {log_tail(dnslog)}"
            )
        self.context.log(f"{guest.name}: answering PXE on {dhcp['interface']} ({dhcp['subnet']}, proxy DHCP)")

    def _power(self, log: ResourceLog) -> Resource | None:
        return next((r for r in log.resources() if r.kind == "power"), None)

    def boot(self, guest: Guest, log: ResourceLog) -> None:
        """Next boot from the network, then power on (off first if it was on). A server already
        powered on by this run is adopted."""
        res = self._power(log)
        if res is not None and res.data.get("since"):
            self.context.log(f"{guest.name}: the server was powered on by this run already: adopted")
            return
        bmc_settings = {k: v for k, v in self.settings["bmc"].items()}
        res = log.record("power", str(self.settings["bmc"]["address"]), {"bmc": bmc_settings, "server": guest.name})
        bmc = self.bmc(guest)
        bmc.set_next_boot("network")
        bmc.power_off()
        bmc.power_on()
        log.update(res, {"since": time.time(), "stage": "netboot"})
        self.context.log(f"{self.label(guest)}: powered on to boot from the network")

    def set_next_boot(self, guest: Guest, log: ResourceLog, device: str) -> None:
        """Through the BMC."""
        self.bmc(guest).set_next_boot(device)

    def is_running(self, guest: Guest, log: ResourceLog) -> bool:
        """The BMC says the server is powered on."""
        return self._power(log) is not None and self.bmc(guest).power_state() == "on"

    def poll(self, guest: Guest, log: ResourceLog) -> None:
        """Follow the restore (see the module docstring); boot the restored disk once it is written."""
        res = self._power(log)
        if res is None:
            raise TargetError(f"{guest.name}: the server was not powered on")
        events = read_events(self._files(guest)["events"])
        stage = res.data.get("stage")
        failed = next((e for e in events if e["event"] == "fail"), None)
        if failed is not None:
            self._fail(guest, log, res, f"the recovery environment failed: {failed.get('reason', '?')}")
        if stage == "netboot":
            if not any(e["event"] == "netboot" for e in events):
                attempts, attempt = int(self.settings["netboot_attempts"]), int(res.data.get("attempt", 1))
                per_attempt = float(self.settings["netboot_timeout"]) / attempts
                if time.time() - float(res.data["since"]) <= per_attempt:
                    return
                if attempt < attempts:
                    self.context.log(
                        f"{self.label(guest)}: no netboot within {per_attempt:.0f} s: power-cycling onto the "
                        f"network again (attempt {attempt + 1} of {attempts})"
                    )
                    bmc = self.bmc(guest)
                    bmc.set_next_boot("network")
                    bmc.power_off()
                    bmc.power_on()
                    log.update(res, {"since": time.time(), "attempt": attempt + 1})
                    return
                why = (
                    f"the server did not netboot within {self.settings['netboot_timeout']} s in {attempts} "
                    f"attempt(s) (it never fetched {self.http_url()}/boot.ipxe: check its DHCP/PXE settings)"
                )
                if self._dhcp():
                    why += pxedhcp.missed_offers(self._files(guest)["dir"] / "dhcp", self.settings.get("mac"))
                self._fail(guest, log, res, why)
            log.update(res, {"stage": "restore"})
            self.context.log(f"{guest.name}: netbooted the recovery environment")
        if any(e["event"] == "booting" for e in events) and not res.data.get("booting"):
            log.update(res, {"booting": time.time()})
            self.context.log(f"{guest.name}: instant mode: the restored system starts from NBD while its disk fills")
        grown = next((e for e in events if e["event"] == "grown"), None)
        if grown is not None and not res.data.get("grown"):
            log.update(res, {"grown": True})
            if grown.get("resized") == "yes":
                self.context.log(
                    f"{guest.name}: partition {grown.get('part')} grew to the disk's end and its "
                    f"{grown.get('fs')} file system with it ({grown.get('bytes')} bytes)"
                )
            else:
                self.context.log(
                    f"{guest.name}: partition {grown.get('part')} grew to the disk's end, its file system "
                    f"({grown.get('fs')}) was not grown: lifeboat grows ext2/3/4 only"
                )
        progress = [e for e in events if e["event"] == "progress"]
        if progress:
            done = int(progress[-1].get("done", 0))
            tenth = done * 10 // max(1, int(self._plan_size(guest)))
            if tenth > int(res.data.get("tenth", -1)):
                log.update(res, {"tenth": tenth})
                self.context.log(f"{guest.name}: restore {tenth * 10} % ({done} bytes)")
        if stage in ("netboot", "restore") and any(e["event"] == "done" for e in events):
            bmc = self.bmc(guest)
            bmc.set_next_boot("disk")
            if self.settings["restore"] == "instant":
                self.context.log(
                    f"{guest.name}: instant mode: the disk is filled and the system runs from it alone; "
                    "next boot from the disk"
                )
            else:
                bmc.power_off()
                bmc.power_on()
                self.context.log(f"{guest.name}: restore complete: booting the server from its disk")
            log.update(res, {"stage": "restored"})
            self._release(log)

    def filled(self, guest: Guest, log: ResourceLog) -> bool:
        """The restore is complete (instant mode: the local disk filled and the system switched
        over to it; full: written and the server booting from it)."""
        res = self._power(log)
        return res is not None and res.data.get("stage") == "restored"

    def _plan_size(self, guest: Guest) -> int:
        config = json.loads(self._files(guest)["config"].read_text())
        return Path(config["image"]).stat().st_size

    def _release(self, log: ResourceLog) -> None:
        """Stop the HTTP server and dnsmasq at once, not at teardown (which a recovery run may never
        do): nothing more is served to a server powered off or booting its own disk. Their files
        (the logs) stay until teardown."""
        for served in [r for r in log.resources() if r.kind == "process"]:
            self.destroy(served)
            log.forget(served)

    def _fail(self, guest: Guest, log: ResourceLog, res: Resource, why: str) -> None:
        if self.settings["on_failure"] == "power_off":
            self.bmc(guest).power_off()
            self._release(log)
            why += "; the server is powered off"
        log.update(res, {"stage": "failed"})
        raise RestoreFailed(f"{self.label(guest)}: {why}")

    def destroy(self, resource: Resource) -> None:
        """``power``: the server is powered off (through the recorded BMC settings); the rest is generic."""
        if resource.kind == "power":
            connect(str(resource.data.get("server", resource.ident)), resource.data["bmc"]).power_off()
        else:
            super().destroy(resource)


class PxeConsoleTarget(PxeTarget, HasConsole):
    """A server whose serial console is captured to a file on the lifeboat host (``console_log``)."""

    def console_path(self, guest: Guest, log: ResourceLog) -> Path | None:
        """The captured console file."""
        return Path(self.settings["console_log"])


class PxeInstantTarget(PxeTarget, FillsLocalDisk):
    """``restore: instant``: the engine's localize step waits for the disk to fill (``filled``)."""


class PxeInstantConsoleTarget(PxeConsoleTarget, FillsLocalDisk):
    """``restore: instant`` with the server's console captured to a file."""
