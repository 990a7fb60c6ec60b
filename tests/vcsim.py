"""A real vCenter for the vmware target and the vSphere source: govmomi's simulator.

``tests/targets/vcsim/main.go`` is a small Go ``main`` around ``simulator.VPX()`` (one datacenter
``DC0``, a host and a cluster, datastore ``LocalDS_0``, port groups ``VM Network`` and
``DC0_DVPG0``), extended with changed-block tracking (``cbt.go``: change IDs on snapshots and
``QueryChangedDiskAreas``, which the simulator lacks; ``-cbt=false`` leaves it out). It is built
with Debian's ``golang-go`` against Debian's ``golang-github-vmware-govmomi-dev``
(``GO111MODULE=off GOPATH=/usr/share/gocode``) once, cached under ``~/.cache/lifeboat-tests/`` by
the sources' content hash, and started once per session on loopback with https (a certificate of
the test CA, ``tests/pki.py``) and one user whose password
is in a file. A missing Go toolchain or govmomi fails the tests that need it (never a skip).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.pki import make_pki

SOURCE = Path(__file__).resolve().parent / "targets" / "vcsim"  # main.go, cbt.go
GOPATH = Path("/usr/share/gocode")
GOVMOMI = GOPATH / "src/github.com/vmware/govmomi/simulator"
CACHE = Path.home() / ".cache" / "lifeboat-tests"
USER = "administrator@vsphere.local"
DATACENTER = "DC0"
DATASTORE = "LocalDS_0"


def build() -> Path:
    """The simulator's binary, built on first use (about 30 s) and cached by the source's hash."""
    go = shutil.which("go")
    if go is None or not GOVMOMI.is_dir():
        pytest.fail(
            "the vCenter simulator needs Debian's golang-go and golang-github-vmware-govmomi-dev (scripts/setup.sh)"
        )
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(SOURCE.glob("*.go")))).hexdigest()[:16]
    binary = CACHE / f"vcsim-{digest}" / "vcsim"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f"vcsim.{os.getpid()}.tmp")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(GOPATH), "GOCACHE": str(CACHE / "go-build"), "GOFLAGS": ""}
    done = subprocess.run(
        [go, "build", "-o", str(tmp), "."], cwd=SOURCE, env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        pytest.fail(f"building the vCenter simulator failed:\n{done.stderr}")
    tmp.replace(binary)
    return binary


@dataclass
class VCenter:
    """A running simulator: where it answers and how to log in."""

    url: str  # https://127.0.0.1:PORT/sdk
    user: str
    password: str
    password_file: Path
    ca_file: Path
    process: subprocess.Popen[str]

    @property
    def host(self) -> str:
        """HOST:PORT, as the vmware target's ``host`` setting and a ``vsphere://`` URL name it."""
        return str(urlsplit(self.url).netloc)

    def settings(self, **extra: Any) -> dict[str, Any]:
        """The vmware target's connection settings for this simulator."""
        return {
            "host": self.host,
            "user": self.user,
            "password_file": str(self.password_file),
            "ca_file": str(self.ca_file),
            "datacenter": DATACENTER,
            "datastore": DATASTORE,
            **extra,
        }

    def connect(self) -> Any:
        """A pyvmomi ServiceInstance, for tests that look at the simulator themselves."""
        from pyVim.connect import SmartConnect

        parts = urlsplit(self.url)
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return SmartConnect(
            host=parts.hostname, port=parts.port, user=self.user, pwd=self.password, sslContext=context
        )


def start(folder: Path, *, cbt: bool = True) -> Generator[VCenter, None, None]:
    """Run the simulator until the generator is closed (without changed-block tracking: as
    govmomi ships it)."""
    binary = build()
    folder.mkdir(parents=True, exist_ok=True)
    pki = make_pki(folder)
    password = "vcsim-" + hashlib.sha256(os.urandom(16)).hexdigest()[:12]
    password_file = folder / "password"
    password_file.write_text(password + "\n")
    proc = subprocess.Popen(
        [str(binary), "-cert", pki["cert"], "-key", pki["key"], "-user", USER, "-password", password]
        + [f"-cbt={str(cbt).lower()}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        pytest.fail(f"the vCenter simulator exited ({proc.returncode}) before it listened")
    try:
        yield VCenter(json.loads(line)["url"], USER, password, password_file, Path(pki["ca"]), proc)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # it removes its datastores' folders and exits
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VCenter]:
    """One vCenter simulator for the session (the vmware target, the vSphere source, the runbooks)."""
    yield from start(tmp_path_factory.mktemp("vcsim"))
