"""The ``qemu`` target: qemu-system run directly and driven over QMP (``qemu.qmp``); no daemon.

The embedded default. Its serial console goes to a file (console health checks), an isolated
network is QEMU's user-mode network with ``restrict=on`` (no way out; health-check ports forwarded
from loopback). Two boot modes (the ``boot`` setting; ``QemuDriver.variant`` picks the class):

- ``nbd`` (``QemuTarget``): the machine boots from the NBD export (``-blockdev`` nbd), and once
  the export has hydrated the local disk a ``blockdev-mirror`` + ``block-job-complete`` moves the
  running machine onto it, so the NBD server can stop.
- ``image`` (``QemuImageTarget``): the machine boots from a qcow2 file the engine wrote with the
  qcow2 exporter (``Disk.image_path``): recovery without a running server. The file is the run's
  own copy, so the guest writes into it; it is already local, so there is nothing to move.

KVM when it works, TCG otherwise: ``accel: auto`` starts under KVM if ``/dev/kvm`` opens, and if
QEMU reports a KVM internal error while the machine boots (nested virtualisation often fails inside
the boot loader) the machine is restarted under TCG and the host is remembered as "no KVM".
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lifeboat.plumbing.nbd import NbdUrl
from lifeboat.plumbing.proc import log_tail, process_matches, stop_process
from lifeboat.plumbing.qmp import QmpClient, QmpError
from lifeboat.targets.base import (
    Disk,
    ExecInGuest,
    ExecResult,
    Guest,
    HasConsole,
    Localizes,
    Resource,
    ResourceLog,
    TakesImage,
    Target,
    TargetContext,
    TargetError,
    TargetUnavailable,
    destroy_generic,
)

DISK_NODE = "disk0"
LOCAL_NODE = "local0"
MIRROR_JOB = "lifeboat-move"


def kvm_usable() -> bool:
    """Whether ``/dev/kvm`` opens for reading and writing (necessary, not sufficient)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def socket_dir(guest: Guest) -> Path:
    """A short folder for the machine's Unix sockets (their paths must stay under 108 bytes,
    which a deep work folder would exceed): /run/lifeboat/TOKEN as root, else under
    $XDG_RUNTIME_DIR or /tmp."""
    if os.geteuid() == 0:
        base = Path("/run/lifeboat")
    else:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/lifeboat-{os.geteuid()}") / "lifeboat"
    return base / guest.token


def kvm_memo() -> Path:
    """The host-wide note that KVM failed here (per kernel release, so a new kernel tries again)."""
    return Path("/var/tmp/lifeboat") / f"kvm-unusable-{platform.release()}"


def note_kvm_unusable() -> None:
    """Write the ``kvm_memo`` note: a guest hit a KVM internal error here."""
    memo = kvm_memo()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text("KVM internal error while booting a guest; lifeboat uses TCG on this host\n")


def free_port() -> int:
    """A TCP port free on loopback now (for QEMU's hostfwd, which cannot pick one itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def qmp_session(path: Path, timeout: float = 10.0, alive: Callable[[], bool] | None = None) -> Iterator[QmpClient]:
    """A short QMP session over the machine's Unix socket (one client at a time, so each use opens
    and closes its own: a resumed orchestrator simply connects again). Connecting is retried for
    ``timeout`` seconds while ``alive()``; QMP errors become ``TargetError``."""
    try:
        with QmpClient(str(path), timeout=timeout, wait=timeout, alive=alive) as qmp:
            yield qmp
    except QmpError as e:
        raise TargetError(str(e)) from None


class QemuDriver(HasConsole, ExecInGuest):
    """qemu-system over QMP, whatever the boot mode: the process, its command line, the console,
    the network, the guest agent, teardown. A boot mode adds where the boot disk comes from
    (``_disk_record``, ``_boot_disk``) and its own capability."""

    name = "qemu"

    def __init__(self, settings: dict[str, Any], context: TargetContext) -> None:
        super().__init__(settings, context)
        served_by = self.variant(self.settings)
        if not isinstance(self, served_by):
            raise TargetError(f"qemu settings: boot: {self.settings['boot']!r} is served by {served_by.__name__}")

    @classmethod
    def variant(cls, settings: dict[str, Any]) -> type[Target]:
        """``boot: image`` takes a qcow2 file (``QemuImageTarget``), else NBD (``QemuTarget``)."""
        return QemuImageTarget if settings.get("boot") == "image" else QemuTarget

    @abstractmethod
    def _disk_record(self, guest: Guest, disk: Disk) -> dict[str, Any]:
        """What the process resource records about the boot disk (read back by ``_boot_disk``)."""

    @abstractmethod
    def _boot_disk(self, data: dict[str, Any]) -> dict[str, Any]:
        """The ``-blockdev`` of the boot disk (node ``DISK_NODE``) from the recorded data."""

    def supports_network(self, mode: str) -> bool:
        """isolated (user-mode, restrict=on), none, mapped (onto host bridges)."""
        return mode in ("isolated", "none", "mapped")

    # -- lifecycle ------------------------------------------------------------------------
    def prepare(self) -> None:
        """The QEMU binary runs and the qemu.qmp library is installed."""
        try:
            import qemu.qmp  # noqa: F401
        except ImportError:
            raise TargetUnavailable("the qemu target needs the Python package qemu.qmp") from None
        try:
            subprocess.run([self.settings["binary"], "--version"], capture_output=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            raise TargetUnavailable(f"{self.settings['binary']} does not run: {e}") from None

    def _files(self, guest: Guest) -> dict[str, Path]:
        files = {name: guest.workdir / name for name in ("console.log", "qemu.log", "qemu.pid")}
        files.update({name: socket_dir(guest) / name for name in ("qmp.sock", "qga.sock")})
        return files

    def provision(self, guest: Guest, disk: Disk, log: ResourceLog) -> None:
        """Record the machine's files and its QEMU command line (started by ``boot``)."""
        boot_disk = self._disk_record(guest, disk)
        for res in log.resources():
            if res.kind == "process" and res.ident == guest.token:
                return  # provisioned before a crash: keep its command line (ports, accelerator)
        log.record("dir", str(socket_dir(guest)), {})
        socket_dir(guest).mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in self._files(guest).values():
            log.record("file", str(path), {})
        forwards = (
            {str(p): free_port() for p in guest.network.forward_ports} if guest.network.mode == "isolated" else {}
        )
        log.record(
            "process",
            guest.token,
            {
                "token": guest.token,
                **boot_disk,
                "forwards": forwards,
                "accel": self._pick_accel(),
                "pidfile": str(self._files(guest)["qemu.pid"]),
            },
        )

    def _memo(self) -> Path:
        return kvm_memo()

    def _pick_accel(self) -> str:
        accel: str = self.settings["accel"]
        if accel == "auto":
            return "kvm" if kvm_usable() and not self._memo().exists() else "tcg"
        return accel

    def _process(self, guest: Guest, log: ResourceLog) -> Resource:
        for res in log.resources():
            if res.kind == "process" and res.ident == guest.token:
                return res
        raise TargetError(f"{guest.name}: not provisioned")

    def command(self, guest: Guest, data: dict[str, Any]) -> list[str]:
        """The QEMU command line for the machine (``data``: the process resource's data)."""
        s = self.settings
        f = self._files(guest)
        disk_dev = "virtio-blk-pci" if s["disk_bus"] == "virtio" else "ide-hd"
        cmd = [
            s["binary"],
            "-name", f"{guest.token},debug-threads=on",
            "-machine", s["machine"],
            "-accel", data["accel"],
            "-m", str(s["memory_mib"]),
            "-smp", str(s["cpus"]),
            "-display", "none",
            "-no-user-config",
            "-no-reboot",
            "-serial", f"file:{f['console.log']}",
            "-monitor", "none",
            "-qmp", f"unix:{f['qmp.sock']},server=on,wait=off",
            "-pidfile", str(f["qemu.pid"]),
            "-blockdev", json.dumps(self._boot_disk(data)),
            "-device", f"{disk_dev},drive={DISK_NODE},id=bootdisk,bootindex=1",
        ]  # fmt: skip
        mode = guest.network.mode
        if mode == "isolated":
            fwd = "".join(f",hostfwd=tcp:127.0.0.1:{hp}-:{gp}" for gp, hp in data.get("forwards", {}).items())
            cmd += ["-netdev", f"user,id=net0,restrict=on{fwd}", "-device", f"{s['nic_model']},netdev=net0"]
        elif mode == "mapped":
            for i, bridge in enumerate(sorted(set(guest.network.mappings.values()))):
                cmd += ["-netdev", f"bridge,id=net{i},br={bridge}", "-device", f"{s['nic_model']},netdev=net{i}"]
        else:
            cmd += ["-nic", "none"]
        if guest.needs_agent:
            cmd += [
                "-chardev", f"socket,path={f['qga.sock']},server=on,wait=off,id=qga0",
                "-device", "virtio-serial",
                "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]  # fmt: skip
        return cmd + list(s["extra_args"])

    def boot(self, guest: Guest, log: ResourceLog) -> None:
        """Start QEMU in its own session (it outlives a killed orchestrator and is adopted)."""
        res = self._process(guest, log)
        if self._alive(res):
            self.context.log(f"{guest.name}: QEMU (pid {res.data.get('pid')}) is already running: adopted")
            return
        self._start(guest, log, res)

    def _alive(self, res: Resource) -> bool:
        pid = res.data.get("pid") or _read_pid(res.data.get("pidfile"))
        return pid is not None and process_matches(int(pid), res.data["token"])

    def _start(self, guest: Guest, log: ResourceLog, res: Resource) -> None:
        f = self._files(guest)
        for stale in (f["qmp.sock"], f["qga.sock"], f["qemu.pid"]):
            stale.unlink(missing_ok=True)
        cmd = self.command(guest, res.data)
        with open(f["qemu.log"], "ab") as errlog:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog, start_new_session=True, cwd=guest.workdir
            )
        log.update(res, {"pid": proc.pid, "command": cmd})
        try:
            with qmp_session(
                f["qmp.sock"], timeout=float(self.settings["start_timeout"]), alive=lambda: proc.poll() is None
            ) as qmp:
                qmp.cmd("query-status")
        except TargetError:
            detail = log_tail(f["qemu.log"])
            stop_process(proc.pid, guest.token)
            raise TargetError(f"{guest.name}: QEMU did not start: {detail}") from None
        self.context.log(f"{guest.name}: QEMU started (pid {proc.pid}, {res.data['accel']})")

    def is_running(self, guest: Guest, log: ResourceLog) -> bool:
        """The QEMU process is alive and the guest is not stopped by an error."""
        res = self._process(guest, log)
        if not self._alive(res):
            return False
        return self._status(guest) in ("running", "prelaunch", "inmigrate", "finish-migrate", "paused")

    def _status(self, guest: Guest) -> str:
        with qmp_session(self._files(guest)["qmp.sock"]) as qmp:
            status: str = qmp.cmd("query-status")["status"]
            return status

    def poll(self, guest: Guest, log: ResourceLog) -> None:
        """Fail if QEMU is gone; after a KVM internal error under ``accel: auto``, go to TCG."""
        res = self._process(guest, log)
        if not self._alive(res):
            raise TargetError(f"{guest.name}: QEMU exited: {log_tail(self._files(guest)['qemu.log'])}")
        status = self._status(guest)
        if status == "internal-error" and res.data["accel"] == "kvm" and self.settings["accel"] == "auto":
            self.context.log(f"{guest.name}: KVM internal error (nested virtualisation?): restarting under TCG")
            note_kvm_unusable()
            stop_process(int(res.data["pid"]), guest.token)
            log.update(res, {"accel": "tcg", "pid": None})
            self._start(guest, log, res)
        elif status in ("internal-error", "guest-panicked", "shutdown", "io-error"):
            raise TargetError(f"{guest.name}: the machine stopped ({status})")

    def console_path(self, guest: Guest, log: ResourceLog) -> Path | None:
        """The serial console file."""
        return self._files(guest)["console.log"]

    def guest_endpoint(self, guest: Guest, log: ResourceLog, port: int) -> tuple[str, int] | None:
        """The loopback port forwarded to the guest's ``port`` (isolated network only)."""
        forwards = self._process(guest, log).data.get("forwards", {})
        return ("127.0.0.1", int(forwards[str(port)])) if str(port) in forwards else None

    def exec_in_guest(self, guest: Guest, log: ResourceLog, argv: list[str], timeout: float) -> ExecResult:
        """Run a command through the guest agent channel."""
        from lifeboat.targets.guestagent import GuestAgent

        with GuestAgent(str(self._files(guest)["qga.sock"]), timeout=min(timeout, 10.0)) as agent:
            return agent.exec(argv, timeout)

    def destroy(self, resource: Resource) -> None:
        """Stop QEMU (by pid, else by its pidfile); files and dirs as usual."""
        if resource.kind == "process" and not resource.data.get("pid"):
            pid = _read_pid(resource.data.get("pidfile"))
            if pid:
                resource = Resource(resource.kind, resource.ident, {**resource.data, "pid": pid}, resource.owner)
        destroy_generic(resource)


class QemuTarget(QemuDriver, Localizes):
    """``boot: nbd``: boots from the NBD export and moves onto the hydrated local disk while it runs."""

    def local_disk_path(self, guest: Guest) -> Path | None:
        """QEMU runs as this user: the engine's choice (the guest's workdir) will do."""
        return None

    def _disk_record(self, guest: Guest, disk: Disk) -> dict[str, Any]:
        if not disk.nbd_url:
            raise TargetError(f"{guest.name}: the qemu target (boot: nbd) boots from an NBD export, none was given")
        return {"nbd_url": disk.nbd_url}

    def _boot_disk(self, data: dict[str, Any]) -> dict[str, Any]:
        url = NbdUrl.parse(data["nbd_url"])
        return {
            "driver": "raw",
            "node-name": DISK_NODE,
            "file": {
                "driver": "nbd",
                "server": {"type": "inet", "host": url.host, "port": str(url.port)},
                "export": url.export,
            },
        }

    def move_to_local(self, guest: Guest, disk: Disk, log: ResourceLog) -> None:
        """Mirror the NBD-backed disk onto ``disk.local_path`` and pivot, then drop the NBD node.

        ``sync: full`` re-reads the (by now hydrated, so local) export: correct whatever the
        server did with the guest's writes; ``write-blocking`` makes guest writes land on both
        sides until the pivot, so the copy converges."""
        if disk.local_path is None:
            raise TargetError(f"{guest.name}: no local disk to move onto")
        res = self._process(guest, log)
        with qmp_session(self._files(guest)["qmp.sock"], timeout=30) as qmp:
            if self._on_node(qmp) == LOCAL_NODE:
                return  # moved before a crash
            nodes = {n["node-name"] for n in qmp.cmd("query-named-block-nodes")}
            if LOCAL_NODE not in nodes:
                qmp.cmd(
                    "blockdev-add",
                    **{
                        "driver": "raw",
                        "node-name": LOCAL_NODE,
                        "file": {"driver": "file", "filename": str(disk.local_path)},
                    },
                )
            jobs = {j["device"]: j for j in qmp.cmd("query-block-jobs")}
            if MIRROR_JOB not in jobs:
                qmp.cmd(
                    "blockdev-mirror",
                    **{
                        "job-id": MIRROR_JOB,
                        "device": DISK_NODE,
                        "target": LOCAL_NODE,
                        "sync": "full",
                        "copy-mode": "write-blocking",
                    },
                )
            deadline = time.monotonic() + 3600
            while True:
                jobs = {j["device"]: j for j in qmp.cmd("query-block-jobs")}
                job = jobs.get(MIRROR_JOB)
                if job is None:
                    raise TargetError(f"{guest.name}: the mirror job vanished before it was ready")
                if job.get("ready"):
                    break
                if time.monotonic() > deadline:
                    raise TargetError(f"{guest.name}: mirroring onto the local disk did not converge")
                time.sleep(0.2)
            qmp.cmd("block-job-complete", device=MIRROR_JOB)
            while any(j["device"] == MIRROR_JOB for j in qmp.cmd("query-block-jobs")):
                time.sleep(0.1)
            if self._on_node(qmp) != LOCAL_NODE:
                raise TargetError(f"{guest.name}: the disk did not pivot onto {disk.local_path}")
            qmp.cmd("blockdev-del", **{"node-name": DISK_NODE})  # closes the NBD connection
        log.update(res, {"local_disk": str(disk.local_path)})
        self.context.log(f"{guest.name}: now running on the local disk {disk.local_path}")

    def _on_node(self, qmp: QmpClient) -> str | None:
        for dev in qmp.cmd("query-block"):
            qdev = dev.get("qdev", "")
            if qdev.endswith("/bootdisk") or "/bootdisk/" in qdev:
                node: str | None = (dev.get("inserted") or {}).get("node-name")
                return node
        return None


class QemuImageTarget(QemuDriver, TakesImage):
    """``boot: image``: boots from a qcow2 file the engine exported (no running server); the
    guest writes into that file, the run's own copy."""

    def image_formats(self) -> list[str]:
        """qcow2: sparse, and QEMU writes it in place (its name is the same for qemu-img)."""
        return ["qcow2"]

    def _disk_record(self, guest: Guest, disk: Disk) -> dict[str, Any]:
        if disk.image_path is None or disk.image_format not in self.image_formats():
            raise TargetError(
                f"{guest.name}: the qemu target (boot: image) boots from a "
                f"{' or '.join(self.image_formats())} image, none was given"
            )
        return {"image": str(disk.image_path), "image_format": disk.image_format}

    def _boot_disk(self, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "driver": data["image_format"],
            "node-name": DISK_NODE,
            "file": {"driver": "file", "filename": data["image"]},
        }


def _read_pid(path: str | None) -> int | None:
    if not path:
        return None
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
