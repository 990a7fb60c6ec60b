"""The sample guest running under QEMU with a QMP socket and its disk workload, for the agent tests.

The guest (``examples/sample_guest.py``, kernel arguments ``lifeboat.stay=1 lifeboat.workload=1``)
writes numbered 4 KiB records to partition 2 and prints ``wrote N`` once each is durable. The
console reader stamps every line with the host's wall clock, so a point taken at time T must hold
every record whose ``wrote`` line arrived before T, and records form a gap-free prefix 1..M.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from examples import sample_guest as sg
from lifeboat.plumbing.qmp import QmpClient, QmpError

RECORDS_OFFSET = sg.PARTITION2_OFFSET + 1024 * 1024
RECORD_SIZE = 4096
PREFIX = sg.CONSOLE_PREFIX
LIBVIRT_URI = "qemu:///system"


@dataclass
class Console:
    """Guest console lines with the host time (UNIX seconds) each arrived, over every boot."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def writes(self, before: float = float("inf")) -> dict[int, int]:
        """Boot -> highest record number reported durable before ``before``."""
        out: dict[int, int] = {}
        with self.cond:
            for at, text in self.lines:
                parts = text.split()
                if at < before and len(parts) == 3 and parts[0] == "wrote":
                    n, boot = int(parts[1]), int(parts[2])
                    out[boot] = max(out.get(boot, 0), n)
        return out

    def wrote_max(self) -> int:
        """The highest record number reported by the newest boot."""
        w = self.writes()
        return w[max(w)] if w else 0


class Guest:
    """One QEMU process running the sample guest from a qcow2 copy of its image."""

    def __init__(self, disk: Path, workdir: Path, *, fmt: str = "qcow2") -> None:
        self.disk = disk
        self.workdir = workdir
        self.fmt = fmt
        self.qmp_path = workdir / "qmp.sock"  # the agent's monitor
        self.ctl_path = workdir / "ctl.sock"  # the tests' own, usable while a capture holds the agent's
        self.proc: subprocess.Popen[bytes] | None = None
        self.console = Console()
        self.boots = 0

    @property
    def spec(self) -> str:
        """The agent's SOURCE for this guest's disk (a drive id, resolved to its node)."""
        return f"qmp+unix://{self.qmp_path}?node=virtio0"

    def start(self, timeout: float = 90) -> Guest:
        """Boot and wait until the workload of this boot has written its first records."""
        with self.console.cond:
            self.console.lines.append((time.time(), "starting"))
        for sock in (self.qmp_path, self.ctl_path):
            sock.unlink(missing_ok=True)
        cmd = sg.qemu_command(str(self.disk), fmt=self.fmt,
                              extra_args=["-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                                          "-qmp", f"unix:{self.ctl_path},server=on,wait=off"])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.boots += 1
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        self._wait(lambda: self._booted_and_wrote(3), timeout)
        return self

    def _booted_and_wrote(self, n: int) -> bool:
        with self.console.cond:
            last_start = max(i for i, (_, t) in enumerate(self.console.lines) if t == "starting")
            return any(t.startswith("wrote ") and int(t.split()[1]) >= n for _, t in self.console.lines[last_start:])

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "").strip()
            idx = line.find(PREFIX)
            if idx < 0:
                continue
            with self.console.cond:
                self.console.lines.append((time.time(), line[idx + len(PREFIX):].strip()))
                self.console.cond.notify_all()

    def wait_records(self, n: int, timeout: float = 60) -> None:
        """Wait until record ``n`` of the current boot is reported durable."""
        self._wait(lambda: self.console.wrote_max() >= n, timeout)

    def _wait(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.console.cond:
            while not done():
                left = deadline - time.monotonic()
                assert self.proc is not None
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"guest workload stalled: {self.console.lines[-20:]}")
                self.console.cond.wait(min(left, 0.5))

    def kill(self) -> None:
        """SIGKILL, like a host crash for QEMU (persistent bitmaps are left marked in use)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def quit(self) -> None:
        """Clean QEMU exit through QMP (persistent bitmaps are saved)."""
        if self.proc and self.proc.poll() is None:
            # QEMU closes the socket as it quits: the command's reply may never come
            with QmpClient(str(self.ctl_path)) as q, contextlib.suppress(QmpError):
                q.cmd("quit")
            self.proc.wait(timeout=30)

    def qmp(self, command: str, **args: object) -> object:
        """One QMP command on a connection of its own."""
        with QmpClient(str(self.ctl_path)) as q:
            return q.cmd(command, **args)


class Domain:
    """A persistent domain booting the sample guest from a qcow2 disk, its console tailed."""

    def __init__(self, image: Path) -> None:
        import libvirt

        self.dir = Path(tempfile.mkdtemp(prefix="lifeboat-agent-libvirt-", dir="/var/tmp"))
        self.dir.chmod(0o755)  # the domain's QEMU runs as its own user
        self.disk = make_disk(image, self.dir)
        self.console_file = self.dir / "console.log"
        self.name = f"lifeboat-agent-test-{secrets.token_hex(4)}"
        self.console = Console()
        self.conn = libvirt.open(LIBVIRT_URI)
        xml = f"""<domain type='qemu'><name>{self.name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{self.disk}'/>
<target dev='vda' bus='virtio'/></disk>
<serial type='file'><source path='{self.console_file}'/></serial></devices></domain>"""
        self.dom = self.conn.defineXML(xml)
        self.dom.create()
        self._stop = threading.Event()
        threading.Thread(target=self._tail, daemon=True).start()
        self.wait_records(3, 90)

    @property
    def spec(self) -> str:
        return f"libvirt:///{self.name}?disk=vda&uri={LIBVIRT_URI}"

    def _tail(self) -> None:
        pos = 0
        pending = ""
        while not self._stop.wait(0.05):
            try:
                with open(self.console_file, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except OSError:
                continue
            pos += len(data)
            pending += data.decode(errors="replace").replace("\r", "")
            *done, pending = pending.split("\n")
            now = time.time()
            with self.console.cond:
                for line in done:
                    if "LIFEBOAT-GUEST: " in line:
                        self.console.lines.append((now, line.split("LIFEBOAT-GUEST: ", 1)[1].strip()))
                self.console.cond.notify_all()

    def wait_records(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.console.wrote_max() < n:
            assert time.monotonic() < deadline, f"guest wrote no record {n}: {self.console.lines[-10:]}"
            time.sleep(0.1)

    def close(self) -> None:
        import libvirt

        self._stop.set()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        self.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def make_disk(image: Path, workdir: Path, *, workload_ms: int = 100, fmt: str = "qcow2") -> Path:
    """A copy of the sample image set to stay up with the workload, as qcow2 (or raw)."""
    raw = sg.copy_image(image, workdir / "disk.raw")
    sg.set_kernel_args(raw, f"lifeboat.stay=1 lifeboat.workload=1 lifeboat.workload_ms={workload_ms}")
    if fmt == "raw":
        return raw
    out = workdir / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
    raw.unlink()
    return out


def records(reader: Callable[[int, int], bytes], size: int) -> list[tuple[int, int]]:
    """(record number, boot) in consecutive slots from the start (stops at the first empty slot)."""
    found = []
    slot = 0
    while RECORDS_OFFSET + (slot + 1) * RECORD_SIZE <= size:
        block = reader(RECORDS_OFFSET + slot * RECORD_SIZE, RECORD_SIZE)
        if not block.startswith(b"LBWORK "):
            assert block[:64].strip(b"\0") == b"", f"slot {slot} holds garbage {block[:40]!r}"
            break
        parts = block.split(b" ", 3)
        found.append((int(parts[1]), int(parts[2])))
        slot += 1
    return found


def check_point(restored: Path, point_time: str, console: Console) -> int:
    """Assert a restored disk is a state the guest really had at the point's time.

    Slot i holds record i+1 of some boot; the newest boot's records are a gap-free prefix; that
    prefix holds every record that boot reported durable before the point, and none it never
    wrote. Returns the number of records of the newest boot in the point.
    """
    size = restored.stat().st_size
    with open(restored, "rb") as f:
        def read(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)
        found = records(read, size)
    counter, text = sg.read_record(restored)
    assert counter >= 1 and text == "sample-guest", (counter, text)
    assert [n for n, _ in found] == list(range(1, len(found) + 1)), f"slots out of order: {found[:8]}"
    frozen = datetime.fromisoformat(point_time).timestamp()
    before = console.writes(frozen)
    newest_before = max(before) if before else None
    if not found:
        assert not before, f"point of {point_time} holds no record, but the guest had written {before}"
        return 0
    boot = found[0][1]
    m = 0
    while m < len(found) and found[m][1] == boot:
        m += 1
    assert all(b != boot for _, b in found[m:]), f"records of boot {boot} are not a prefix: {found}"
    assert counter >= boot, f"boot record {counter} is older than the workload's boot {boot}"
    if newest_before is not None and boot < newest_before:
        raise AssertionError(f"point of {point_time} holds boot {boot}, but boot {newest_before} had written "
                             f"{before[newest_before]} records before it")
    assert m >= before.get(boot, 0), f"point of {point_time} misses record {before.get(boot)} written before it"
    assert m <= console.writes().get(boot, 0) + 1, f"point holds record {m} of boot {boot}, never reported"
    return m
