"""The openstack target's own cases, against real Keystone and Glance and the Nova/Cinder/Neutron
doubles (``openstack_cloud``): credentials from clouds.yaml; wrong credentials, project, flavor,
network, region; quota exceeded; a server that goes to ERROR (deleted, Nova's fault reported); a
boot that times out; Keystone, Glance or Nova not answering; an interrupted upload resumed;
teardown after a crash that came between a create and the record of its id (found by name and the
run's tag/metadata). The lifecycle itself is the driver suite's (``test_conformance.py``, peers
``openstack`` and ``openstack-volume``)."""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lifeboat.targets.base import Disk, Guest, MemoryLog, NetworkSpec, TargetContext, TargetUnavailable
from lifeboat.targets.openstack import OpenStackError, OpenStackTarget
from tests.targets.openstackcloud import LocalCloud

SETTINGS: dict[str, Any] = {"flavor": "m1.tiny", "networks": [{"network": "private"}]}


@pytest.fixture
def cloud(openstack_cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch) -> LocalCloud:
    """The session's cloud, its admin credentials in ``OS_*``."""
    monkeypatch.delenv("OS_CLOUD", raising=False)
    for k, v in openstack_cloud.env().items():
        monkeypatch.setenv(k, v)
    return openstack_cloud


@pytest.fixture
def guest(tmp_path: Path) -> Guest:
    return Guest("web", f"20260101T000000-{secrets.token_hex(3)}", tmp_path, NetworkSpec("none"))


@pytest.fixture
def disk(tmp_path: Path) -> Disk:
    """A small qcow2 with a few written bytes, streamed as the engine streams one (no archive
    needed to test the API's errors)."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(image)], check=True, capture_output=True)
    data = image.read_bytes()
    return Disk(size=1 << 20, image_format="qcow2", open_image=lambda: iter([data[:4096], data[4096:]]))


def of_run(cloud: LocalCloud, kind: str, guest: Guest) -> list[dict[str, Any]]:
    """The double's servers/volumes of the guest's run."""
    return [i for i in cloud.doubles.state()[kind] if i["metadata"].get("lifeboat_run") == guest.run_id]


def glance_images(cloud: LocalCloud, guest: Guest) -> list[Any]:
    return list(cloud.connect().image.images(tag=[f"lifeboat-run:{guest.run_id}"]))


def target(**settings: Any) -> OpenStackTarget:
    return OpenStackTarget({**SETTINGS, **settings}, TargetContext())


def test_credentials_from_clouds_yaml(
    cloud: LocalCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guest: Guest, disk: Disk
) -> None:
    for k in cloud.env():
        monkeypatch.delenv(k)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(cloud.clouds_yaml(tmp_path / "clouds.yaml")))
    t = target(cloud="lifeboat-test")
    t.prepare()
    log = MemoryLog("openstack")
    t.provision(guest, disk, log)
    t.boot(guest, log)
    assert t.is_running(guest, log)
    t.teardown(log)
    assert of_run(cloud, "servers", guest) == [] and glance_images(cloud, guest) == []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"OS_PASSWORD": "wrong"}, "refused the credentials (user 'admin', project 'admin'"),
        ({"OS_PROJECT_NAME": "no-such-project"}, "project 'no-such-project'"),
    ],
    ids=["password", "project"],
)
def test_wrong_credentials(
    cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch, override: dict[str, str], expected: str
) -> None:
    for k, v in override.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(OpenStackError, match=expected.replace("(", r"\(")) as e:
        target().prepare()
    assert e.value.exit_code == 1


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"flavor": "m9.nope"}, "flavor 'm9.nope': not found"),
        ({"networks": [{"network": "no-such-net"}]}, "network 'no-such-net': not found"),
        ({"networks": [{"port": "no-such-port"}]}, "port 'no-such-port': not found"),
        ({"security_groups": ["web"]}, "security group 'web': not found"),
        ({"key_name": "nobody"}, "key pair 'nobody'"),
        ({"availability_zone": "mars"}, "availability zone 'mars': not found"),
    ],
    ids=["flavor", "network", "port", "security-group", "key-pair", "zone"],
)
def test_unknown_objects_fail_before_anything_is_made(
    cloud: LocalCloud, settings: dict[str, Any], expected: str
) -> None:
    with pytest.raises(OpenStackError, match=expected) as e:
        target(**settings).prepare()
    assert e.value.exit_code == 1


def test_quota_exceeded_names_the_server_and_the_quota(cloud: LocalCloud, guest: Guest, disk: Disk) -> None:
    t = target(flavor="m1.huge")
    t.prepare()
    log = MemoryLog("openstack")
    t.provision(guest, disk, log)
    with pytest.raises(
        OpenStackError, match=rf"creating server '{guest.token}'.*quota exceeded: Quota exceeded for cores"
    ):
        t.boot(guest, log)
    t.teardown(log)
    assert glance_images(cloud, guest) == [] and log.resources() == []


def test_volume_quota_exceeded(cloud: LocalCloud, guest: Guest, disk: Disk) -> None:
    t = target(boot_from_volume=True, volume_size_gib=5000)
    log = MemoryLog("openstack")
    with pytest.raises(OpenStackError, match=rf"creating volume '{guest.token}' \(5000 GiB\).*quota exceeded"):
        t.provision(guest, disk, log)
    t.teardown(log)
    assert glance_images(cloud, guest) == [] and of_run(cloud, "volumes", guest) == []


def test_error_state_deletes_the_server_and_reports_novas_fault(cloud: LocalCloud, guest: Guest, disk: Disk) -> None:
    t = target(flavor="x1.nohost")
    log = MemoryLog("openstack")
    t.provision(guest, disk, log)
    with pytest.raises(OpenStackError, match="went to ERROR: No valid host was found") as e:
        t.boot(guest, log)
    assert e.value.exit_code == 1
    assert of_run(cloud, "servers", guest) == [], "the failed server is deleted at once"
    t.teardown(log)
    assert glance_images(cloud, guest) == [] and log.resources() == []


def test_boot_timeout_names_the_server_and_teardown_removes_it(cloud: LocalCloud, guest: Guest, disk: Disk) -> None:
    t = target(flavor="x1.slow", boot_timeout_s=1)
    log = MemoryLog("openstack")
    t.provision(guest, disk, log)
    with pytest.raises(OpenStackError, match=r"is still BUILD after 1 s \(boot_timeout_s\)"):
        t.boot(guest, log)
    assert len(of_run(cloud, "servers", guest)) == 1
    OpenStackTarget({**SETTINGS, "flavor": "x1.slow"}, TargetContext()).teardown(log)
    assert of_run(cloud, "servers", guest) == [] and glance_images(cloud, guest) == []


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(s.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield s.getsockname()[1]
    stop.set()
    thread.join()
    for c in held:
        c.close()
    s.close()


def test_an_api_that_does_not_answer(cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch, silent_port: int) -> None:
    monkeypatch.setenv("OS_AUTH_URL", f"http://127.0.0.1:{silent_port}/v3")
    with pytest.raises(OpenStackError, match=r"authenticating to OpenStack: no answer within 0.5 s"):
        target(api_timeout_s=0.5).prepare()


def test_glance_that_does_not_answer(
    cloud: LocalCloud, guest: Guest, disk: Disk, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OS_REGION_NAME", "SilentGlance")
    t = target(api_timeout_s=3)
    t.prepare()  # Keystone and Nova answer
    with pytest.raises(OpenStackError, match=rf"looking up image '{guest.token}' in Glance: no answer within 3 s"):
        t.provision(guest, disk, MemoryLog("openstack"))


def test_nova_that_does_not_answer(cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OS_REGION_NAME", "SilentNova")
    with pytest.raises(OpenStackError, match=r"flavor 'm1.tiny': no answer within 3 s"):
        target(api_timeout_s=3).prepare()


def test_unknown_region(cloud: LocalCloud) -> None:
    with pytest.raises(TargetUnavailable, match="Region Atlantis is not a valid region name") as e:
        target(region="Atlantis").prepare()
    assert e.value.exit_code == 1


def test_teardown_after_a_crash_before_the_ids_were_recorded(cloud: LocalCloud, guest: Guest, disk: Disk) -> None:
    t = target(boot_from_volume=True)
    log = MemoryLog("openstack")
    t.provision(guest, disk, log)
    t.boot(guest, log)
    assert len(of_run(cloud, "servers", guest)) == 1 and len(of_run(cloud, "volumes", guest)) == 1
    for r in log.resources():  # as if killed between each create and the record of its id
        r.data.pop("id")
    fresh = target(boot_from_volume=True)
    fresh.teardown(log)
    assert of_run(cloud, "servers", guest) == [] and of_run(cloud, "volumes", guest) == []
    assert glance_images(cloud, guest) == [] and log.resources() == []
    fresh.teardown(log)  # idempotent


def test_fixed_ips_security_groups_key_and_zone_reach_nova(cloud: LocalCloud, guest: Guest, disk: Disk) -> None:
    t = target(
        networks=[{"network": "private", "fixed_ip": "10.0.0.42"}, {"port": "spare-port"}],
        security_groups=["ssh"],
        key_name="ops",
        availability_zone="az2",
    )
    t.prepare()
    log = MemoryLog("openstack")
    t.provision(guest, disk, log)
    t.boot(guest, log)
    (server,) = of_run(cloud, "servers", guest)
    assert server["addresses"] == {
        "private": [
            {"addr": "10.0.0.42", "version": 4, "OS-EXT-IPS:type": "fixed"},
            {"addr": "10.0.0.250", "version": 4, "OS-EXT-IPS:type": "fixed"},
        ]
    }
    assert server["security_groups"] == [{"name": "ssh"}] and server["key_name"] == "ops"
    assert server["OS-EXT-AZ:availability_zone"] == "az2" and server["name"] == guest.token
    assert server["metadata"] == {"lifeboat_run": guest.run_id, "lifeboat_machine": guest.name}
    assert t.guest_endpoint(guest, log, 22) == ("10.0.0.42", 22)
    (image,) = glance_images(cloud, guest)
    assert set(image.tags) == {"lifeboat", f"lifeboat-run:{guest.run_id}"} and image.disk_format == "qcow2"
    t.teardown(log)
    spare = [p for p in cloud.doubles.state()["ports"] if p["name"] == "spare-port"]
    assert spare and spare[0]["device_id"] == "", "a port the run did not create is freed, not deleted"


def test_an_interrupted_upload_is_resumed_by_a_fresh_driver(
    cloud: LocalCloud, guest: Guest, disk: Disk, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keystoneauth1.exceptions as ka

    t = target()
    log = MemoryLog("openstack")

    def reset(*args: Any, **kwargs: Any) -> None:
        raise ka.ConnectFailure("connection reset by peer")

    monkeypatch.setattr(t.conn().image, "put", reset)
    with pytest.raises(OpenStackError, match=r"uploading the point to Glance image .* cannot reach the service"):
        t.provision(guest, disk, log)
    (image,) = glance_images(cloud, guest)
    assert image.status == "queued"
    fresh = target()
    fresh.provision(guest, disk, log)
    (again,) = glance_images(cloud, guest)
    assert (
        again.id == image.id
        and again.status == "active"
        and again.size == (guest.workdir / "disk.qcow2").stat().st_size
    )
    fresh.teardown(log)
    assert glance_images(cloud, guest) == []
