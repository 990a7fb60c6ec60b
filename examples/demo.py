"""The README's main job: protect the sample guest, change it, and prove both points come back.

Steps, each through the real ``lifeboat`` command line: build the sample guest; back it up into a
local archive; boot it (its ``init`` writes a counter record to its disk: the change); back it up
again (an incremental); restore both points and check each one's record; ``lifeboat verify``; and
boot the restored newest point under QEMU to see it really comes back. Later issues grow this into
a full DR rehearsal.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from examples.sample_guest import boot, build, copy_image, read_record

MACHINE = "sample-guest"


def lifeboat(*args: str) -> dict[str, object]:
    """Run the CLI with ``--json`` and return its document; stop the demo on failure."""
    cmd = [sys.executable, "-m", "orchestrator", *args, "--json"]
    print("$ lifeboat " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"demo: 'lifeboat {' '.join(args)}' failed with exit status {done.returncode}")
    doc: dict[str, object] = json.loads(done.stdout)
    return doc


def main(out: Path = Path("demo-output")) -> None:
    """Run the demo in ``out`` (recreated) and print a summary."""
    started = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    archive = str(out / "archive")
    disk = copy_image(build(), out / "guest.img")
    lifeboat("archive", "init", "--archive", archive)
    first = lifeboat("backup", MACHINE, str(disk), "--archive", archive)
    print("demo: booting the guest so that it changes its disk", file=sys.stderr)
    change = boot(str(disk))
    if not change.matched:
        raise SystemExit(f"demo: the sample guest did not boot:\n{change.console}")
    second = lifeboat("backup", MACHINE, str(disk), "--archive", archive)
    checks = []
    for point, counter in ((first, 0), (second, 1)):
        dest = out / f"restored-{point['point']}.img"
        lifeboat("restore", f"{MACHINE}@{point['point']}", str(dest), "--archive", archive)
        record = read_record(dest)
        if record[0] != counter:
            raise SystemExit(f"demo: point {point['point']} holds record {record}, expected counter {counter}")
        checks.append((point, record, dest))
    report = lifeboat("verify", "--archive", archive)
    newest = checks[-1][2]
    print(f"demo: booting the restored point {second['point']} under QEMU", file=sys.stderr)
    result = boot(str(newest))
    line = f"LIFEBOAT-GUEST: disk-record {checks[-1][1][0]}"
    if line not in result.console:
        raise SystemExit(f"demo: the restored guest did not show {line!r}:\n{result.console}")
    print(f"full backup        {first['point']}  {first['bytes_read']} bytes read, {first['bytes_stored']} stored")
    print(f"incremental backup {second['point']}  {second['bytes_new']} new bytes, {second['bytes_stored']} stored")
    for point, record, dest in checks:
        print(f"restored {point['point']} -> {dest}: record {record}")
    print(f"verify: {report['chunks']} chunks in {report['packs']} packs, ok={report['ok']}")
    print(f"restored guest booted in {result.seconds_to('booted') or result.elapsed:.1f} s and printed: {line}")
    print(f"demo finished in {time.monotonic() - started:.0f} s; archive at {archive}")


if __name__ == "__main__":
    main()
