"""The conformance suite every target driver passes, against real peers (as restic's
``internal/backend/test/suite.go`` does for its backends).

One suite, parametrized over test peers (``tests/targets/peers.py``), one peer per driver *mode*:
``qemu`` (boots from NBD), ``qemu-image`` (``boot: image``: boots from an exported qcow2 file),
``kvm`` (a real libvirtd), ``vmware`` (govmomi's vCenter simulator), ``openstack`` and
``openstack-volume`` (real Keystone and Glance, Nova, Cinder and Neutron as doubles; ``Uploads``: the
image is streamed, no file written), ``pxe`` (a blank libvirt
domain standing in for a bare-metal server, its BMC a real sushy-emulator: a ``Physical`` target
restores the point onto the server's own disk, then boots it; the guest's write is judged on that
disk, and the server has longer to come up), ``aws`` (moto's server: EC2 and the EBS direct
APIs; it starts from the staged chain, so the engine gives it no image). The tests branch only on
capabilities (``isinstance``), never on a driver's name:

- the settings schema is valid, the defaults satisfy it, unknown and mistyped settings are
  rejected with an error naming the setting;
- the driver boots from NBD, takes an image or starts from its staged copy, and implements every
  capability it claims;
- one lifecycle per mode with the real sample guest: the disk prepared as the engine prepares it
  (NBD: an export hydrating a local disk; image: the point written by the exporter of the
  driver's first format, judged by ``qemu-img check``), provision records before it creates,
  boot, the guest's console lines (``HasConsole``), boot again adopts, ``Localizes``: move onto
  the hydrated disk and keep running once the NBD server stops; then a *fresh* driver instance with
  a fresh ``SqliteState`` tears down from the database alone (as after a ``kill -9``): the guest's write
  is on its disk, nothing the driver created is left, teardown is idempotent, and a file in the
  workdir that the driver did not create is untouched. A driver without a console (``vmware``
  on govmomi's simulator, ``openstack`` on the Nova double, ``aws`` on moto: nothing runs) is
  judged instead by the disk its host holds: the peer fetches it (``held_disk``) and ``qemu-img
  compare`` finds it equal to the point.

How a new target driver is added: write the driver (a ``Target`` subclass deriving from the
capability classes of ``targets/base.py`` it has, with its settings schema in
``targets/schemas/NAME.json``), register it, and add a peer for each of its modes to
``PEERS`` in ``tests/targets/peers.py``: its name and test settings, ``start`` (its host or API
on loopback), ``is_running`` and ``leftovers`` (asked of the host, not of the driver). This suite
then runs on it unchanged; a capability the suite cannot yet exercise is a change to the suite,
branched on that capability, never on the driver's name.
"""

from __future__ import annotations

import inspect
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from examples.sample_guest import read_record
from lifeboat.archive import Archive
from lifeboat.exporters import EXPORTERS
from lifeboat.orchestrator.context import disk_of
from lifeboat.orchestrator.health import console_text
from lifeboat.orchestrator.serving import NbdServerProcess, find_server, stop_server
from lifeboat.orchestrator.state import DbResourceLog, SqliteState
from lifeboat.orchestrator.steps import give_disk
from lifeboat.targets import TARGETS
from lifeboat.targets.base import (
    BootsFromNbd,
    Disk,
    Guest,
    HasConsole,
    Localizes,
    NetworkSpec,
    Physical,
    ResourceLog,
    TakesImage,
    Target,
    TargetContext,
    TargetError,
    Uploads,
    destroy_generic,
)
from tests.targets.peers import PEERS, Peer
from tests.targets.realpeers import lifeboat

POINT = "sample-guest@latest"


def driver_for(peer: Peer) -> type[Target]:
    """The class that serves the peer's settings, found the way the engine finds it."""
    return TARGETS.get(peer.driver).variant(peer.settings)


@pytest.mark.parametrize("peer", PEERS, ids=repr)
def test_settings_schema(peer: Peer, tmp_path: Path) -> None:
    cls = driver_for(peer)
    schema = cls.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    ctx = TargetContext()
    jsonschema.validate(cls(peer.settings, ctx).settings, schema)  # the defaults satisfy the schema
    with pytest.raises(TargetError, match="no_such_setting"):
        cls({**peer.settings, "no_such_setting": 1}, ctx)
    name = next(k for k, v in schema["properties"].items() if v.get("type") != "object")
    with pytest.raises(TargetError, match=name):
        cls({**peer.settings, name: {"not": "a valid value"}}, ctx)


@pytest.mark.parametrize("peer", PEERS, ids=repr)
def test_capabilities(peer: Peer, tmp_path: Path) -> None:
    cls = driver_for(peer)
    assert cls.name == peer.driver and cls.kind in ("virtual", "physical")
    assert not inspect.isabstract(cls), "every capability the driver claims is implemented"
    assert issubclass(cls, BootsFromNbd | TakesImage), "a machine needs a disk: from NBD or an image"
    target = cls(peer.settings, TargetContext())
    assert target.supports_network("none")
    if isinstance(target, TakesImage):
        assert target.image_formats() and set(target.image_formats()) <= set(EXPORTERS.names())


def engine_disk(target: Target, guest: Guest, elog: ResourceLog, archive: Path) -> tuple[Disk, NbdServerProcess | None]:
    """The engine's side of the disk, prepared by the engine's own code (resources in ``elog``);
    an image is judged by ``qemu-img check``."""
    arc = Archive.open(str(archive))
    result = give_disk(
        target, guest, elog, POINT, archive=str(archive), key_file=None, open_archive=lambda: arc
    )
    disk = disk_of(arc.resolve(POINT).size, result, lambda: arc)
    if disk.image_path is not None:
        fmt = EXPORTERS.get(str(disk.image_format)).qemu_format
        check = subprocess.run(["qemu-img", "check", "-f", fmt, str(disk.image_path)], capture_output=True, text=True)
        assert check.returncode == 0 or "does not support checks" in check.stderr, check.stdout + check.stderr
    return disk, find_server(elog, guest.token) if disk.nbd_url else None


def wait_for(condition: Callable[[], bool], what: Callable[[], str], timeout: float, poll: Callable[[], None]) -> None:
    """Poll the driver until ``condition()`` holds; fail with ``what()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        poll()
        assert time.monotonic() < deadline, what()
        time.sleep(0.5)


@pytest.mark.parametrize("peer", PEERS, ids=repr)
def test_lifecycle_adopt_localize_and_teardown_after_a_crash(
    peer: Peer, tmp_path: Path, sample_archive: Path, request: pytest.FixtureRequest
) -> None:
    peer.start(request, tmp_path)
    cls = driver_for(peer)
    ctx = TargetContext(archive=lambda: Archive.open(str(sample_archive)))  # as the engine gives it
    run_id = f"20260101T000000-{secrets.token_hex(3)}"
    state = SqliteState(tmp_path / "state")
    guest = Guest("conf", run_id, tmp_path / "work", NetworkSpec("none" if issubclass(cls, Physical) else "isolated"))
    target = cls(peer.settings, ctx)
    target.prepare()

    elog = DbResourceLog(state, run_id, "conf", "engine")
    elog.record("dir", str(guest.workdir), {})
    guest.workdir.mkdir()
    disk, server = engine_disk(target, guest, elog, sample_archive)
    decoy = guest.workdir / "not-created-by-the-driver.txt"
    decoy.write_text("keep me")

    def drivers_leftovers() -> list[tuple[str, str]]:
        engines = {r.ident for r in elog.resources()} | {str(decoy)}
        return [x for x in peer.leftovers(guest) if x[1] not in engines]

    assert drivers_leftovers() == [] and not peer.is_running(guest)
    tlog = DbResourceLog(state, run_id, "conf", cls.name)
    target.provision(guest, disk, tlog)
    assert tlog.resources(), "provision records what it will create"
    target.boot(guest, tlog)
    poll = lambda: target.poll(guest, tlog)  # noqa: E731
    if isinstance(target, HasConsole):
        console = target.console_path(guest, tlog)
        assert console is not None
        boot_time = 900 if isinstance(target, Physical) else 240  # a physical server restores its disk first
        wait_for(
            lambda: "LIFEBOAT-GUEST: alive" in console_text(console),
            lambda: console_text(console)[-3000:],
            boot_time,
            poll,
        )
        text = console_text(console)
        assert "LIFEBOAT-GUEST: disk-record 0 sample-guest" in text and "LIFEBOAT-GUEST: disk-write-ok 1" in text
    assert target.is_running(guest, tlog) and peer.is_running(guest)

    machines = [x for x in drivers_leftovers() if x[0] != "file"]
    target.boot(guest, tlog)  # adopts the running machine
    assert [x for x in drivers_leftovers() if x[0] != "file"] == machines, "a second machine was started"

    if isinstance(target, Uploads):
        assert disk.image_path is None and disk.open_image is not None, "streamed, no file written"

    if isinstance(target, Localizes):
        assert server is not None and disk.local_path is not None
        wait_for(server.hydrated, lambda: "hydration did not complete", 120, poll)
        target.move_to_local(guest, disk, tlog)
        target.move_to_local(guest, disk, tlog)  # idempotent
        stop_server(elog, guest.token)
        assert not server.alive()
        if isinstance(target, HasConsole):
            alive = console_text(console).count("LIFEBOAT-GUEST: alive")
            wait_for(
                lambda: console_text(console).count("LIFEBOAT-GUEST: alive") >= alive + 2,
                lambda: "the guest stopped after leaving the NBD export",
                60,
                poll,
            )
        assert peer.is_running(guest)

    if not isinstance(target, HasConsole):
        # no console: the guest cannot be watched (a simulator runs nothing), so judge what the
        # target holds: the machine's disk, fetched from the host, equals the point
        held = tmp_path / "held"
        held.mkdir()
        image = peer.held_disk(guest, held)
        assert image is not None, "a target without a console must let the suite fetch the disk it holds"
        point = tmp_path / "point.raw"
        lifeboat("restore", POINT, str(point), "--archive", str(sample_archive), check=True)
        compare = ["qemu-img", "compare", "-F", "raw", str(image), str(point)]
        same = subprocess.run(compare, capture_output=True, text=True)
        assert same.returncode == 0, same.stdout + same.stderr

    # tear down from a fresh process's point of view: new database handle, new driver instance
    state2 = SqliteState(tmp_path / "state")
    fresh = driver_for(peer)(peer.settings, TargetContext())
    log2 = DbResourceLog(state2, run_id, "conf", cls.name)
    fresh.teardown(log2)
    assert log2.resources() == []
    fresh.teardown(log2)  # idempotent
    assert not peer.is_running(guest)
    assert drivers_leftovers() == []
    assert decoy.read_text() == "keep me"  # not the driver's: untouched

    # the guest's write is on the disk it ended on
    if isinstance(target, Localizes):
        assert disk.local_path is not None and read_record(disk.local_path) == (1, "sample-guest")
    if isinstance(target, Physical):  # on the server's own disk, not on the image it was restored from
        server_disk = peer.server_disk(guest)
        assert server_disk is not None and read_record(server_disk) == (1, "sample-guest")
    elif isinstance(target, TakesImage) and isinstance(target, HasConsole):
        assert disk.image_path is not None and disk.image_format is not None
        raw = tmp_path / "written.raw"
        qemu_format = EXPORTERS.get(disk.image_format).qemu_format
        subprocess.run(
            ["qemu-img", "convert", "-f", qemu_format, "-O", "raw", str(disk.image_path), str(raw)], check=True
        )
        assert read_record(raw) == (1, "sample-guest")

    for r in reversed(elog.resources()):
        destroy_generic(r)
        elog.forget(r)
    assert peer.leftovers(guest) == []
