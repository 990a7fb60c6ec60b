"""The target driver interface: what every place a machine can come back to must provide.

A driver is a small object with explicit capability methods (like an nbdkit plugin's ``can_*``)
and a fixed lifecycle, driven by the runbook engine (``orchestrator/engine.py``), one machine at a
time, possibly several machines in parallel on one driver instance:

    Driver(settings, context)     settings validated against targets/schemas/NAME.json, defaults filled
    prepare()                     check the host/API is usable; creates nothing
    provision(guest, disk, log)   create what the machine needs (workdir, networks, a VM definition)
    boot(guest, log)              start it; idempotent: a machine already running is adopted
    poll(guest, log)              called while waiting for health; may repair (KVM -> TCG fallback)
    health: console_path(), guest_endpoint(), exec_in_guest()   used by orchestrator/health.py
    move_to_local(guest, disk, log)   optional: leave the NBD export for the hydrated local disk
    teardown(log)                 destroy exactly what ``log`` holds, newest first; idempotent

Every resource a driver creates is written to a ``ResourceLog`` *before* it is created (so a
crash between the two leaves a record, and teardown copes with "not found"), and removed from
the log once destroyed. The engine keeps the log in its database, so a driver instance made after
a ``kill -9`` can tear down what another process created: ``destroy()`` works from the recorded
data alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Protocol

import jsonschema

SCHEMA_DIR = Path(__file__).parent / "schemas"


class TargetError(Exception):
    """A driver operation failed (exit status 1 at the CLI)."""


class TargetUnavailable(TargetError):
    """The driver cannot work on this host (missing binary, daemon down, no permission)."""


@dataclass
class Resource:
    """One thing a driver (or the engine) created: enough data to destroy it from another process."""

    kind: str  # "process", "file", "dir", "domain", "network", ...
    ident: str  # unique within (run, machine, kind)
    data: dict[str, Any] = field(default_factory=dict)
    owner: str = "engine"  # the driver's name, or "engine"
    id: int | None = None  # row id in the engine's database


class ResourceLog(Protocol):
    """The engine's persistent record of what one machine's run created (see module docstring)."""

    def record(self, kind: str, ident: str, data: dict[str, Any]) -> Resource:
        """Note a resource about to be created (call *before* creating it); idempotent."""
        ...

    def update(self, resource: Resource, data: dict[str, Any]) -> None:
        """Merge ``data`` into the resource's recorded data (e.g. a pid once known)."""
        ...

    def forget(self, resource: Resource) -> None:
        """The resource is gone: drop it from the log."""
        ...

    def resources(self) -> list[Resource]:
        """This owner's live resources, oldest first."""
        ...


class MemoryLog:
    """A ResourceLog in memory: for tools and tests that run a driver without the engine."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._items: list[Resource] = []
        self._next = 1

    def record(self, kind: str, ident: str, data: dict[str, Any]) -> Resource:
        """See ``ResourceLog.record``."""
        for r in self._items:
            if r.kind == kind and r.ident == ident:
                r.data.update(data)
                return r
        r = Resource(kind, ident, dict(data), self.owner, self._next)
        self._next += 1
        self._items.append(r)
        return r

    def update(self, resource: Resource, data: dict[str, Any]) -> None:
        """See ``ResourceLog.update``."""
        resource.data.update(data)

    def forget(self, resource: Resource) -> None:
        """See ``ResourceLog.forget``."""
        self._items = [r for r in self._items if r is not resource]

    def resources(self) -> list[Resource]:
        """See ``ResourceLog.resources``."""
        return list(self._items)


@dataclass
class NetworkSpec:
    """The runbook's network for one machine, as a driver needs it."""

    mode: str = "isolated"  # isolated | none | mapped
    mappings: dict[str, str] = field(default_factory=dict)
    forward_ports: list[int] = field(default_factory=list)  # guest TCP ports health checks will reach


@dataclass
class Guest:
    """One machine as the engine asks a driver to bring it up."""

    name: str  # the runbook's machine name
    run_id: str
    workdir: Path  # private to this machine and run, created by the engine
    network: NetworkSpec = field(default_factory=NetworkSpec)
    needs_agent: bool = False  # a health check runs a command in the guest

    @property
    def token(self) -> str:
        """A name unique to this run and machine, used in process command lines and domain names,
        so that teardown can tell what is ours."""
        return f"lifeboat-{self.run_id.rsplit('-', 1)[-1][:12]}-{self.name}"


@dataclass
class Disk:
    """The machine's disk as the engine provides it: an NBD export and/or an image file."""

    size: int
    nbd_url: str | None = None  # set for drivers that boot_from_nbd()
    image_path: Path | None = None  # set for drivers that needs_image_upload(), or the local disk
    local_path: Path | None = None  # where the export hydrates to (move_to_local's destination)


@dataclass
class TargetContext:
    """Things of the engine that a driver may use."""

    state_dir: Path  # for host-level memos (e.g. "KVM does not work here")
    log: Callable[[str], None] = lambda message: None


@dataclass
class ExecResult:
    """The outcome of a command run in the guest."""

    exit_code: int
    output: str


@cache
def load_schema(path: Path) -> dict[str, Any]:
    """A driver's settings schema (``targets/schemas/DRIVER.json``), read once."""
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def with_defaults(schema: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the schema's top-level ``default`` values filled in."""
    out = {k: v["default"] for k, v in schema.get("properties", {}).items() if "default" in v}
    out.update(settings)
    return out


class Target(ABC):
    """A target driver. Subclasses set ``name`` and ``kind`` and implement the abstract methods;
    the call order is in the module docstring."""

    name: ClassVar[str]
    kind: ClassVar[str] = "virtual"  # "virtual" or "physical": with the source kind, P2V/V2V/V2P/P2P
    schema_file: ClassVar[Path | None] = None  # default: targets/schemas/NAME.json

    @classmethod
    def schema(cls) -> dict[str, Any]:
        """The JSON Schema that this driver's settings must satisfy."""
        return load_schema(cls.schema_file or SCHEMA_DIR / f"{cls.name}.json")

    def __init__(self, settings: dict[str, Any], context: TargetContext) -> None:
        schema = self.schema()
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(settings), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            where = ".".join(str(p) for p in e.absolute_path) or "settings"
            raise TargetError(f"{self.name} settings: {where}: {e.message}")
        self.settings = with_defaults(schema, settings)
        self.context = context

    # -- capabilities: the engine decides what to prepare from these -------------------
    def boots_from_nbd(self) -> bool:
        """The machine boots straight from an NBD export (``Disk.nbd_url``): instant recovery."""
        return False

    def needs_image_upload(self) -> bool:
        """The machine needs a whole image file (``Disk.image_path``) before it can boot."""
        return False

    def can_replicate_ahead(self) -> bool:
        """The driver can keep a replica of the disk at the target before any recovery."""
        return False

    def can_move_to_local(self) -> bool:
        """A machine booted from NBD can move onto the hydrated local disk while running."""
        return False

    def has_console(self) -> bool:
        """``console_path()`` gives the machine's serial console as a file."""
        return False

    def can_exec_in_guest(self) -> bool:
        """``exec_in_guest()`` works (given a guest agent in the machine)."""
        return False

    def supports_network(self, mode: str) -> bool:
        """Whether the driver can attach a machine to a network of this mode."""
        return mode == "none"

    def local_disk_path(self, guest: Guest) -> Path | None:
        """Where the driver wants the hydrated local disk (e.g. where its hypervisor may read);
        None lets the engine choose (in the guest's workdir)."""
        return None

    # -- lifecycle ------------------------------------------------------------------------
    @abstractmethod
    def prepare(self) -> None:
        """Check that the driver can work here; raise ``TargetUnavailable`` if not. Creates nothing."""

    @abstractmethod
    def provision(self, guest: Guest, disk: Disk, log: ResourceLog) -> None:
        """Create what the machine needs, recording each resource in ``log`` before creating it.
        Idempotent: resources already in ``log`` are reused."""

    @abstractmethod
    def boot(self, guest: Guest, log: ResourceLog) -> None:
        """Start the machine. Idempotent: a machine already running (after a crash of the
        orchestrator) is adopted, not started twice."""

    @abstractmethod
    def is_running(self, guest: Guest, log: ResourceLog) -> bool:
        """Whether the machine is up (not necessarily healthy)."""

    def poll(self, guest: Guest, log: ResourceLog) -> None:
        """Called about once a second while health checks wait: raise ``TargetError`` if the
        machine is lost for good; a driver may repair here (restart under another accelerator)."""
        if not self.is_running(guest, log):
            raise TargetError(f"{guest.name}: the machine is not running")

    def console_path(self, guest: Guest, log: ResourceLog) -> Path | None:
        """The file the machine's serial console is written to (``has_console()``)."""
        return None

    def guest_endpoint(self, guest: Guest, log: ResourceLog, port: int) -> tuple[str, int] | None:
        """Where the orchestrator host reaches the guest's TCP ``port``; None if it cannot."""
        return None

    def exec_in_guest(self, guest: Guest, log: ResourceLog, argv: list[str], timeout: float) -> ExecResult:
        """Run a command in the guest (``can_exec_in_guest()``)."""
        raise TargetError(f"the {self.name} driver cannot run commands in the guest")

    def move_to_local(self, guest: Guest, disk: Disk, log: ResourceLog) -> None:
        """Move the running machine from ``disk.nbd_url`` onto ``disk.local_path`` (complete)."""
        raise TargetError(f"the {self.name} driver cannot move a machine onto a local disk")

    def teardown(self, log: ResourceLog) -> None:
        """Destroy every resource in ``log`` (newest first) and forget it. Idempotent."""
        for resource in reversed(log.resources()):
            self.destroy(resource)
            log.forget(resource)

    def destroy(self, resource: Resource) -> None:
        """Destroy one recorded resource; "already gone" is success. Subclasses handle their own
        kinds and defer to this for processes, files and directories."""
        destroy_generic(resource)


# --------------------------------------------------------------------------- processes and files


def process_matches(pid: int, token: str) -> bool:
    """Whether ``pid`` is alive and its command line holds ``token`` (so a reused pid is not ours)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie is dead
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return token.encode() in cmdline


def stop_process(pid: int, token: str, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; only if the process is still ours."""
    if not process_matches(pid, token):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)  # reap if it is our child
                if done == pid:
                    return
            except ChildProcessError:
                pass
            if not process_matches(pid, token):
                return
            time.sleep(0.05)
    raise TargetError(f"process {pid} ({token}) did not stop")


def nbd_address(url: str) -> tuple[str, str, str]:
    """(host, port, export) of ``nbd://HOST:PORT/EXPORT``; an IPv6 host loses its brackets."""
    host_port, _, export = url[len("nbd://") :].partition("/")
    host, _, port = host_port.rpartition(":")
    return host.strip("[]"), port, export


def log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` lines of a log file on one line, for an error message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def destroy_generic(resource: Resource) -> None:
    """Destroy a ``process`` (data: pid, token), ``file`` or ``dir`` (ident: the path)."""
    if resource.kind == "process":
        pid = resource.data.get("pid")
        if pid:
            stop_process(int(pid), str(resource.data["token"]))
    elif resource.kind == "file":
        Path(resource.ident).unlink(missing_ok=True)
    elif resource.kind == "dir":
        shutil.rmtree(resource.ident, ignore_errors=True)
    else:
        raise TargetError(f"no way to destroy a resource of kind {resource.kind!r} ({resource.ident})")
