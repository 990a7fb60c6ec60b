"""VMware benchmark: bringing a point up as a vSphere VM with lifeboat's vmware target against
``qemu-img convert`` plus a plain upload, on govmomi's vCenter simulator, in one run.

What is measured, on the cached ext4 image of ``common.realistic_image`` (2.5 GiB, ~71 % real
files), backed up once into a fresh archive outside the timing:

- lifeboat: what the engine does for a ``vmware`` target: the point written by the ``raw``
  exporter straight from the archive, then ``VmwareTarget.provision`` (the disk uploaded to the
  datastore as a flat VMDK + descriptor, ``CreateVM_Task``) and ``boot`` (``PowerOnVM_Task``,
  waiting for the power state);
- peer: what an operator does by hand: the point restored to a raw file (``lifeboat restore``,
  timed as its own phase), ``qemu-img convert -f raw -O vmdk -o subformat=monolithicFlat`` (the
  same two files ESXi keeps), both uploaded with ``curl -T`` over the datastore's HTTP access (the
  session cookie, the CA checked), then the same ``CreateVM_Task`` and ``PowerOnVM_Task`` through
  pyvmomi. Two ratios are printed: against the whole peer (from the archive, as lifeboat starts),
  and against the peer without its restore (an operator who already holds a raw image).

The simulator runs on this host (loopback https, its datastore a folder under /tmp), so the upload
costs what TLS and one disk write cost here, not a network. Page cache warm (the archive's packs
read once before each step; a shared machine's cache is not dropped). The two tools alternate, the order
rotated from run to run; each figure is the median of ``--runs`` runs. Each VM is removed after its
run, outside the timing.

Usage::

    .venv/bin/python bench/vmware_bench.py [--runs 3] [--size-gib 2.5] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import BENCH_DIR, machine_info, realistic_image, run, warm  # noqa: E402

from lifeboat.archive import Archive  # noqa: E402
from lifeboat.archive.restore import restore  # noqa: E402
from lifeboat.exporters import EXPORTERS  # noqa: E402
from lifeboat.targets.base import Disk, Guest, MemoryLog, NetworkSpec, TargetContext  # noqa: E402
from lifeboat.targets.vmware import VmwareTarget  # noqa: E402
from tests.vcsim import DATACENTER, DATASTORE, VCenter, start  # noqa: E402


def lifeboat_up(vc: VCenter, arc: Archive, point: Any, work: Path, n: int) -> tuple[dict[str, float], Any]:
    """Export raw from the archive, provision, boot: the phases' seconds, and what to tear down."""
    t0 = time.perf_counter()
    image = work / f"lifeboat-{n}.raw"
    EXPORTERS.get("raw")().write(arc.reader(point), image)
    t1 = time.perf_counter()
    target = VmwareTarget(vc.settings(memory_mib=256), TargetContext())
    guest = Guest("bench", f"20260101T000000-{n:06x}", work, NetworkSpec("none"))
    log = MemoryLog("vmware")
    target.provision(guest, Disk(point.size, image_path=image, image_format="raw"), log)
    t2 = time.perf_counter()
    target.boot(guest, log)
    t3 = time.perf_counter()
    image.unlink()
    return {"export": t1 - t0, "upload_create": t2 - t1, "power_on": t3 - t2, "total": t3 - t0}, (target, log)


def peer_up(vc: VCenter, arc: Archive, point: Any, work: Path, n: int) -> tuple[dict[str, float], Any]:
    """Restore, qemu-img convert to monolithicFlat, curl uploads, CreateVM + PowerOn with pyvmomi."""
    from pyVmomi import vim

    name = f"peer-{n}"
    vmdk = work / f"{name}.vmdk"
    raw = work / f"{name}.raw"
    size = point.size
    tr = time.perf_counter()
    restore(arc.reader(point), raw)
    t0 = time.perf_counter()
    run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", str(raw), str(vmdk)])
    t1 = time.perf_counter()
    si = vc.connect()
    cookie = si._stub.cookie.split(";", 1)[0]
    for f in (work / f"{name}-flat.vmdk", vmdk):
        url = f"{vc.url.rsplit('/sdk', 1)[0]}/folder/{quote(name)}/{quote(f.name)}?" + urlencode(
            {"dcPath": DATACENTER, "dsName": DATASTORE}
        )
        run(["curl", "-sSf", "--cacert", str(vc.ca_file), "-H", f"Cookie: {cookie}", "-T", str(f), url])
    t2 = time.perf_counter()
    content = si.RetrieveContent()
    dc = next(e for e in content.rootFolder.childEntity if e.name == DATACENTER)
    pool = dc.hostFolder.childEntity[0].resourcePool
    ctrl = vim.vm.device.VirtualLsiLogicController(key=-100, busNumber=0, sharedBus="noSharing")
    path = f"[{DATASTORE}] {name}/{name}.vmdk"
    backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=path, diskMode="persistent")
    disk = vim.vm.device.VirtualDisk(
        key=-101, controllerKey=-100, unitNumber=0, backing=backing, capacityInKB=size // 1024
    )
    spec = vim.vm.ConfigSpec(
        name=name, guestId="otherLinux64Guest", numCPUs=1, memoryMB=256,
        files=vim.vm.FileInfo(vmPathName=f"[{DATASTORE}] {name}/{name}.vmx"),
        deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=d) for d in (ctrl, disk)],
    )
    wait(dc.vmFolder.CreateVM_Task(config=spec, pool=pool))
    vm = next(v for v in dc.vmFolder.childEntity if v.name == name)
    t3 = time.perf_counter()
    wait(vm.PowerOnVM_Task())
    while vm.runtime.powerState != "poweredOn":
        time.sleep(0.05)
    t4 = time.perf_counter()
    for f in (work / f"{name}-flat.vmdk", vmdk, raw):
        f.unlink()
    phases = {
        "restore": t0 - tr, "convert": t1 - t0, "upload": t2 - t1, "create": t3 - t2, "power_on": t4 - t3,
        "total": t4 - tr, "total_from_raw": t4 - t0,
    }
    return phases, vm


def wait(task: Any) -> None:
    """Wait for a pyvmomi task (the peer's own loop, not lifeboat's)."""
    while task.info.state not in ("success", "error"):
        time.sleep(0.05)
    if task.info.state == "error":
        raise RuntimeError(task.info.error)


def remove_peer_vm(vm: Any) -> None:
    wait(vm.PowerOffVM_Task())
    wait(vm.Destroy_Task())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-gib", type=float, default=2.5)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    image = realistic_image(args.size_gib)
    root = Path(tempfile.mkdtemp(prefix="vmware-bench-", dir=BENCH_DIR))
    sim = start(root / "vcsim")
    vc = next(sim)
    try:
        arc = Archive.init(str(root / "archive"))
        point = arc.backup("bench", open_source_file(image))
        work = root / "work"
        work.mkdir()
        results: dict[str, list[dict[str, float]]] = {"lifeboat": [], "peer": []}
        for n in range(args.runs):
            order = ["lifeboat", "peer"] if n % 2 == 0 else ["peer", "lifeboat"]
            for tool in order:
                for pack in (root / "archive").rglob("*"):  # both start from the archive, its packs cached
                    if pack.is_file():
                        warm(pack)
                if tool == "lifeboat":
                    phases, (target, log) = lifeboat_up(vc, arc, point, work, n)
                    target.teardown(log)
                else:
                    phases, vm = peer_up(vc, arc, point, work, n)
                    remove_peer_vm(vm)
                results[tool].append(phases)
                print(f"run {n + 1} {tool}: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()), flush=True)
        med = {tool: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for tool, runs in results.items()}
        ratio = med["peer"]["total"] / med["lifeboat"]["total"]
        ratio_raw = med["peer"]["total_from_raw"] / med["lifeboat"]["total"]
        out = {
            "machine": machine_info(),
            "image_bytes": point.size,
            "runs": args.runs,
            "median_seconds": med,
            "peer_over_lifeboat": ratio,
            "peer_from_raw_over_lifeboat": ratio_raw,
            "all": results,
        }
        print(json.dumps(out["median_seconds"], indent=2))
        print(
            f"lifeboat {med['lifeboat']['total']:.2f} s; restore + qemu-img convert + curl upload "
            f"{med['peer']['total']:.2f} s: ratio {ratio:.2f}; "
            f"without the restore {med['peer']['total_from_raw']:.2f} s: ratio {ratio_raw:.2f} (> 1: lifeboat faster)"
        )
        if args.json_out:
            args.json_out.write_text(json.dumps(out, indent=2))
    finally:
        sim.close()
        shutil.rmtree(root, ignore_errors=True)


def open_source_file(path: Path) -> Any:
    """The image as a backup source (a plain file, read and hashed)."""
    from lifeboat.archive.files import FileSource

    return FileSource(str(path))


if __name__ == "__main__":
    main()
