"""Every command, given bad input, a missing peer or a planned driver, exits as ``shared/CLI.md``
says (1: an operation failed; 2: bad usage or input, nothing changed) with a message on stderr
that names what is wrong, and never with a traceback.

The commands come from the CLI's own command table, so a new command without a case here fails
``test_every_command_has_a_bad_input_case``. Each case runs ``lifeboat`` in a subprocess, all of
them at once in a thread pool, so the whole file takes a few seconds.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

import lifeboat
from lifeboat.orchestrator.cli import PLANNED, cli
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.plumbing.errors import LifeboatError
from tests.runbooks.cases import BASE, base

REPO = Path(__file__).resolve().parents[2]

# The command forms of shared/CLI.md (the stable contract), implemented or planned.
CLI_MD = [
    ("archive", "init"),
    ("backup",),
    ("points",),
    ("restore",),
    ("export",),
    ("serve",),
    ("verify",),
    ("prune",),
    ("run",),
    ("failover",),
    ("protect",),
    ("archive", "serve"),
    ("replicate",),
    ("scheduler",),
    ("stage",),
    ("files", "fs"),
    ("files", "ls"),
    ("files", "get"),
    ("files", "find"),
    ("mount",),
    ("web",),
]


@dataclass(frozen=True)
class Case:
    """``lifeboat COMMAND ARGS`` must exit with ``status`` and say ``says`` on stderr.

    ``{NAME}`` in ``args`` and ``says`` is replaced by the workspace path or address of that name.
    """

    id: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    status: int
    says: str


def case(id: str, command: str, args: str, status: int, says: str) -> Case:
    """A case from space-separated words (no argument here holds a space)."""
    return Case(id, tuple(command.split()), tuple(args.split()), status, says)


CASES = [
    # archive
    case("init-exists", "archive init", "--archive {arc}", 2, "{arc}"),
    case("init-encrypt-no-key", "archive init", "--encrypt --archive {tmp}/new1", 2, "--key-file"),
    case("init-bad-chunk-size", "archive init", "--chunk-size 1000 --archive {tmp}/new2", 2, "chunk"),
    case("init-bad-option", "archive init", "--chunk-size many --archive {tmp}/new3", 2, "--chunk-size"),
    case("retention-no-archive", "archive retention", "--keep-last 1 --archive {missing}", 2, "{missing}"),
    case("retention-negative", "archive retention", "--keep-last -1 --archive {arc}", 2, "--keep-last"),
    case("archive-serve-bad-listen", "archive serve", "--listen nowhere --insecure-http --archive {arc}", 2,
         "--listen"),
    case("archive-serve-no-auth", "archive serve", "--listen 127.0.0.1:0 --insecure-http --archive {arc}", 2,
         "token"),
    case("archive-serve-port-busy", "archive serve",
         "--listen {busy} --token-file {token} --insecure-http --archive {arc}", 1, "{busy}"),
    # backup
    case("backup-no-archive", "backup", "web01 {img} --archive {missing}", 2, "{missing}"),
    case("backup-no-source", "backup", "web01 {tmp}/nothing.img --archive {arc}", 2, "{tmp}/nothing.img"),
    case("backup-source-is-folder", "backup", "web01 {tmp} --archive {arc}", 2, "{tmp}"),
    case("backup-bad-qmp-url", "backup", "web01 qmp+unix://{tmp}/x.sock --archive {arc}", 2, "node"),
    case("backup-qmp-socket-absent", "backup", "web01 qmp+unix://{tmp}/no-qmp.sock?node=drive0 --archive {arc}", 1,
         "{tmp}/no-qmp.sock"),
    case("backup-bad-libvirt-url", "backup", "web01 libvirt:///dom --archive {arc}", 2, "disk"),
    case("backup-bad-vsphere-url", "backup", "web01 vsphere://127.0.0.1:1/DC0/vm/x --archive {arc}", 2, "disk=N"),
    case("backup-vsphere-no-user", "backup", "web01 vsphere://127.0.0.1:1/DC0/vm/x?disk=0 --archive {arc}", 2,
         "LIFEBOAT_VSPHERE_USER"),
    case("backup-server-down", "backup", "web01 {img} --archive {url}", 1, "127.0.0.1"),
    # points
    case("points-no-archive", "points", "web01 --archive {missing}", 2, "{missing}"),
    case("points-archive-is-a-file", "points", "web01 --archive {img}", 2, "{img}"),
    case("points-server-down", "points", "web01 --archive {url}", 1, "127.0.0.1"),
    case("points-s3-no-credentials", "points", "web01 --archive s3://bucket/prefix", 2, "no S3 credentials"),
    # restore
    case("restore-bad-selector", "restore", "web01@yesterday {tmp}/r1.img --archive {arc}", 2, "yesterday"),
    case("restore-unknown-machine", "restore", "db99 {tmp}/r2.img --archive {arc}", 2, "db99"),
    case("restore-dest-folder-absent", "restore", "web01 {tmp}/no/such/dir/r.img --archive {arc}", 2,
         "{tmp}/no/such/dir"),
    case("restore-dest-exists", "restore", "web01 {img} --archive {arc}", 2, "{img}"),
    case("restore-no-archive", "restore", "web01 {tmp}/r3.img --archive {missing}", 2, "{missing}"),
    # export
    case("export-bad-format", "export", "web01 {tmp}/e1.img --format qcow3 --archive {arc}", 2, "qcow3"),
    case("export-bad-selector", "export", "web01@someday {tmp}/e2.img --format raw --archive {arc}", 2, "someday"),
    case("export-no-archive", "export", "web01 {tmp}/e3.img --format raw --archive {missing}", 2, "{missing}"),
    case("export-adapter-on-raw", "export", "web01 {tmp}/e4.img --format raw --adapter-type ide --archive {arc}", 2,
         "--adapter-type"),
    case("export-dest-folder-absent", "export", "web01 {tmp}/no/such/e.qcow2 --format qcow2 --archive {arc}", 2,
         "{tmp}/no/such"),
    # serve
    case("serve-bad-listen", "serve", "web01 --listen nowhere --archive {arc}", 2, "--listen"),
    case("serve-port-busy", "serve", "web01 --listen {busy} --archive {arc}", 1, "{busy}"),
    case("serve-bad-cache-size", "serve", "web01 --cache-size lots --archive {arc}", 2, "lots"),
    case("serve-bad-pack-cache-size", "serve", "web01 --pack-cache-size huge --archive {arc}", 2, "huge"),
    case("serve-pack-cache-dir-absent", "serve", "web01 --pack-cache-dir {tmp}/nowhere --archive {arc}", 2, "nowhere"),
    case("serve-bad-selector", "serve", "web01@someday --archive {arc}", 2, "someday"),
    case("serve-unknown-machine", "serve", "db99 --archive {arc}", 2, "db99"),
    case("serve-no-archive", "serve", "web01 --archive {missing}", 2, "{missing}"),
    case("serve-tls-cert-absent", "serve", "web01 --tls-cert {tmp}/c.pem --tls-key {tmp}/k.pem --archive {arc}", 2,
         "{tmp}/c.pem"),
    # web
    case("web-bad-listen", "web", "--listen nowhere --token-file {token} --archive {arc}", 2, "--listen"),
    case("web-port-busy", "web", "--listen {busy} --token-file {token} --archive {arc}", 1, "{busy}"),
    case("web-no-archive", "web", "--listen 127.0.0.1:0 --token-file {token} --archive {missing}", 2, "{missing}"),
    case("web-beyond-loopback-without-tls", "web", "--listen 0.0.0.0:0 --token-file {token} --archive {arc}", 2,
         "--tls-cert"),
    case("web-cert-without-key", "web", "--tls-cert {token} --token-file {token} --archive {arc}", 2, "--tls-key"),
    case("web-bad-certificate", "web", "--tls-cert {token} --tls-key {token} --token-file {token} --archive {arc}",
         2, "TLS"),
    case("web-bad-rpo-objective", "web", "--rpo-objective soon --token-file {token} --archive {arc}", 2, "soon"),
    case("web-token-file-absent", "web", "--token-file {tmp}/no-token --archive {arc}", 2, "{tmp}/no-token"),
    case("web-state-is-a-file", "web", "--listen 127.0.0.1:0 --state {img} --archive {arc}", 2, "{img}"),
    case("web-viewer-token-is-the-operators", "web", "--token-file {token} --viewer-token-file {token} --archive {arc}",
         2, "--viewer-token-file"),
    case("web-runbooks-absent", "web", "--token-file {token} --runbooks {tmp}/no-runbooks --archive {arc}", 2,
         "{tmp}/no-runbooks"),
    case("web-protect-status-absent", "web", "--token-file {token} --protect-status {tmp}/no-status --archive {arc}",
         2, "{tmp}/no-status"),
    case("web-replica-absent", "web", "--token-file {token} --replica {missing} --archive {arc}", 2, "{missing}"),
    # verify, prune
    case("verify-no-archive", "verify", "--archive {missing}", 2, "{missing}"),
    case("verify-server-down", "verify", "--archive {url}", 1, "127.0.0.1"),
    case("prune-no-archive", "prune", "--dry-run --archive {missing}", 2, "{missing}"),
    # replicate
    case("replicate-bad-dest", "replicate", "--to ftp://example.org/x --archive {arc}", 2, "ftp"),
    case("replicate-dest-is-a-file", "replicate", "--to {img} --archive {arc}", 2, "{img}"),
    case("replicate-dest-other-archive", "replicate", "--to {other} --archive {arc}", 2, "another archive"),
    case("replicate-no-to", "replicate", "--archive {arc}", 2, "--to"),
    case("replicate-bad-bwlimit", "replicate", "--to {tmp}/rep1 --bwlimit fast --archive {arc}", 2, "fast"),
    case("replicate-unknown-machine", "replicate", "db99 --to {tmp}/rep2 --archive {arc}", 2, "db99"),
    case("replicate-no-archive", "replicate", "--to {tmp}/rep3 --archive {missing}", 2, "{missing}"),
    case("replicate-server-down", "replicate", "--to {url} --archive {arc}", 1, "127.0.0.1"),
    # protect
    case("protect-no-source", "protect", "web01 {tmp}/nothing.img --rpo 1 --archive {arc}", 2, "{tmp}/nothing.img"),
    case("protect-no-rpo", "protect", "web01 {img} --archive {arc}", 2, "--rpo"),
    case("protect-bad-metrics-listen", "protect", "web01 {img} --rpo 1 --metrics-listen nowhere --archive {arc}", 2,
         "--metrics-listen"),
    case("protect-stage-absent-runbook", "protect", "web01 {img} --rpo 1 --stage {tmp}/absent.yaml --archive {arc}", 2,
         "{tmp}/absent.yaml"),
    case("protect-no-archive", "protect", "web01 {img} --rpo 1 --archive {missing}", 2, "{missing}"),
    case("protect-no-index-with-a-value", "protect", "web01 {img} --rpo 1 --no-index=yes --archive {arc}", 2,
         "--no-index"),
    case("protect-bad-replicate-to", "protect", "web01 {img} --rpo 1 --replicate-to s3x://b --archive {arc}", 2,
         "s3x"),
    case("protect-bwlimit-alone", "protect", "web01 {img} --rpo 1 --replicate-bwlimit 1M --archive {arc}", 2,
         "--replicate-to"),
    case("protect-bad-bwlimit", "protect", "web01 {img} --rpo 1 --replicate-to {tmp}/r --replicate-bwlimit fast "
         "--archive {arc}", 2, "fast"),
    # runbooks
    case("run-malformed", "run", "{bad_rb}", 2, "{bad_rb}"),
    case("run-absent", "run", "{tmp}/absent.yaml", 2, "{tmp}/absent.yaml"),
    case("run-point-not-in-runbook", "run", "{rehearsal_rb} --point db09=db09@latest --dry-run", 2, "db09"),
    case("run-point-malformed", "run", "{rehearsal_rb} --point web01 --dry-run", 2, "NAME=MACHINE@WHEN"),
    case("run-point-bad-selector", "run", "{rehearsal_rb} --point web01=web01@someday --dry-run", 2, "someday"),
    case("run-point-twice", "run", "{rehearsal_rb} --point web01=web01 --point web01=web01@latest --dry-run", 2,
         "twice"),
    case("run-pxe-bmc-down", "run", "{pxe_rb} --state {tmp}/pxe-state --archive {arc}", 1, "{url} does not answer"),
    case("failover-no-yes", "failover", "{recovery_rb}", 2, "--yes"),
    case("failover-rehearsal", "failover", "{rehearsal_rb} --yes", 2, "rehearsal"),
    case("teardown-no-runs", "teardown", "{rehearsal_rb} --state {state}", 2, "no runs"),
    case("teardown-malformed", "teardown", "{bad_rb} --state {state}", 2, "{bad_rb}"),
    case("teardown-force-no-sweeping-target", "teardown", "{rehearsal_rb} --force --state {state}", 2, "by tag"),
    case("teardown-force-recovery-no-yes", "teardown", "{recovery_rb} --force --state {state}", 2, "add --yes"),
    case("stage-malformed", "stage", "{bad_rb}", 2, "{bad_rb}"),
    case("stage-absent", "stage", "{tmp}/absent.yaml --json", 2, "{tmp}/absent.yaml"),
    case("stage-nothing-stages-ahead", "stage", "{rehearsal_rb} --archive {arc}", 2, "stages ahead"),
    case("stage-no-archive", "stage", "{aws_rb} --archive {missing}", 2, "{missing}"),
    case("validate-malformed", "validate", "{bad_rb}", 2, "{bad_rb}"),
    case("validate-absent", "validate", "{tmp}/absent.yaml", 2, "{tmp}/absent.yaml"),
    case("runs-state-is-a-file", "runs", "--state {img}", 2, "{img}"),
    case("scheduler-absent-folder", "scheduler", "{tmp}/no-runbooks --once --state {state}", 2, "{tmp}/no-runbooks"),
    case("scheduler-units-into-a-file", "scheduler", "{tmp} --systemd-units {img} --state {state}", 2, "{img}"),
    # commands of a later version
    *(case("planned-" + name, name, "", 2, "not available in this version") for name in PLANNED),
    # files (every case is refused before an appliance boots)
    case("files-fs-unknown-machine", "files fs", "db99 --archive {arc}", 2, "db99"),
    case("files-fs-read-disk-unknown-machine", "files fs", "db99 --read-disk --archive {arc}", 2, "db99"),
    case("files-fs-read-disk-with-a-value", "files fs", "web01 --read-disk=yes --archive {arc}", 2, "--read-disk"),
    case("files-ls-bad-selector", "files ls", "web01@someday / --archive {arc}", 2, "someday"),
    case("files-ls-no-archive", "files ls", "web01 / --archive {missing}", 2, "{missing}"),
    case("files-ls-read-disk-unknown-machine", "files ls", "db99 / --read-disk --archive {arc}", 2, "db99"),
    case("files-ls-read-disk-with-a-value", "files ls", "web01 / --read-disk=yes --archive {arc}", 2, "--read-disk"),
    case("files-get-dest-exists", "files get", "web01 /etc/hostname {img} --archive {arc}", 2, "{img}"),
    case("files-get-dest-folder-absent", "files get", "web01 /etc/hostname {tmp}/no/such/f --archive {arc}", 2,
         "{tmp}/no/such"),
    case("files-find-unknown-machine", "files find", "db99 *.conf --archive {arc}", 2, "db99"),
    case("files-find-no-archive", "files find", "web01 *.conf --archive {missing}", 2, "{missing}"),
    case("files-index-unknown-machine", "files index", "db99 --archive {arc}", 2, "db99"),
    case("mount-unknown-machine", "mount", "db99 {tmp} --archive {arc}", 2, "db99"),
    case("mount-dir-absent", "mount", "web01 {tmp}/no-such-dir --archive {arc}", 2, "{tmp}/no-such-dir"),
    case("mount-dir-not-empty", "mount", "web01 {tmp} --archive {arc}", 2, "not an empty directory"),
    case("unknown-command", "restor", "", 2, "No such command"),
]


def leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path of every runnable command under ``group``, from the CLI's own command table."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        assert sub is not None, name
        if isinstance(sub, click.Group):
            yield from leaf_commands(sub, (*prefix, name))
        else:
            yield (*prefix, name)


def covered(command: tuple[str, ...]) -> bool:
    """Whether a case runs ``command`` (a planned command counts with any subcommand)."""
    return any(c.command == command or (c.command[0] in PLANNED and c.command[0] == command[0]) for c in CASES)


def test_every_command_has_a_bad_input_case() -> None:
    missing = [" ".join(c) for c in [*leaf_commands(cli), *CLI_MD] if not covered(c)]
    assert not missing, f"commands without a bad-input case here: {missing}"
    assert len({c.id for c in CASES}) == len(CASES)


# Exceptions that never reach a user: control flow inside one module.
INTERNAL = {
    "lifeboat.nbdserver.server._Hangup": "a client went away; the connection's task ends",
    "lifeboat.orchestrator.context.Interrupted": "SIGINT/SIGTERM between steps; Engine.run records it",
    "lifeboat.filerestore.helper.Refused": "runs under Debian's python3; sent as JSON, raised as a typed error there",
    "lifeboat.orchestrator.web.app.NeedLogin": "a page without a session; its handler answers 401 with the login form",
}


def test_every_error_class_derives_from_lifeboat_error() -> None:
    """So ``main`` prints its message with its exit status, never a traceback."""
    outside = []
    for info in pkgutil.walk_packages(lifeboat.__path__, "lifeboat."):
        if info.name == "lifeboat.__main__":  # importing it runs the CLI
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                if not issubclass(obj, LifeboatError) and f"{info.name}.{name}" not in INTERNAL:
                    outside.append(f"{info.name}.{name}")
    assert not outside, f"error classes outside lifeboat.plumbing.errors.LifeboatError: {outside}"


def free_port_refusing() -> socket.socket:
    """A bound TCP socket that does not listen: connections to its port are refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An archive holding web01, runbooks good and bad, a busy port and an address where nothing
    listens; the values ``{NAME}`` stands for in a case."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    img = tmp / "disk.img"
    img.write_bytes(os.urandom(100_000) + bytes(100_000))
    arc = tmp / "arc"
    for argv in (["archive", "init", "--chunk-size", "65536", "--archive", str(arc)],
                 ["backup", "web01", str(img), "--archive", str(arc)],
                 ["archive", "init", "--archive", str(tmp / "other")]):
        done = subprocess.run([*LIFEBOAT, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    (tmp / "token").write_text("secret-token\n")
    bad_rb = tmp / "bad.yaml"
    bad_rb.write_text(BASE.replace("settings: {memory_mib: 256}", "settings: {memory_mib: 256"))
    rehearsal_rb = tmp / "rehearsal.yaml"
    rehearsal_rb.write_text(BASE)
    recovery_rb = tmp / "recovery.yaml"  # a recovery runbook
    recovery_rb.write_text(base(**{"kind: rehearsal": "kind: recovery", "  driver: qemu": "  driver: kvm",
                                  "  settings: {memory_mib: 256}": "  settings: {}"}))
    aws_rb = tmp / "aws.yaml"
    aws_rb.write_text("version: 1\nname: a\nkind: rehearsal\ntarget: {driver: aws, settings: {region: eu-west-1}}\n"
                      "machines:\n  - name: web01\n")
    refusing, busy = free_port_refusing(), socket.socket()
    pxe_rb = tmp / "pxe.yaml"  # a server whose BMC does not answer
    pxe_rb.write_text(base(**{"kind: rehearsal": "kind: recovery", "  driver: qemu": "  driver: pxe",
                              "  settings: {memory_mib: 256}":
                              f"  settings: {{bmc: {{address: 'https://127.0.0.1:{refusing.getsockname()[1]}'}},"
                              " http_listen: '127.0.0.1:9', console_log: /dev/null}"}))
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    with refusing, busy:
        yield {
            "tmp": str(tmp),
            "img": str(img),
            "arc": str(arc),
            "missing": str(tmp / "no-archive"),
            "other": str(tmp / "other"),
            "token": str(tmp / "token"),
            "bad_rb": str(bad_rb),
            "rehearsal_rb": str(rehearsal_rb),
            "recovery_rb": str(recovery_rb),
            "aws_rb": str(aws_rb),
            "pxe_rb": str(pxe_rb),
            "state": str(tmp / "state"),
            "url": f"https://127.0.0.1:{refusing.getsockname()[1]}",
            "busy": f"127.0.0.1:{busy.getsockname()[1]}",
        }


@pytest.fixture(scope="module")
def results(workspace: dict[str, str]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every case run once, in parallel."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFEBOAT_")}
    env["LIFEBOAT_STATE_DIR"] = workspace["state"]
    env["LIFEBOAT_ARCHIVE_RETRY_SECONDS"] = "1"  # an archive server that is down: give up soon

    def one(c: Case) -> subprocess.CompletedProcess[str]:
        argv = [*LIFEBOAT, *c.command, *(a.format(**workspace) for a in c.args)]
        try:
            return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=workspace["tmp"],
                                  stdin=subprocess.DEVNULL, timeout=30)
        except subprocess.TimeoutExpired as e:  # a command that waits instead of refusing: its case fails
            return subprocess.CompletedProcess(argv, -1, "", f"still running after 30 s: {e.stderr!r}")

    with ThreadPoolExecutor(max_workers=6) as pool:
        return dict(zip((c.id for c in CASES), pool.map(one, CASES), strict=True))


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_with_a_message_and_no_traceback(
    c: Case, results: dict[str, subprocess.CompletedProcess[str]], workspace: dict[str, str]
) -> None:
    done = results[c.id]
    shown = f"lifeboat {' '.join(done.args[len(LIFEBOAT):])}\nstatus {done.returncode}\nstderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr, shown
    assert done.returncode == c.status, shown
    assert c.says.format(**workspace) in done.stderr, shown
