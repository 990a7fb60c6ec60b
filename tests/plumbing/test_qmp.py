"""The QMP client against a real QEMU monitor (qemu-storage-daemon: QEMU's block layer and QMP,
no guest): connecting while QEMU starts, results, refusals that keep the connection, a lost
connection, and giving up on a process that is gone."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifeboat.plumbing.qmp import QmpClient, QmpCommandError, QmpError


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """qemu-storage-daemon with a null block node ``disk0``; its QMP socket may not exist yet."""
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", "driver=null-co,node-name=disk0,size=1048576",
         "--chardev", f"socket,path={sock},server=on,wait=off,id=qmp0", "--monitor", "chardev=qmp0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield proc, sock
    finally:
        proc.kill()
        proc.wait()


def test_commands_and_refusals(daemon: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = daemon
    with QmpClient(str(sock), wait=60, alive=lambda: proc.poll() is None) as qmp:
        nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes", flat=True)}
        assert nodes["disk0"]["image"]["virtual-size"] == 1048576
        with pytest.raises(QmpCommandError, match=r"blockdev-del failed: .*nonexistent"):
            qmp.cmd("blockdev-del", **{"node-name": "nonexistent"})
        assert qmp.cmd("query-block-jobs") == []  # a refusal leaves the connection usable


def test_a_lost_connection_is_a_qmp_error(daemon: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = daemon
    qmp = QmpClient(str(sock), wait=60, alive=lambda: proc.poll() is None)
    proc.kill()
    proc.wait()
    with pytest.raises(QmpError) as e:
        qmp.cmd("query-block-jobs")
    assert not isinstance(e.value, QmpCommandError) and e.value.exit_code == 1
    with pytest.raises(QmpError, match="closed"):  # the client closed itself: connect again
        qmp.cmd("query-block-jobs")


def test_no_socket(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match="cannot connect to QMP at"):
        QmpClient(str(tmp_path / "none.sock"))
    # a process that is gone ends the wait at once, however long it was allowed to be
    with pytest.raises(QmpError, match="cannot connect to QMP at"):
        QmpClient(str(tmp_path / "none.sock"), wait=3600, alive=lambda: False)
