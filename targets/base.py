"""The target driver interface: what every place a machine can come back to must provide.

A driver is a small object with a fixed lifecycle and explicit capabilities: it derives from the
capability classes below (``BootsFromNbd``, ``Localizes``, ``TakesImage``, ``Uploads``, ``HasConsole``,
``ExecInGuest``, ``Physical``, ``StagesAhead``), whose methods are abstract, so what a driver
claims cannot drift from what it implements (as coriolis' ``providers/base.py`` does). It is
driven by the runbook engine (``orchestrator/engine.py``), one machine at a time, possibly several
machines in parallel on one driver instance:

    Driver(settings, context)     settings validated against targets/schemas/NAME.json, defaults filled
    prepare()                     check the host/API is usable; creates nothing
    provision(guest, disk, log)   create what the machine needs (workdir, networks, a VM definition)
    boot(guest, log)              start it; idempotent: a machine already running is adopted
    poll(guest, log)              called while waiting for health; may repair (KVM -> TCG fallback)
    health: guest_endpoint(), and console_path() / exec_in_guest() where the driver has them
    move_to_local(guest, disk, log)   ``Localizes``: leave the NBD export for the hydrated local disk
    teardown(log)                 destroy exactly what ``log`` holds, newest first; idempotent

Every resource a driver creates is written to a ``ResourceLog`` *before* it is created (so a
crash between the two leaves a record, and teardown copes with "not found"), and removed from
the log once destroyed. The engine keeps the log in its database, so a driver instance made after
a ``kill -9`` can tear down what another process created: ``destroy()`` works from the recorded
data alone.
"""

from __future__ import annotations

import json
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import jsonschema

from lifeboat.plumbing.errors import LifeboatError, UsageError
from lifeboat.plumbing.proc import stop_process

if TYPE_CHECKING:
    from lifeboat.archive import Archive

SCHEMA_DIR = Path(__file__).parent / "schemas"


class TargetError(LifeboatError):
    """A driver operation failed (exit status 1 at the CLI)."""


class TargetUnavailable(TargetError):
    """The driver cannot work on this host (missing binary, daemon down, no permission)."""


class EndpointPending(TargetError):
    """The guest's address is not known yet (``guest_endpoint``): not a failure, ask again."""


class InvalidSettings(TargetError, UsageError):
    """A driver's settings do not satisfy its schema (exit status 2: the runbook is at fault)."""

    exit_code = 2


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
    runbook: str = ""  # the runbook's name, for drivers that tag what they create (Sweeps)

    @property
    def token(self) -> str:
        """A name unique to this run and machine, used in process command lines and domain names,
        so that teardown can tell what is ours."""
        return f"lifeboat-{self.run_id.rsplit('-', 1)[-1][:12]}-{self.name}"


@dataclass
class Disk:
    """The machine's disk as the engine provides it: an NBD export and/or an image file."""

    size: int
    nbd_url: str | None = None  # for drivers that boot from NBD (BootsFromNbd)
    image_path: Path | None = None  # for drivers that take an image (TakesImage)
    image_format: str | None = None  # its format: the first of the driver's image_formats()
    local_path: Path | None = None  # where the export hydrates to (move_to_local's destination)
    # ``Uploads`` whose first format can be streamed: no file is written; this yields the image's
    # bytes (``image_format``), read from the archive as the driver sends them
    open_image: Callable[[], Iterator[bytes]] | None = None
    point: str | None = None  # MACHINE@POINT the disk holds (a driver that stages reads the archive)


@dataclass
class TargetContext:
    """Things of the engine that a driver may use."""

    log: Callable[[str], None] = lambda message: None
    archive: Callable[[], Archive] | None = None  # the run's archive, for drivers that stage ahead


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
            raise InvalidSettings(f"{self.name} settings: {where}: {e.message}")
        self.settings = with_defaults(schema, settings)
        self.context = context

    @classmethod
    def variant(cls, settings: dict[str, Any]) -> type[Target]:
        """The class that serves these settings. A driver whose settings change what it can do
        (``qemu`` with ``boot: image`` takes an image file instead of an NBD export) returns a
        subclass with other capabilities; most drivers are one class."""
        return cls

    def supports_network(self, mode: str) -> bool:
        """Whether the driver can attach a machine to a network of this mode."""
        return mode == "none"

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

    def guest_endpoint(self, guest: Guest, log: ResourceLog, port: int) -> tuple[str, int] | None:
        """Where the orchestrator host reaches the guest's TCP ``port``; None if it cannot. Raise
        ``EndpointPending`` when it will know later (an address the guest has not reported yet):
        the health check asks again until its timeout."""
        return None

    def teardown(self, log: ResourceLog) -> None:
        """Destroy every resource in ``log`` (newest first) and forget it. Idempotent."""
        for resource in reversed(log.resources()):
            self.destroy(resource)
            log.forget(resource)

    def destroy(self, resource: Resource) -> None:
        """Destroy one recorded resource; "already gone" is success. Subclasses handle their own
        kinds and defer to this for processes, files and directories."""
        destroy_generic(resource)


# --------------------------------------------------------------------------- capabilities
# A driver states what it can do by the capability classes it derives from; their methods are
# abstract, so a driver cannot claim a capability without implementing it, nor implement one
# without claiming it. The engine and the runbook validator ask ``isinstance``/``issubclass``,
# never a driver's name.


class BootsFromNbd(Target):
    """The machine boots straight from an NBD export (``Disk.nbd_url``): instant recovery; the
    engine serves the point with ``lifeboat serve`` and hydrates it to ``Disk.local_path``."""

    @abstractmethod
    def local_disk_path(self, guest: Guest) -> Path | None:
        """Where the driver wants the hydrated local disk (where its hypervisor may read); None
        lets the engine choose (in the guest's workdir)."""


class Localizes(BootsFromNbd):
    """A machine booted from NBD can move onto the hydrated local disk while it runs."""

    @abstractmethod
    def move_to_local(self, guest: Guest, disk: Disk, log: ResourceLog) -> None:
        """Move the running machine from ``disk.nbd_url`` onto ``disk.local_path`` (complete).
        Idempotent."""


class FillsLocalDisk(Target):
    """The machine starts at once from its point, served by the driver itself, while its own
    disk fills in the background, then runs from that disk alone (the pxe target's ``restore:
    instant``); the engine's localize step waits for the fill."""

    @abstractmethod
    def filled(self, guest: Guest, log: ResourceLog) -> bool:
        """The disk is filled and the machine runs from it alone (``poll`` follows the fill)."""


class TakesImage(Target):
    """The machine needs a whole image file (``Disk.image_path``) before it can boot: the engine
    writes the point with an exporter in the first of ``image_formats()`` (a cloud upload, a
    recovery without a running server)."""

    @abstractmethod
    def image_formats(self) -> list[str]:
        """The exporter formats (``lifeboat export --format`` names) this driver takes, preferred first."""


class Uploads(TakesImage):
    """The image goes to a cloud's image service and the machine boots there (OpenStack's
    Glance). When the driver's first format can be written front to back
    (``exporters.STREAM_FORMATS``: raw, qcow2), the engine writes no file at all:
    ``Disk.open_image`` yields the image, made from the archive as the driver streams it to the
    cloud."""

    @abstractmethod
    def uploaded_image(self, guest: Guest, log: ResourceLog) -> str | None:
        """The cloud's id of the image uploaded for ``guest``; None before ``provision``."""


class HasConsole(Target):
    """The machine's serial console can be read as a file (health checks watch it)."""

    @abstractmethod
    def console_path(self, guest: Guest, log: ResourceLog) -> Path | None:
        """The file the console is written to; None before the machine was provisioned."""


class ExecInGuest(Target):
    """Commands run in the guest (through a guest agent the machine runs)."""

    @abstractmethod
    def exec_in_guest(self, guest: Guest, log: ResourceLog, argv: list[str], timeout: float) -> ExecResult:
        """Run ``argv`` in the guest and return its exit status and output."""


class Physical(Target):
    """A physical server (V2P, P2P): its boot device is set through its management controller."""

    kind = "physical"

    @abstractmethod
    def set_next_boot(self, guest: Guest, log: ResourceLog, device: str) -> None:
        """Make the server boot from ``device`` (``network`` or ``disk``) next time."""


class StagesAhead(Target):
    """The target keeps its own copy of a machine's disk in step with the archive ahead of a
    failover (``lifeboat stage``), so that a recovery starts from that copy."""

    @abstractmethod
    def stage(self, machine: str, point: str, log: ResourceLog) -> dict[str, Any]:
        """Bring the target's copy of ``machine`` up to ``point`` (a ``MACHINE@WHEN`` already
        resolved to a point id), read from ``context.archive``; returns what was staged (ids,
        bytes sent)."""

    @abstractmethod
    def starts_from_stage(self) -> bool:
        """Whether ``provision`` starts from the staged copy (bringing it up to ``Disk.point``
        itself), so the engine gives it no image even if the driver ``TakesImage``."""


class Sweeps(Target):
    """The target finds what a runbook's runs created by tag alone, so ``lifeboat teardown
    --force`` cleans what a crashed run left even when the state store that recorded it is lost
    (another host, the state directory gone). aws implements it; openstack (server and image
    metadata) and vmware (VM custom attributes or names) could; libvirt and pxe keep their
    resources on this host, found by the run's token, and need not."""

    @abstractmethod
    def sweep(self, runbook: str, keep_run_ids: set[str], log: Callable[[str], None]) -> list[dict[str, str]]:
        """Remove everything tagged with ``runbook`` whose run is not in ``keep_run_ids``;
        idempotent (gone is success). Returns what was removed: ``{kind, id, run}`` each, and
        says each through ``log``."""


CAPABILITIES: dict[str, type] = {
    "boots_from_nbd": BootsFromNbd,
    "moves_to_local": Localizes,
    "fills_local_disk": FillsLocalDisk,
    "takes_image": TakesImage,
    "uploads": Uploads,
    "console": HasConsole,
    "exec_in_guest": ExecInGuest,
    "physical": Physical,
    "stages_ahead": StagesAhead,
    "sweeps": Sweeps,
}


def capabilities(driver: Target | type[Target]) -> list[str]:
    """The names of the capabilities a driver (class or instance) has, for plans and listings."""
    cls = driver if isinstance(driver, type) else type(driver)
    return [name for name, cap in CAPABILITIES.items() if issubclass(cls, cap)]


# --------------------------------------------------------------------------- files and processes


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
