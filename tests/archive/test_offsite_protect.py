"""``lifeboat protect --replicate-to DEST``: every point goes off-site after its capture, and the
replication lag (age of the newest point not yet off-site) is in the status and the metrics."""

from __future__ import annotations

import random
import re
from pathlib import Path

from lifeboat.archive import Archive
from lifeboat.archive.verify import verify
from tests.agent.test_protect import Protect

KiB = 1024


def _machine(tmp_path: Path) -> tuple[Archive, Path]:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(9).randbytes(512 * KiB))
    return Archive.init(str(tmp_path / "arc"), chunk_size=64 * KiB), image


def test_each_point_goes_off_site_and_the_lag_is_reported(s3_moto: str, tmp_path: Path) -> None:
    arc, image = _machine(tmp_path)
    prom = tmp_path / "lifeboat.prom"
    p = Protect(arc, str(image), tmp_path / "status.json", "--rpo", "1", "--max-captures", "3",
                "--replicate-to", s3_moto, "--metrics-file", str(prom))
    assert p.proc.wait(timeout=120) == 0, "".join(p.stderr)
    repl = p.status()["replication"]
    assert repl["to"] == s3_moto and repl["lag_seconds"] == 0 and repl["failures"] == 0 and repl["runs"] >= 1
    replica = Archive.open(s3_moto)
    assert [x.point for x in replica.points("vm")] == [x.point for x in arc.points("vm")]
    assert len(arc.points("vm")) == 3 and verify(replica).ok
    text = prom.read_text()
    assert re.search(r'^lifeboat_replication_lag_seconds\{machine="vm",to="s3://[^"]+"\} 0\.0$', text, re.M), text
    assert re.search(r'^lifeboat_replication_failures_total\{machine="vm",to="s3://[^"]+"\} 0$', text, re.M)


def test_a_failing_destination_shows_as_lag_and_failures(tmp_path: Path) -> None:
    arc, image = _machine(tmp_path)
    Archive.init(str(tmp_path / "other"))  # another archive: not a replica, refused on every run
    p = Protect(arc, str(image), tmp_path / "status.json", "--rpo", "1", "--max-captures", "2",
                "--replicate-to", str(tmp_path / "other"))
    assert p.proc.wait(timeout=120) == 0, "".join(p.stderr)
    repl = p.status()["replication"]
    assert repl["failures"] >= 1 and repl["lag_seconds"] > 0 and "another archive" in repl["last_error"]
    assert "replicate to" in "".join(p.stderr)
