"""A small OpenStack on loopback for the openstack target's tests and bench: **real** PostgreSQL,
**real** Keystone (python3-keystone, served by ``keystone_wsgi.py``) and **real** Glance
(python3-glance, file store, keystonemiddleware's auth_token), plus Nova, Cinder and Neutron as
contract doubles (``openstackdoubles.py``) registered in the real Keystone's catalog.

Start-up is kept small: the slow part (``initdb``, ``keystone-manage db_sync``/``fernet_setup``/
``credential_setup``/``bootstrap``, Glance's ``db_sync``: about 25 s) is done once and kept as a
tar of the PostgreSQL data directory and the key repositories under
``~/.cache/lifeboat-tests/``, named by a hash of the installed packages' versions and of this
module's configuration; a session unpacks it (under a second), starts PostgreSQL, Keystone and
Glance at once, and points the catalog at this session's ports through Keystone's API.
Components that are missing make the fixture fail, never skip.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SYSTEM_PYTHON = "/usr/bin/python3"  # where Debian's python3-keystone / python3-glance live
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PACKAGES = ("python3-keystone", "python3-glance", "python3-keystonemiddleware", "postgresql-15", "python3-psycopg2")
PASSWORD = "lifeboat-test-password"
REGION = "RegionOne"
CLOUD_NAME = "lifeboat-test"
# the cached template's catalog names these hosts; each session puts its own ports in their place
GLANCE_HOST, DOUBLES_HOST, SILENT_HOST = "http://glance.invalid", "http://doubles.invalid", "http://silent.invalid"
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lifeboat-tests"

KEYSTONE_CONF = """\
[DEFAULT]
log_file = {root}/keystone.log
[database]
connection = postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/keystone
[fernet_tokens]
key_repository = {root}/fernet
[credential]
key_repository = {root}/credential
[token]
provider = fernet
[identity]
# bcrypt's cost: the fewest rounds keystone allows (the default, 12, costs ~0.3 s of CPU per login)
password_hash_rounds = 4
"""

GLANCE_CONF = """\
[DEFAULT]
bind_host = 127.0.0.1
bind_port = {glance_port}
workers = 0
log_file = {root}/glance.log
enabled_backends = file:file
[database]
connection = postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/glance
[glance_store]
default_backend = file
[file]
filesystem_store_datadir = {root}/images
[os_glance_tasks_store]
filesystem_store_datadir = {root}/glance-tasks
[os_glance_staging_store]
filesystem_store_datadir = {root}/glance-staging
[paste_deploy]
flavor = keystone
config_file = {root}/glance-api-paste.ini
[keystone_authtoken]
interface = public
www_authenticate_uri = {keystone_url}
auth_url = {keystone_url}
auth_type = password
username = admin
password = {password}
project_name = admin
user_domain_name = Default
project_domain_name = Default
"""

# Glance's v2 API behind keystonemiddleware (the pipeline Debian's glance-api package ships,
# without the CORS, health-check and profiler filters the tests do not need).
GLANCE_PASTE = """\
[pipeline:glance-api-keystone]
pipeline = versionnegotiation authtoken context rootapp
[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app
[app:apiversions]
paste.app_factory = glance.api.versions:create_resource
[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory
[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory
[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory
[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
delay_auth_decision = true
"""

GLANCE_MANAGE = "import sys; sys.argv = ['glance-manage', *sys.argv[1:]]; from glance.cmd.manage import main; main()"
GLANCE_API = "import sys; sys.argv = ['glance-api', *sys.argv[1:]]; from glance.cmd.api import main; main()"


class CloudError(RuntimeError):
    """The local cloud could not be started (a component is missing or failed)."""


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def run(argv: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 300) -> None:
    """Run a set-up command; fail with its output."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise CloudError(f"{what}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def check_components() -> None:
    """Fail, naming what is missing, when a component of the cloud is not installed."""
    missing = [str(p) for p in (Path(SYSTEM_PYTHON), PG_BIN / "postgres", PG_BIN / "initdb") if not p.exists()]
    missing += [] if shutil.which("keystone-manage") else ["keystone-manage (python3-keystone)"]
    if not missing:
        probe = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import keystone, glance, glance_store, keystonemiddleware, psycopg2"],
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            missing.append(probe.stderr.strip().splitlines()[-1])
    if missing:
        raise CloudError(f"the local OpenStack cannot start, missing: {', '.join(missing)} (see scripts/setup.sh)")


def template_key() -> str:
    """The cache key of the pre-synced databases: package versions and this module's set-up."""
    versions = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Version}\n", *PACKAGES], capture_output=True, text=True
    ).stdout
    h = hashlib.sha256(versions.encode() + KEYSTONE_CONF.encode() + GLANCE_CONF.encode() + b"v2")
    return h.hexdigest()[:16]


class Postgres:
    """One PostgreSQL cluster in ``root/data`` (its log and socket beside), loopback only,
    durability off (a test cloud)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port, self.data = root, port, root / "data"

    def create(self) -> None:
        """``root``, owned by the user PostgreSQL runs as, and an empty cluster in it."""
        self.root.mkdir(mode=0o700)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.init()

    def init(self) -> None:
        run(
            as_postgres(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            "initdb",
        )

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        run(
            as_postgres(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-w",
                    "-t",
                    "60",
                    "-l",
                    str(self.root / "postgres.log"),
                    "-o",
                    options,
                    "start",
                ]
            ),
            "pg_ctl start",
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
            capture_output=True,
            timeout=60,
        )

    def sql(self, statement: str, database: str = "postgres") -> None:
        run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database, "-qc", statement],
            statement,
        )


class LocalCloud:
    """Real Keystone and Glance on PostgreSQL, and the Nova/Cinder/Neutron doubles; ``start()``
    then ``stop()`` (or ``with running_cloud() as cloud``)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lifeboat-openstack-"))
        self.root.chmod(0o755)  # postgres (the user) enters it
        self.pg = Postgres(self.root / "pg", free_port())
        self.keystone_port, self.glance_port = free_port(), free_port()
        self.keystone_url = f"http://127.0.0.1:{self.keystone_port}/v3"
        self.glance_url = f"http://127.0.0.1:{self.glance_port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.doubles: Any = None
        self.silent = socket.socket()  # listens, never accepts: connections wait for ever
        self.silent.bind(("127.0.0.1", 0))
        self.silent.listen(64)
        self.timings: dict[str, float] = {}

    # -- configuration -------------------------------------------------------------------
    def _write_configs(self) -> None:
        values = {
            "root": self.root,
            "pg_port": self.pg.port,
            "glance_port": self.glance_port,
            "keystone_url": self.keystone_url,
            "password": PASSWORD,
        }
        (self.root / "keystone.conf").write_text(KEYSTONE_CONF.format(**values))
        (self.root / "glance-api.conf").write_text(GLANCE_CONF.format(**values))
        (self.root / "glance-api-paste.ini").write_text(GLANCE_PASTE)
        for d in ("images", "glance-tasks", "glance-staging"):
            (self.root / d).mkdir(exist_ok=True)

    def _keystone_manage(self, *args: str) -> None:
        run(["keystone-manage", "--config-file", str(self.root / "keystone.conf"), *args], f"keystone-manage {args[0]}")

    def _build_template(self, tar: Path) -> None:
        """initdb, both databases synced, Keystone bootstrapped; packed into ``tar``."""
        self.pg.create()
        self.pg.start()
        try:
            self.pg.sql("CREATE DATABASE keystone")
            self.pg.sql("CREATE DATABASE glance")
            self._write_configs()
            self._keystone_manage("db_sync")
            user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
            for repo in ("fernet", "credential"):
                self._keystone_manage(f"{repo}_setup", "--keystone-user", user, "--keystone-group", group)
            self._keystone_manage(
                "bootstrap",
                "--bootstrap-password",
                PASSWORD,
                "--bootstrap-region-id",
                REGION,
                "--bootstrap-public-url",
                self.keystone_url,
            )
            run(
                [SYSTEM_PYTHON, "-c", GLANCE_MANAGE, "--config-file", str(self.root / "glance-api.conf"), "db_sync"],
                "glance-manage db_sync",
            )
            self._spawn_keystone()
            self._wait_http("keystone", self.keystone_url)
            self._register_catalog()  # with placeholder URLs, set per session by SQL (start())
        finally:
            self._stop_processes()
            self.pg.stop()
        tar.parent.mkdir(parents=True, exist_ok=True)
        partial = tar.with_suffix(f".{os.getpid()}.partial")
        run(["tar", "-C", str(self.root), "-cf", str(partial), "pg", "fernet", "credential"], "tar")
        partial.rename(tar)
        for stale in CACHE.glob("openstack-*.tar"):  # templates of other package versions
            if stale != tar:
                stale.unlink(missing_ok=True)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> LocalCloud:
        """Start everything; on failure, stop what was started and raise ``CloudError``."""
        t0 = time.monotonic()
        check_components()
        try:
            tar = CACHE / f"openstack-{template_key()}.tar"
            if not tar.exists():
                self._build_template(tar)
                self.timings["template_build_s"] = time.monotonic() - t0
            else:
                run(["tar", "-C", str(self.root), "-xf", str(tar)], "unpack the cached databases")
            t1 = time.monotonic()
            self._write_configs()
            self.pg.start()
            from tests.targets.openstackdoubles import Doubles

            self.doubles = Doubles(self.keystone_url, self.glance_url).start()
            self._point_catalog_here()
            self._spawn_keystone()
            glance_conf = str(self.root / "glance-api.conf")
            self._spawn("glance", [SYSTEM_PYTHON, "-c", GLANCE_API, "--config-file", glance_conf], dict(os.environ))
            self._wait_http("keystone", self.keystone_url)
            self.timings["keystone_s"] = time.monotonic() - t1
            self._wait_http("glance", self.glance_url)
            self.timings["start_s"] = time.monotonic() - t1
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        out = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 (the child keeps it)
        self.procs[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
        )
        out.close()

    def _wait_http(self, name: str, url: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.procs[name]
            if proc.poll() is not None:
                log = (self.root / f"{name}.out").read_text(errors="replace")[-3000:]
                raise CloudError(f"{name} exited with status {proc.returncode}:\n{log}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                return
            except urllib.error.HTTPError:
                return  # it answers (a 300 Multiple Choices from Glance's version list)
            except OSError:
                if time.monotonic() > deadline:
                    raise CloudError(f"{name} did not answer on {url} within {timeout:.0f} s") from None
                time.sleep(0.1)

    def _spawn_keystone(self) -> None:
        env = {**os.environ, "OS_KEYSTONE_CONFIG_FILES": str(self.root / "keystone.conf")}
        self._spawn("keystone", [SYSTEM_PYTHON, str(HERE / "keystone_wsgi.py"), str(self.keystone_port)], env)

    def _register_catalog(self) -> None:
        """Glance and the doubles join the catalog in ``RegionOne``, at placeholder hosts (this is
        done once, for the cached template). Two more regions test an API that does not answer: in
        ``SilentGlance`` the image endpoint is a port that accepts and never answers, in
        ``SilentNova`` the compute endpoint is."""
        identity = self.connect().identity
        services = {
            "image": ("glance", GLANCE_HOST),
            "compute": ("nova", f"{DOUBLES_HOST}/compute/v2.1"),
            "volumev3": ("cinderv3", f"{DOUBLES_HOST}/volume/v3/$(project_id)s"),
            "network": ("neutron", f"{DOUBLES_HOST}/network"),
        }
        regions = {
            REGION: {},
            "SilentGlance": {"image": SILENT_HOST},
            "SilentNova": {"compute": f"{SILENT_HOST}/v2.1"},
        }
        for region in regions:
            if region != REGION:
                identity.create_region(id=region)
        for kind, (name, url) in services.items():
            service = identity.create_service(type=kind, name=name)
            for region, silenced in regions.items():
                for interface in ("public", "internal"):
                    identity.create_endpoint(
                        service_id=service.id, interface=interface, url=silenced.get(kind, url), region_id=region
                    )

    def _point_catalog_here(self) -> None:
        """The template's catalog, at this session's ports (before Keystone starts: one UPDATE)."""
        silent = f"http://127.0.0.1:{self.silent.getsockname()[1]}"
        url = "url"
        for host, here in ((GLANCE_HOST, self.glance_url), (DOUBLES_HOST, self.doubles.url), (SILENT_HOST, silent)):
            url = f"replace({url}, '{host}', '{here}')"
        self.pg.sql(
            f"UPDATE endpoint SET url = CASE WHEN service_id IN (SELECT id FROM service WHERE type = 'identity') "
            f"THEN '{self.keystone_url}' ELSE {url} END",
            "keystone",
        )

    def _stop_processes(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def stop(self) -> None:
        """Stop every process this cloud started and remove its files."""
        self._stop_processes()
        if self.doubles is not None:
            self.doubles.stop()
        self.silent.close()
        if (self.pg.data / "postmaster.pid").exists():
            self.pg.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- clients -------------------------------------------------------------------------
    def env(self, **overrides: str) -> dict[str, str]:
        """The ``OS_*`` variables every OpenStack tool reads, for the admin user."""
        env = {
            "OS_AUTH_TYPE": "password",
            "OS_AUTH_URL": self.keystone_url,
            "OS_USERNAME": "admin",
            "OS_PASSWORD": PASSWORD,
            "OS_PROJECT_NAME": "admin",
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
            "OS_REGION_NAME": REGION,
            "OS_IDENTITY_API_VERSION": "3",
        }
        env.update(overrides)
        return env

    def clouds_yaml(self, path: Path, name: str = CLOUD_NAME, **auth_overrides: str) -> Path:
        """A ``clouds.yaml`` naming this cloud ``name``."""
        import yaml

        auth = {
            "auth_url": self.keystone_url,
            "username": "admin",
            "password": PASSWORD,
            "project_name": "admin",
            "user_domain_name": "Default",
            "project_domain_name": "Default",
        }
        auth.update(auth_overrides)
        cloud = {"auth_type": "password", "auth": auth, "region_name": REGION, "identity_api_version": 3}
        path.write_text(yaml.safe_dump({"clouds": {name: cloud}}))
        return path

    def connect(self) -> Any:
        """An openstacksdk connection as the admin user (the tests' judge, not the driver's)."""
        import openstack

        return openstack.connect(
            auth_url=self.keystone_url,
            username="admin",
            password=PASSWORD,
            project_name="admin",
            user_domain_name="Default",
            project_domain_name="Default",
            region_name=REGION,
            load_yaml_config=False,
            load_envvars=False,
        )


@contextmanager
def running_cloud() -> Iterator[LocalCloud]:
    """A started ``LocalCloud``, stopped on exit."""
    cloud = LocalCloud().start()
    try:
        yield cloud
    finally:
        cloud.stop()
