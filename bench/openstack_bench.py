"""OpenStack benchmark: a point uploaded to Glance by the openstack target against the usual way,
``qemu-img convert`` then ``openstack image create --file``.

On the cached realistic image (``bench.common.realistic_image``, 2.5 GiB ext4 of real files),
backed up into an archive (not timed), against the local cloud of the tests
(``tests/targets/openstackcloud.py``: real Keystone and real Glance, file store, on loopback):

- lifeboat raw: the openstack target's upload with ``image_format: raw``: the point read from the
  archive and streamed to Glance, no file written (``Disk.open_image``);
- lifeboat qcow2 (the default): the same with the qcow2 made front to back as it is sent
  (``exporters.qcow2.qcow2_stream``), no file written either;
- peer raw: ``openstack image create --disk-format raw --file DISK`` of the machine's raw disk;
- peer qcow2: ``qemu-img convert -f raw -O qcow2 DISK out.qcow2`` then
  ``openstack image create --disk-format qcow2 --file out.qcow2``.

The peers start from the raw disk file, lifeboat from its archive (what each has at recovery
time). The page cache is dropped before each (root). Every upload is checked outside the timing:
Glance's own checksum (MD5 of what it stored) equals the MD5 of the raw disk (raw) or of the qcow2
(lifeboat's made again from the archive to a file after the run, the peer's file), and each qcow2
reads back as the disk (``qemu-img compare``). Ratios: peer time / lifeboat time, per format.

Usage::

    PYTHONPATH=. .venv/bin/python bench/openstack_bench.py [--size-gib 2.5] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import drop_caches, machine_info, realistic_image, run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lifeboat.archive import Archive  # noqa: E402
from lifeboat.exporters import image_stream  # noqa: E402
from lifeboat.targets.base import Disk, Guest, MemoryLog, NetworkSpec, TargetContext  # noqa: E402
from lifeboat.targets.openstack import OpenStackTarget  # noqa: E402
from tests.targets.openstackcloud import running_cloud  # noqa: E402

LIFEBOAT = [sys.executable, "-m", "lifeboat"]


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        while buf := f.read(8 << 20):
            h.update(buf)
    return h.hexdigest()


def timed(step: Callable[[], Any]) -> tuple[float, Any]:
    drop_caches()
    start = time.monotonic()
    result = step()
    return time.monotonic() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.5)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    image = realistic_image(args.size_gib)
    size = image.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="lifeboat-openstack-bench-", dir="/var/tmp"))
    try:
        archive = work / "archive"
        run([*LIFEBOAT, "archive", "init", "--archive", str(archive)])
        run([*LIFEBOAT, "backup", "db01", str(image), "--archive", str(archive)])
        arc = Archive.open(str(archive))
        point = arc.resolve("db01@latest")
        raw_md5 = md5_file(image)
        results: dict[str, dict[str, Any]] = {}
        with running_cloud() as cloud:
            os.environ.update(cloud.env())
            glance = cloud.connect().image
            print(f"local cloud up in {cloud.timings['start_s']:.1f} s", file=sys.stderr)

            def lifeboat_upload(fmt: str) -> str:
                guest = Guest("db01", f"20260101T000000-{fmt}", work / fmt, NetworkSpec("none"))
                disk = Disk(size=size, image_format=fmt, open_image=lambda: image_stream(fmt, arc.reader(point)))
                target = OpenStackTarget({"flavor": "m1.tiny", "image_format": fmt}, TargetContext())
                log = MemoryLog("openstack")
                target.provision(guest, disk, log)
                image_id = target.uploaded_image(guest, log)
                assert image_id is not None
                return image_id

            def peer_upload(fmt: str) -> str:
                source = image
                if fmt == "qcow2":
                    source = work / "peer.qcow2"
                    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(source)])
                out = run(["openstack", "image", "create", "--disk-format", fmt, "--container-format", "bare",
                           "--file", str(source), "-f", "json", f"peer-{fmt}"])  # fmt: skip
                return str(json.loads(out.stdout)["id"])

            for fmt in ("raw", "qcow2"):
                for tool, upload in (("lifeboat", lifeboat_upload), ("peer", peer_upload)):
                    seconds, image_id = timed(lambda: upload(fmt))  # noqa: B023 (called at once)
                    stored = glance.get_image(image_id)
                    sent = work / "peer.qcow2" if tool == "peer" else work / "lifeboat.qcow2"
                    if tool == "lifeboat" and fmt == "qcow2":
                        with open(sent, "wb") as f:
                            for piece in image_stream("qcow2", arc.reader(point)):
                                f.write(piece)
                    expected = raw_md5 if fmt == "raw" else md5_file(sent)
                    assert stored.status == "active" and stored.checksum == expected, (tool, fmt, stored.checksum)
                    if fmt == "qcow2":
                        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image), str(sent)])
                    results[f"{tool} {fmt}"] = {"seconds": round(seconds, 2), "bytes_sent": stored.size,
                                                "MB_per_s": round(size / seconds / 1e6, 1)}  # fmt: skip
                    print(f"{tool:8} {fmt:5}  {seconds:7.2f} s  {stored.size / 1e6:8.1f} MB sent "
                          f"({size / seconds / 1e6:.0f} MB/s of disk)", file=sys.stderr)  # fmt: skip
                    glance.delete_image(image_id)
            start_s = cloud.timings["start_s"]
        ratios = {fmt: round(results[f"peer {fmt}"]["seconds"] / results[f"lifeboat {fmt}"]["seconds"], 2)
                  for fmt in ("raw", "qcow2")}  # fmt: skip
        doc = {"disk_bytes": size, "results": results, "ratio_peer_over_lifeboat": ratios,
               "cloud_start_s": round(start_s, 1), "machine": machine_info()}  # fmt: skip
        for fmt, r in ratios.items():
            print(f"{fmt}: lifeboat {r}x the speed of the peer", file=sys.stderr)
        print(json.dumps(doc, indent=2))
        if args.json_out:
            args.json_out.write_text(json.dumps(doc, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
