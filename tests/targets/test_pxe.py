"""The pxe target beyond the driver suite (which restores the sample guest onto a larger disk and
boots it, ``test_conformance.py``): the recovery environment's disk rule run by busybox against a
fake ``/sys/block``, the extent map and the grown MBR on the sample guest's image, the recovery
environment's content, the partition (and file system) the orchestrator plans to grow, the shipped
p2p runbook's restore of a point whose last partition is ext4 (grown with its file system), and
the errors with the real BMC emulator: wrong credentials, a BMC that does not answer, a server
that never netboots, a failure reported by the environment."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import inspect
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from examples.sample_guest import (
    IMAGE_SIZE,
    PARTITION2_OFFSET,
    PARTITION2_START_SECTOR,
    MiB,
    copy_image,
    read_record,
    set_kernel_args,
)
from lifeboat.plumbing.proc import process_matches
from lifeboat.targets import TARGETS, pxeenv, pxegrow, pxeinstant
from lifeboat.targets.base import Disk, Guest, MemoryLog, NetworkSpec, TargetContext
from lifeboat.targets.bmc import BmcError
from lifeboat.targets.pxe import IPXE_SCRIPT, PxeTarget, RestoreFailed
from lifeboat.targets.pxeserve import SECTOR, extents, grown_mbr, tables
from tests.targets.pxeserver import BRIDGE, DISK_BYTES, DOMAIN, HOST_IP, SUBNET, PxeServer
from tests.targets.realpeers import REPO, lifeboat, qemu_processes

GiB = 1024**3


def choose(tmp_path: Path, disks: dict[str, tuple[int, str]], need: int, path: str = "", serial: str = "",
           size: str = "") -> tuple[int, str]:  # fmt: skip
    """Run the environment's ``choose_disk`` with busybox over a fake /sys/block of ``disks``
    (name: (bytes, serial)); (exit status, output)."""
    root = tmp_path / "block"
    for name, (nbytes, ser) in disks.items():
        (root / name / "device").mkdir(parents=True)
        (root / name / "size").write_text(f"{nbytes // 512}\n")
        if ser:
            (root / name / "serial").write_text(ser + "\n")
    script = tmp_path / "choose.sh"
    script.write_text(pxeenv.CHOOSE_DISK + 'choose_disk "$@"\n')
    done = subprocess.run(
        [str(pxeenv.BUSYBOX), "sh", str(script), str(root), str(need), path, serial, size],
        capture_output=True,
        text=True,
    )
    return done.returncode, done.stdout.strip()


def test_the_disk_rule_chooses_by_path_serial_or_size_and_refuses_a_smaller_disk(tmp_path: Path) -> None:
    disks = {"sda": (100 * GiB, "S1"), "sdb": (20 * GiB, "S2"), "nvme0n1": (50 * GiB, ""), "loop0": (GiB, "")}
    assert choose(tmp_path / "a", disks, 10 * GiB, path="/dev/sdb") == (0, f"sdb {20 * GiB}")
    assert choose(tmp_path / "b", disks, 10 * GiB, serial="S1") == (0, f"sda {100 * GiB}")
    assert choose(tmp_path / "c", disks, 10 * GiB, size="smallest") == (0, f"sdb {20 * GiB}")
    assert choose(tmp_path / "d", disks, 30 * GiB, size="smallest") == (0, f"nvme0n1 {50 * GiB}")
    assert choose(tmp_path / "e", disks, 10 * GiB, size="largest") == (0, f"sda {100 * GiB}")
    rc, out = choose(tmp_path / "f", disks, 30 * GiB, path="/dev/sdb")
    assert rc == 1 and out == f"disk /dev/sdb ({20 * GiB} bytes) is smaller than the point ({30 * GiB} bytes)"
    rc, out = choose(tmp_path / "g", disks, 10 * GiB, serial="NOPE")
    assert rc == 1 and "no disk matches the rule" in out and "serial=NOPE" in out
    assert "/dev/sda (107374182400 bytes, serial S1)" in out and "loop0" not in out
    rc, out = choose(tmp_path / "h", disks, 200 * GiB, size="largest")
    assert rc == 1 and "no disk matches the rule" in out


def test_extents_cover_the_image_once_and_the_mbr_grows_its_last_partition(
    tmp_path: Path, sample_guest_image: Path
) -> None:
    image = copy_image(sample_guest_image, tmp_path / "guest.img")
    runs = extents(image)
    pos = SECTOR
    for _kind, off, length in runs:
        assert off == pos and length > 0
        pos += length
    assert pos == IMAGE_SIZE
    with open(image, "rb") as f:  # what the environment writes as zeros is zeros in the image
        for _kind, off, length in (r for r in runs if r[0] == "zero"):
            assert not os.pread(f.fileno(), length, off).strip(b"\0"), off
        sector = os.pread(f.fileno(), SECTOR, 0)

    def partition(mbr: bytes, i: int) -> tuple[int, int]:
        start, count = struct.unpack_from("<II", mbr, 446 + 16 * i + 8)
        return start, count

    assert grown_mbr(sector, IMAGE_SIZE, IMAGE_SIZE) == sector
    grown = grown_mbr(sector, IMAGE_SIZE, 4 * IMAGE_SIZE)
    assert tables(image, 4 * IMAGE_SIZE) == [(0, grown)]  # what the server serves for an MBR image
    assert partition(grown, 0) == partition(sector, 0)
    start, count = partition(grown, 1)
    old_end = sum(partition(sector, 1))
    assert start == PARTITION2_START_SECTOR and start + count == 4 * IMAGE_SIZE // SECTOR - (
        IMAGE_SIZE // SECTOR - old_end
    )
    assert grown[:446] == sector[:446] and grown[510:] == sector[510:]
    gpt = bytearray(sector)
    gpt[446 + 4] = 0xEE
    assert grown_mbr(bytes(gpt), IMAGE_SIZE, 4 * IMAGE_SIZE) == bytes(gpt)  # a GPT is left as is
    assert read_record(image) == (0, "sample-guest")


def sgdisk(*args: str) -> str:
    done = subprocess.run(["sgdisk", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_gpt_image_on_a_larger_disk_moves_its_backup_to_the_end_and_grows_its_last_partition(
    tmp_path: Path,
) -> None:
    """A GPT image (made by sgdisk: an EFI partition and a last one up to the end) written onto a
    disk four times larger with the pieces the server serves over it: ``sgdisk -v`` finds no problem
    (it finds the backup header misplaced without them), the last partition ends at the disk's last
    usable sector, the first is unchanged; a disk of the image's size gets the image's first sector."""
    image, disk = tmp_path / "gpt.img", tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    sgdisk("-n", "1:2048:+4M", "-t", "1:ef00", "-n", "2:0:0", "-t", "2:8300", str(image))
    assert "Last sector: 32734 " in sgdisk("-i", "2", str(image))  # 32768 sectors less the 34 of the backup
    disk.write_bytes(image.read_bytes())
    os.truncate(disk, 64 * 1024 * 1024)
    assert "Problem: The secondary header's self-pointer" in sgdisk("-v", str(disk))
    pieces = tables(image, disk.stat().st_size)
    assert pieces[-1][0] == 0  # the first sector last
    with open(disk, "r+b") as f:
        for offset, data in pieces:
            os.pwrite(f.fileno(), data, offset)
    assert "No problems found" in sgdisk("-v", str(disk))
    assert "Last sector: 131038 " in sgdisk("-i", "2", str(disk))  # 131072 sectors less 34
    assert "Last sector: 10239 " in sgdisk("-i", "1", str(disk))
    with open(image, "rb") as f:
        assert tables(image, image.stat().st_size) == [(0, f.read(SECTOR))]


def test_the_recovery_environment_is_built_once_with_its_drivers() -> None:
    env = pxeenv.build()
    assert pxeenv.build() == env and env.kernel.stat().st_size > 1_000_000
    cpio = gzip.decompress(env.initrd.read_bytes())
    for name in (b"init", b"lib/choose-disk.sh", b"lib/dhcp.sh", b"bin/busybox", b"virtio_net.ko", b"nvme.ko"):
        assert name in cpio, name


PARTITION3_START_SECTOR = 192 * MiB // SECTOR  # the ext4 point's third partition: to the image's end
KNOWN = random.Random(13).randbytes(300_000)  # the file it holds


def mbr_entry(image: Path, index: int) -> tuple[int, int, int]:
    """(type, start sector, sectors) of MBR entry ``index`` (0-3) of a disk image."""
    with open(image, "rb") as f:
        kind, start, count = struct.unpack_from("<4xB3xII", os.pread(f.fileno(), SECTOR, 0), 446 + 16 * index)
    return kind, start, count


def ext4_point(sample_guest_image: Path) -> Path:
    """The sample guest (set to stay up) with its partition 2 shortened and a third partition, ext4
    (``mkfs.ext4 -d``) holding ``/known.bin``, up to the image's end: its last partition grows onto
    a larger disk, with its file system. Built once per content under ~/.cache/lifeboat/pxe-test
(``LIFEBOAT_CACHE`` overrides the base)."""
    key = hashlib.sha256((sample_guest_image.name + inspect.getsource(ext4_point)).encode()).hexdigest()[:16]
    cached = pxeenv.cache_dir().parent / "pxe-test" / f"ext4-point-{key}.img"
    if cached.exists():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    work = cached.parent / f".tmp-{os.getpid()}"
    work.mkdir(exist_ok=True)
    image = copy_image(sample_guest_image, work / "point.img")
    set_kernel_args(image, "lifeboat.stay=1")
    (work / "files").mkdir(exist_ok=True)
    (work / "files" / "known.bin").write_bytes(KNOWN)
    with open(image, "r+b") as f:
        mbr = bytearray(os.pread(f.fileno(), SECTOR, 0))
        struct.pack_into("<I", mbr, 446 + 16 + 12, PARTITION3_START_SECTOR - PARTITION2_START_SECTOR)
        struct.pack_into("<B3sB3sII", mbr, 446 + 32, 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                         PARTITION3_START_SECTOR, (IMAGE_SIZE // SECTOR) - PARTITION3_START_SECTOR)  # fmt: skip
        os.pwrite(f.fileno(), bytes(mbr), 0)
    size = IMAGE_SIZE - PARTITION3_START_SECTOR * SECTOR
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={PARTITION3_START_SECTOR * SECTOR}", "-d",
                    str(work / "files"), str(image), f"{size // 1024}k"], check=True)  # fmt: skip
    os.replace(image, cached)
    shutil.rmtree(work)
    return cached


def test_the_orchestrator_names_the_partition_that_grows_and_its_file_system(
    tmp_path: Path, sample_guest_image: Path
) -> None:
    """``pxegrow.plan`` on the ext4 point (MBR, partition 3), the sample guest (its raw partition 2),
    a point whose last partition stops short, GPT points with ext4 and ext2 in their last partition
    and one with xfs's magic; the growth archive carries e2fsprogs with their libraries."""
    point = ext4_point(sample_guest_image)
    assert read_record(point) == (0, "sample-guest")
    assert pxegrow.plan(point) == {"GROW_PART": "3", "GROW_FS": "ext4"}
    assert pxegrow.plan(sample_guest_image) == {"GROW_PART": "2", "GROW_FS": "unknown"}
    short = copy_image(point, tmp_path / "short.img")
    with open(short, "r+b") as f:
        f.seek(446 + 32 + 12)
        f.write(struct.pack("<I", (IMAGE_SIZE // SECTOR) - PARTITION3_START_SECTOR - 4096))  # 2 MiB short
    assert pxegrow.plan(short) == {}
    gpt = tmp_path / "gpt.img"
    with open(gpt, "wb") as f:
        f.truncate(32 * MiB)
    sgdisk("-n", "1:2048:+4M", "-t", "1:ef00", "-n", "2:0:0", "-t", "2:8300", str(gpt))
    offset = 10240 * SECTOR
    for mkfs, fs in (("mkfs.ext4", "ext4"), ("mkfs.ext2", "ext2")):
        subprocess.run([mkfs, "-q", "-F", "-E", f"offset={offset}", str(gpt), "8M"], check=True)
        assert pxegrow.plan(gpt) == {"GROW_PART": "2", "GROW_FS": fs}
    with open(gpt, "r+b") as f:
        os.pwrite(f.fileno(), b"XFSB" + bytes(2048), offset)
    assert pxegrow.plan(gpt) == {"GROW_PART": "2", "GROW_FS": "xfs"}
    for script in (pxegrow.GROW_SCRIPT, pxeenv.INIT_SCRIPT):  # busybox's shell parses them
        assert subprocess.run([str(pxeenv.BUSYBOX), "sh", "-n", "-c", script]).returncode == 0
    grow = gzip.decompress(pxeenv.build().grow.read_bytes())
    for name in (b"bin/e2fsck", b"bin/resize2fs", b"libext2fs.so.2", b"lib/grow.sh"):
        assert name in grow, name
    assert b"bin/e2fsck" not in gzip.decompress(pxeenv.build().initrd.read_bytes())


def driver(server: PxeServer, **overrides: object) -> tuple[PxeTarget, Guest, MemoryLog, list[str]]:
    """The pxe driver for the session's server, found as the engine finds it, and what it logs."""
    settings = server.settings(**overrides)
    said: list[str] = []
    target = TARGETS.get("pxe").variant(settings)(settings, TargetContext(log=said.append))
    assert isinstance(target, PxeTarget)
    return (
        target,
        Guest("srv", "20260101T000000-abcdef", Path("/nonexistent"), NetworkSpec("none")),
        MemoryLog("pxe"),
        said,
    )


def test_the_driver_logs_the_growth_and_names_the_server_and_partition_when_it_fails(tmp_path: Path) -> None:
    """What the environment reports about growth (``grown`` events, a ``fail``), read by ``poll``
    from the events file as the serving process writes it (no netboot: the stage is past it and
    nothing asks the BMC, which does not exist, with ``on_failure: leave``)."""
    settings = {"bmc": {"address": "http://192.0.2.1:1", "system": "s", "user": "u", "password_file": "/nonexistent"},
                "disk": {"size": "smallest"}, "http_listen": "192.0.2.1:8080", "on_failure": "leave"}  # fmt: skip
    cases = {
        "ext4": ({"part": "3", "fs": "ext4", "bytes": "268435456", "resized": "yes"},
                 "srv: partition 3 grew to the disk's end and its ext4 file system with it (268435456 bytes)"),
        "xfs": ({"part": "2", "fs": "xfs", "resized": "no"},
                "srv: partition 2 grew to the disk's end, its file system (xfs) was not grown: lifeboat grows "
                "ext2/3/4 only"),
    }  # fmt: skip
    for name, (event, line) in cases.items():
        said: list[str] = []
        target = TARGETS.get("pxe").variant(settings)(settings, TargetContext(log=said.append))
        guest = Guest("srv", "20260101T000000-abcdef", tmp_path / name, NetworkSpec("none"))
        log = MemoryLog("pxe")
        log.record("power", "bmc", {"since": time.time(), "stage": "restore"})
        events = tmp_path / name / "pxe" / "events.jsonl"
        events.parent.mkdir(parents=True)
        events.write_text(json.dumps({"event": "grown", **event}) + "\n")
        target.poll(guest, log)
        target.poll(guest, log)
        assert said == [line]  # once
    reason = "resize2fs /dev/sda3 (partition 3) failed: resize2fs: No space left on device"
    with open(events, "a") as f:
        f.write(json.dumps({"event": "fail", "reason": reason}) + "\n")
    with pytest.raises(RestoreFailed) as e:
        target.poll(guest, log)
    assert str(e.value) == f"srv (server at BMC http://192.0.2.1:1): the recovery environment failed: {reason}"


def domstate() -> str:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", "domstate", DOMAIN], capture_output=True, text=True
    ).stdout.strip()


def test_a_bmc_that_refuses_the_credentials_or_does_not_answer_names_the_server(
    pxe_server: PxeServer, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    settings = pxe_server.settings()
    target, *_ = driver(pxe_server, bmc={**settings["bmc"], "password_file": str(wrong)})
    with pytest.raises(BmcError, match=r"^server at BMC http://127\.0\.0\.1:\d+, MAC .*refused the credentials") as e:
        target.prepare()
    assert e.value.exit_code == 1
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    target, *_ = driver(pxe_server, bmc={**settings["bmc"], "address": down})
    with pytest.raises(BmcError, match=f"the Redfish BMC at {down} does not answer"):
        target.prepare()
    target, *_ = driver(pxe_server, bmc={**settings["bmc"], "password_file": str(tmp_path / "absent")})
    with pytest.raises(BmcError, match="cannot read the BMC password file"):
        target.prepare()


def released(target: PxeTarget, log: MemoryLog, pids: list[int], token: str) -> bool:
    """Nothing is served any more: no process recorded, the recorded ones gone, the HTTP port free."""
    if any(r.kind == "process" for r in log.resources()) or any(process_matches(p, token) for p in pids):
        return False
    host, port = str(target.settings["http_listen"]).rsplit(":", 1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past its closed connections: no listener
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def test_a_server_that_never_netboots_or_fails_to_write_its_disk_is_powered_off_and_released(
    pxe_server: PxeServer, tmp_path: Path, sample_guest_image: Path
) -> None:
    """Two failures: no netboot at all (the site's DHCP gives no boot file and lifeboat runs none),
    and a real netboot whose environment cannot write the disk (read-only to the server). Each names
    the server, powers it off and stops what was served at once (a recovery run does not tear down)."""
    pxe_server.blank()
    image = copy_image(sample_guest_image, tmp_path / "point.raw")
    other = f"{HOST_IP}:{pxe_server.http_port + 1 if pxe_server.http_port < 65535 else 1024}"
    for case in ("never netboots", "write error"):
        work = tmp_path / case.replace(" ", "-")
        work.mkdir()
        if case == "never netboots":
            overrides: dict[str, object] = {"http_listen": other, "netboot_timeout": 0.5, "dhcp": {"mode": "none"}}
        else:
            overrides = {}
        target, guest, log, said = driver(pxe_server, **overrides)
        guest.workdir = work
        target.prepare()
        target.provision(guest, Disk(size=image.stat().st_size, image_path=image, image_format="raw"), log)
        pids = [int(r.data["pid"]) for r in log.resources() if r.kind == "process"]
        assert len(pids) == (1 if case == "never netboots" else 2)  # the HTTP server (and dnsmasq)
        with pxe_server.read_only_disk() if case == "write error" else contextlib.nullcontext():
            target.boot(guest, log)
            assert domstate() == "running"
            with pytest.raises(RestoreFailed) as e:
                deadline = time.monotonic() + 900
                while time.monotonic() < deadline:
                    time.sleep(0.6 if case == "never netboots" else 2)
                    target.poll(guest, log)
                    if case == "never netboots" and "attempt 2 of 2" in said[-1]:
                        assert domstate() == "running"  # the first share of the timeout is over: power-cycled
        message = str(e.value)
        assert message.startswith("srv (server at BMC http://127.0.0.1:") and "the server is powered off" in message
        if case == "never netboots":
            assert "did not netboot within 0.5 s in 2 attempt(s)" in message and "boot.ipxe" in message
            assert any("attempt 2 of 2" in line for line in said)
        else:
            assert re.search(r"the recovery environment failed: write error on /dev/vda at \d+: \S", message), message
        assert domstate() == "shut off" and e.value.exit_code == 1
        assert released(target, log, pids, guest.token)
        target.teardown(log)
        assert log.resources() == [] and not (work / "pxe").exists()
    with open(pxe_server.disk, "rb") as f, pytest.raises(OSError):  # nothing reached the disk: a hole throughout
        os.lseek(f.fileno(), 0, os.SEEK_DATA)


def test_the_shipped_p2p_runbook_restores_the_server_grows_its_ext4_file_system_and_its_health_checks_pass(
    pxe_server: PxeServer, sample_guest_image: Path, tmp_path: Path
) -> None:
    """``runbooks/p2p.yaml`` run by the engine (``lifeboat run``), its target pointed at this server
    and BMC and its health checks at the console: the rule ``size: smallest`` picks the only disk,
    larger than the point; the report says succeeded and the guest's write is on the server's disk.
    The point (``ext4_point``) ends with an ext4 partition: on the server's disk it reaches the
    disk's end, its file system is clean and as large, and its file reads back byte for byte."""
    pxe_server.blank()
    archive = tmp_path / "archive"
    lifeboat("archive", "init", "--archive", str(archive), check=True)
    lifeboat("backup", "sample-guest", str(ext4_point(sample_guest_image)), "--archive", str(archive), check=True)
    doc = yaml.safe_load((REPO / "runbooks" / "p2p.yaml").read_text())
    ours = pxe_server.settings()
    doc["target"]["settings"].update({k: ours[k] for k in ("mac", "bmc", "http_listen", "console_log", "dhcp")})
    doc["target"]["settings"]["netboot_timeout"] = 120  # two tries of a minute: a netboot takes ~25 s
    doc["target"]["settings"].pop("http_url")
    (machine,) = doc["machines"]
    machine.update({"name": "files02", "point": "sample-guest@latest", "rto_objective": "30m"})
    machine["health"] = [
        {"name": "restored and booted", "console": "LIFEBOAT-GUEST: booted", "timeout": "15m"},
        {"name": "alive", "console": "LIFEBOAT-GUEST: alive", "timeout": "2m"},
    ]
    rb = tmp_path / "p2p.yaml"
    rb.write_text(yaml.safe_dump(doc))
    done = lifeboat("run", str(rb), "--archive", str(archive), "--state", str(tmp_path / "state"), "--json")
    assert done.returncode == 0, done.stderr[-3000:] + pxe_server.console_text()[-3000:]
    out = json.loads(done.stdout)
    assert out["status"] == "succeeded", out
    assert "netbooted the recovery environment" in done.stderr and "restore complete" in done.stderr
    assert f"answering PXE on {BRIDGE} ({SUBNET}, proxy DHCP)" in done.stderr  # the network's DHCP gives no boot file
    part_bytes = DISK_BYTES - PARTITION3_START_SECTOR * SECTOR
    assert f"partition 3 grew to the disk's end and its ext4 file system with it ({part_bytes} bytes)" in done.stderr
    # a recovery never tears down: what served the restore stopped once the server booted its disk
    assert qemu_processes(str(tmp_path / "state")) == []
    pxe_server.power_off()  # teardown: never (a recovery) leaves the restored server running
    assert read_record(pxe_server.disk) == (1, "sample-guest")
    assert mbr_entry(pxe_server.disk, 2) == (0x83, PARTITION3_START_SECTOR, part_bytes // SECTOR)
    part = tmp_path / "partition3.raw"
    with open(pxe_server.disk, "rb") as src, open(part, "wb") as dst:
        src.seek(PARTITION3_START_SECTOR * SECTOR)
        while chunk := src.read(8 * MiB):
            dst.write(chunk)
    fsck = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    header = subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    assert int(fields["Block count"]) * int(fields["Block size"]) == part_bytes
    cat = subprocess.run(["debugfs", "-R", "cat /known.bin", str(part)], capture_output=True, check=True)
    assert cat.stdout == KNOWN


def boot_dev() -> str:
    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", DOMAIN], capture_output=True, text=True
    )
    return ",".join(re.findall(r"<boot dev='(\w+)'/>", xml.stdout))


def test_ipmi_sets_the_boot_device_and_the_power_and_refuses_a_wrong_password(
    pxe_server: PxeServer, ipmi_bmc: str, tmp_path: Path
) -> None:
    pxe_server.blank()
    settings = {**pxe_server.settings()["bmc"], "protocol": "ipmi", "address": ipmi_bmc}
    settings.pop("system")
    target, guest, log, _ = driver(pxe_server, bmc=settings)
    target.prepare()
    bmc = target.bmc(guest)
    assert bmc.power_state() == "off"
    bmc.set_next_boot("disk")
    bmc.set_next_boot("network")
    assert boot_dev() == "network"
    bmc.power_on()
    assert bmc.power_state() == "on" and domstate() == "running"
    bmc.power_off()
    assert bmc.power_state() == "off" and domstate() == "shut off"
    bmc.set_next_boot("disk")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    target, *_ = driver(pxe_server, bmc={**settings, "password_file": str(wrong)})
    with pytest.raises(BmcError, match=f"the IPMI BMC at {ipmi_bmc} refused the credentials"):
        target.prepare()


def test_instant_mode_has_its_own_archive_and_parts_from_the_points_mbr_and_refuses_a_broken_gpt(
    tmp_path: Path, sample_guest_image: Path
) -> None:
    image = copy_image(sample_guest_image, tmp_path / "guest.img")
    env = pxeenv.build()  # instant mode's tools and modules come in a second archive
    addon = gzip.decompress(env.instant.read_bytes())
    for name in (b"lib/instant.sh", b"bin/nbd-client", b"bin/dmsetup", b"libgnutls", b"dm_mirror.ko", b"vfat.ko"):
        assert name in addon, name
    assert b"bin/nbd-client" not in gzip.decompress(env.initrd.read_bytes())
    assert b"virtio_net.ko" not in addon  # in the environment's archive already
    script = IPXE_SCRIPT.format(server="s", url="http://h:1", console="ttyS0")
    ipxe = pxeenv.with_archive(script, "http://h:1", "instant.gz")
    assert "initrd=initrd.gz initrd=instant.gz" in ipxe and "initrd http://h:1/instant.gz\nboot\n" in ipxe
    parts, boot = pxeinstant.partitions(image)
    p2 = f"2:{PARTITION2_START_SECTOR}:{(IMAGE_SIZE - PARTITION2_OFFSET) // SECTOR}"
    assert parts == f"1:2048:{PARTITION2_START_SECTOR - 2048} {p2}" and boot == 1
    with open(image, "r+b") as f:
        f.seek(446 + 4)
        f.write(b"\xee")
    with pytest.raises(pxeinstant.TargetError, match="a protective MBR but no valid GPT"):
        pxeinstant.partitions(image)
    with open(image, "r+b") as f:
        f.seek(446 + 4)
        f.write(b"\x83")
    os.truncate(image, IMAGE_SIZE - MiB)
    with pytest.raises(pxeinstant.TargetError, match="cannot map partition 2 of the point guest.img: it ends at"):
        pxeinstant.partitions(image)


def sgdisk_partitions(image: Path) -> str:
    """``PARTS`` as sgdisk reports the partitions of ``image`` (``-p``: number, start, end)."""
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s", sgdisk("-p", str(image)), re.M)
    return " ".join(f"{n}:{start}:{int(end) - int(start) + 1}" for n, start, end in rows)


def test_instant_mode_maps_the_partitions_of_a_gpt_point_as_sgdisk_reports_them(tmp_path: Path) -> None:
    """A GPT point made by sgdisk (partitions 1, 3 and 5 out of order on the disk, a gap between
    them): the plan's partition maps equal what ``sgdisk -p`` reports; the boot partition is the
    legacy-BIOS-bootable one, else the EFI system partition, else the first."""
    image = tmp_path / "gpt.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    sgdisk("-n", "3:2048:+4M", "-t", "3:8300", "-n", "1:+1M:+8M", "-t", "1:ef00", "-n", "5:0:0", str(image))
    parts, boot = pxeinstant.partitions(image)
    assert parts == sgdisk_partitions(image) and len(parts.split()) == 3
    assert parts.startswith("1:") and boot == 1  # entry order, the EFI system partition
    sgdisk("-A", "5:set:2", str(image))  # legacy BIOS bootable
    assert pxeinstant.partitions(image) == (parts, 5)
    sgdisk("-t", "1:8300", "-A", "5:clear:2", str(image))
    assert pxeinstant.partitions(image) == (parts, 1)


def processes_naming(path: Path) -> list[str]:
    """Command lines of the processes that name a path under ``path``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) + "/" in cmdline:
            found.append(cmdline)
    return found


def test_instant_mode_boots_the_guest_from_nbd_fills_the_disk_then_it_boots_from_the_disk_alone(
    pxe_server: PxeServer, sample_guest_image: Path, tmp_path: Path
) -> None:
    """One netboot with ``restore: instant``, run by the engine (``lifeboat run``, the p2p runbook):
    the restored guest prints its boot line (the health check) and writes its record while its
    disk is still filling (through the mirror: to the local disk and the run's NBD overlay); the
    localize step waits for the fill and the switch-over to the local disk, which then equals the
    point but for the guest's record; powered off and on (next boot: disk, nothing served any
    more), the server boots the restored guest from its local disk."""
    pxe_server.blank()
    point = copy_image(sample_guest_image, tmp_path / "guest.img")
    set_kernel_args(point, "lifeboat.stay=1")  # a system that keeps running while its disk fills
    archive = tmp_path / "archive"
    lifeboat("archive", "init", "--archive", str(archive), check=True)
    lifeboat("backup", "sample-guest", str(point), "--archive", str(archive), check=True)
    doc = yaml.safe_load((REPO / "runbooks" / "p2p.yaml").read_text())
    ours = pxe_server.settings()
    doc["target"]["settings"].update({k: ours[k] for k in ("mac", "bmc", "http_listen", "console_log", "dhcp")})
    doc["target"]["settings"].update({"restore": "instant", "netboot_timeout": 300})
    doc["target"]["settings"].pop("http_url")
    (machine,) = doc["machines"]
    machine.update({"name": "files02", "point": "sample-guest@latest", "rto_objective": "30m"})
    machine["health"] = [{"name": "booted", "console": "LIFEBOAT-GUEST: booted", "timeout": "15m"}]
    rb = tmp_path / "p2p.yaml"
    rb.write_text(yaml.safe_dump(doc))
    done = lifeboat("run", str(rb), "--archive", str(archive), "--state", str(tmp_path / "state"), "--json",
                    timeout=1500)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + pxe_server.console_text()[-3000:]
    assert json.loads(done.stdout)["status"] == "succeeded", done.stdout
    assert "the restored system starts from NBD" in done.stderr and "the disk is filled" in done.stderr
    lines = [line.strip() for line in pxe_server.console_text().splitlines()]
    assert "LIFEBOAT-GUEST: disk-record 0 sample-guest" in lines and "LIFEBOAT-GUEST: disk-write-ok 1" in lines
    filled = next(i for i, line in enumerate(lines) if "LIFEBOAT-RESCUE: instant-complete" in line)
    assert lines.index("LIFEBOAT-GUEST: booted") < filled  # the guest ran before its disk was filled
    assert not processes_naming(tmp_path)  # nothing served any more (HTTP, NBD)
    pxe_server.power_off()  # teardown: never (a recovery) leaves the restored server running
    with open(point, "rb") as a, open(pxe_server.disk, "rb") as b:
        image, disk = a.read(), b.read(IMAGE_SIZE)
    record = slice(PARTITION2_OFFSET, PARTITION2_OFFSET + SECTOR)
    assert read_record(disk[record]) == (1, "sample-guest") and read_record(image[record]) == (0, "sample-guest")
    assert image[: record.start] == disk[: record.start] and image[record.stop :] == disk[record.stop :]
    target, *_ = driver(pxe_server)
    offset = len(pxe_server.console_text())
    target.bmc().power_on()
    deadline = time.monotonic() + 600
    while "LIFEBOAT-GUEST: disk-write-ok 2" not in pxe_server.console_text()[offset:]:
        assert time.monotonic() < deadline, pxe_server.console_text()[-3000:]
        time.sleep(1)
    assert "LIFEBOAT-RESCUE" not in pxe_server.console_text()[offset:]  # from its disk, not netbooted
    pxe_server.power_off()
    assert read_record(pxe_server.disk) == (2, "sample-guest")
