"""The README's main job: protect the sample guest, then prove in a DR rehearsal that it comes back.

Steps, each through the real ``lifeboat`` command line: build the sample guest; back it up into a
local archive; boot it (its ``init`` writes a counter record to its disk: the change) and set it to
stay up once booted; back it up again (an incremental); ``lifeboat verify``; then
``lifeboat run examples/rehearsal.yaml``: the rehearsal boots the newest point under the embedded
``qemu`` target straight from ``lifeboat serve`` (NBD, hydrating a local disk), on an isolated
network, waits for the guest's console to say it is alive, moves it onto the hydrated disk, tears
everything down and writes JSON, JUnit and HTML reports. The demo checks the guest's console lines
in the report and that nothing was left running, and prints the HTML report's path last.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from examples.sample_guest import boot, build, copy_image, read_record, set_kernel_args

MACHINE = "sample-guest"
RUNBOOK = Path(__file__).with_name("rehearsal.yaml")


def lifeboat(*args: str) -> Any:
    """Run the CLI with ``--json`` and return its document; stop the demo on failure."""
    cmd = [sys.executable, "-m", "lifeboat", *args, "--json"]
    print("$ lifeboat " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"demo: 'lifeboat {' '.join(args)}' failed with exit status {done.returncode}")
    return json.loads(done.stdout)


def main(out: Path = Path("demo-output")) -> None:
    """Run the demo in ``out`` (recreated) and print a summary; the last line is the HTML report."""
    started = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    archive = str(out / "archive")
    state = str(out / "state")
    disk = copy_image(build(), out / "guest.img")
    lifeboat("archive", "init", "--archive", archive)
    first = lifeboat("backup", MACHINE, str(disk), "--archive", archive)
    print("demo: booting the guest so that it changes its disk", file=sys.stderr)
    change = boot(str(disk))
    if not change.matched:
        raise SystemExit(f"demo: the sample guest did not boot:\n{change.console}")
    set_kernel_args(disk, "lifeboat.stay=1")  # from now on it stays up and says it is alive
    counter = read_record(disk)[0]
    second = lifeboat("backup", MACHINE, str(disk), "--archive", archive)
    report = lifeboat("verify", "--archive", archive)
    if not report["ok"]:
        raise SystemExit("demo: lifeboat verify found damage")

    print(f"demo: DR rehearsal of {MACHINE} from {RUNBOOK}", file=sys.stderr)
    run = lifeboat("run", str(RUNBOOK), "--archive", archive, "--state", state)
    machine = run["machines"][0]
    if run["status"] != "succeeded" or machine["point"] != second["point"]:
        raise SystemExit(f"demo: the rehearsal did not succeed on point {second['point']}: {run}")
    full = json.loads(Path(run["report"]["json"]).read_text())
    console = full["machines"][0]["console_tail"]
    expected = [f"LIFEBOAT-GUEST: disk-record {counter} sample-guest", f"LIFEBOAT-GUEST: disk-write-ok {counter + 1}"]
    for line in expected:
        if not any(line in c for c in console):
            raise SystemExit(f"demo: the recovered guest's console lacks {line!r}:\n" + "\n".join(console))
    if not any("LIFEBOAT-GUEST: alive" in c for c in console):
        raise SystemExit("demo: the recovered guest never said it was alive")
    runs = lifeboat("runs", "sample-rehearsal", "--state", state)
    if runs[-1]["phase"] != "done" or (Path(state) / "runs" / run["run_id"] / MACHINE).exists():
        raise SystemExit(f"demo: the rehearsal did not tear down: {runs[-1]}")

    print(f"full backup        {first['point']}  {first['bytes_read']} bytes read, {first['bytes_stored']} stored")
    print(f"incremental backup {second['point']}  {second['bytes_new']} new bytes, {second['bytes_stored']} stored")
    print(f"verify: {report['chunks']} chunks in {report['packs']} packs, ok={report['ok']}")
    print(
        f"rehearsal {run['run_id']}: {run['status']}; {MACHINE} back from {machine['point']} "
        f"with RTO {machine['rto_seconds']:.1f} s (objective {machine['rto_objective_seconds']:.0f} s), "
        f"RPO {machine['rpo_seconds']:.0f} s"
    )
    print("recovered guest's console: " + " | ".join(c for c in console if "LIFEBOAT-GUEST" in c)[:300])
    print("torn down: no machine, export or work file of the rehearsal is left")
    print(f"demo finished in {time.monotonic() - started:.0f} s; archive at {archive}")
    print(f"JUnit report: {run['report']['junit']}")
    print(f"HTML report: {run['report']['html']}")


if __name__ == "__main__":
    main()
