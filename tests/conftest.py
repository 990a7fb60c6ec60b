import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vcsim import vcsim  # noqa: F401  (session fixture: the vCenter simulator, issue 14)

LIBVIRT_URI = "qemu:///system"


@pytest.fixture(scope="session")
def sample_guest_image() -> Path:
    """The cached sample guest disk image (examples/sample_guest.py), built on first use.

    Shared by the whole session: never boot or modify it in place, work on a copy
    (``examples.sample_guest.copy_image``) or boot it with QEMU's ``-snapshot``.
    """
    from examples.sample_guest import build

    return build()


def _libvirt_answers() -> bool:
    return subprocess.run(["virsh", "-c", LIBVIRT_URI, "version"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """``qemu:///system``, starting virtlogd and libvirtd (as daemons) if they are not running;
    only the ones started here are stopped, at the end of the session (one fixture for every
    test that needs libvirt, so no module stops a daemon that a later test uses)."""
    started: list[Path] = []
    if not _libvirt_answers():
        for daemon, pidfile in (("virtlogd", Path("/run/virtlogd.pid")), ("libvirtd", Path("/run/libvirtd.pid"))):
            if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
                subprocess.run([daemon, "-d"], check=True, timeout=30)
                started.append(pidfile)
        deadline = time.monotonic() + 30
        while not _libvirt_answers():
            assert time.monotonic() < deadline, f"libvirtd did not answer on {LIBVIRT_URI}"
            time.sleep(0.2)
    yield LIBVIRT_URI
    for pidfile in reversed(started):
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="session")
def openstack_cloud() -> Iterator[object]:
    """Real Keystone and Glance on PostgreSQL, Nova/Cinder/Neutron doubles in their catalog
    (``tests/targets/openstackcloud.py``), started once per session; fails if a part is missing."""
    from tests.targets.openstackcloud import running_cloud

    with running_cloud() as cloud:
        yield cloud


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's server on loopback (S3 with the test bucket, EC2, EBS direct APIs, STS), once per
    session, run by ``tests/moto_aws.py`` (AWS's EBS block size)."""
    import sys

    from tests.archive.s3servers import BUCKET, client, free_port, serve

    port = free_port()
    argv = [sys.executable, str(Path(__file__).parent / "moto_aws.py"), "-H", "127.0.0.1", "-p", str(port)]
    with serve(argv, f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("moto") / "log") as endpoint:
        client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
