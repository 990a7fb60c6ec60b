"""Replication: only what the replica lacks, packs before manifests, damaged packs refused,
encrypted archives copied without their key, a killed run resumed, an archive server as DEST."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifeboat.archive import Archive
from lifeboat.archive.backend import open_backend
from lifeboat.archive.errors import StorageError, WrongKey
from lifeboat.archive.formats import PACK_ENTRY, PACK_TRAILER
from lifeboat.archive.prune import prune
from lifeboat.archive.replicate import ReplicaMismatch, replicate
from lifeboat.archive.server import ArchiveServer
from lifeboat.archive.verify import verify
from lifeboat.orchestrator.console import SELF_COMMAND as LIFEBOAT
from lifeboat.plumbing.errors import UsageError
from lifeboat.plumbing.tls import server_context
from tests.agent.test_remote import DroppingProxy
from tests.archive.helpers import BytesSource, read_all
from tests.pki import make_pki

KiB, MiB = 1024, 1024 * 1024


def disk(seed: int, size: int = 1 * MiB) -> bytes:
    """Random bytes with a zero run in the middle (zero chunks are not stored)."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[size // 4: size // 2] = bytes(size // 4)
    return bytes(data)


def source(tmp_path: Path, machines: dict[str, bytes], **init: object) -> Archive:
    arc = Archive.init(str(tmp_path / "src"), chunk_size=64 * KiB, **init)  # type: ignore[arg-type]
    for machine, data in machines.items():
        arc.backup(machine, BytesSource(data))
    return arc


def objects(root: Path) -> dict[str, bytes]:
    """Every object of a local archive (no lock file, no leftovers), by key."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.name != "lock" and ".tmp-" not in p.name}


def restores(location: str, machines: dict[str, bytes], key_file: str | None = None) -> None:
    """Every newest point restores the machine's bytes, and verify is clean."""
    arc = Archive.open(location, key_file=key_file)
    for machine, data in machines.items():
        assert read_all(arc.reader(arc.resolve(machine))) == data
    report = verify(arc)
    assert report.ok, report.to_json()


def test_dir_to_dir_byte_for_byte_then_nothing_then_only_the_new_packs(tmp_path: Path) -> None:
    machines = {"web01": disk(1), "db01": disk(2)}
    arc = source(tmp_path, machines)
    dst = str(tmp_path / "dst")
    first = replicate(arc.backend.location, dst)
    assert first.initialised and first.ok and first.lag_seconds == 0
    assert len(first.points_published) == 2 and first.machines == ["db01", "web01"]
    assert objects(tmp_path / "dst") == objects(tmp_path / "src")  # the config too: a replica
    restores(dst, machines)
    restores(arc.backend.location, machines)

    again = replicate(arc.backend.location, dst)
    assert (again.objects_copied, again.bytes_copied, again.points_published) == (0, 0, [])
    assert again.points_in_step == 2 and not again.initialised

    before = set(objects(tmp_path / "src"))
    changed = bytearray(machines["web01"])
    changed[5000:5000 + 10 * KiB] = os.urandom(10 * KiB)  # about 1 %
    machines["web01"] = bytes(changed)
    arc.backup("web01", BytesSource(machines["web01"]))
    new = set(objects(tmp_path / "src")) - before
    third = replicate(arc.backend.location, dst)
    assert third.objects_copied == len(new) == 2  # one pack, one manifest
    assert third.bytes_copied == sum(len(objects(tmp_path / "src")[k]) for k in new)
    assert objects(tmp_path / "dst") == objects(tmp_path / "src")
    restores(dst, machines)


def test_named_machines_only_and_the_lag(tmp_path: Path) -> None:
    arc = source(tmp_path, {"web01": disk(1), "db01": disk(2)})
    dst = str(tmp_path / "dst")
    report = replicate(arc.backend.location, dst, ["web01"])
    assert report.machines == ["web01"] and report.points_published[0].startswith("web01@")
    assert Archive.open(dst).machines() == ["web01"]
    with pytest.raises(UsageError, match="nosuch"):
        replicate(arc.backend.location, dst, ["nosuch"])


def test_encrypted_archive_copied_as_stored_without_the_key(tmp_path: Path) -> None:
    key = str(tmp_path / "key")
    machines = {"web01": disk(3)}
    arc = source(tmp_path, machines, encrypt=True, key_file=key)
    dst = str(tmp_path / "dst")
    assert replicate(arc.backend.location, dst).ok  # no key: packs checked by their structure
    assert objects(tmp_path / "dst") == objects(tmp_path / "src")
    with pytest.raises(WrongKey):
        Archive.open(dst)
    restores(dst, machines, key_file=key)
    with pytest.raises(WrongKey):
        replicate(arc.backend.location, str(tmp_path / "dst2"), key_file=str(tmp_path / "src" / "config"))


def damage_a_blob(root: Path) -> str:
    """Flip a byte inside the first blob of the (only) pack under ``root``; its key."""
    [pack] = [p for p in (root / "packs").rglob("*") if p.is_file()]
    data = bytearray(pack.read_bytes())
    data[8 + 100] ^= 0xFF  # past the magic, in the first blob; the index and its CRC are intact
    pack.write_bytes(bytes(data))
    return str(pack.relative_to(root))


def test_a_damaged_source_pack_is_refused_and_its_point_not_published(tmp_path: Path) -> None:
    machines = {"web01": disk(4)}
    arc = source(tmp_path, machines)
    key = damage_a_blob(tmp_path / "src")
    arc.backup("db01", BytesSource(disk(5)))  # a good point beside it still goes
    dst = str(tmp_path / "dst")
    report = replicate(arc.backend.location, dst)
    assert not report.ok and list(report.refused) == [f"web01@{arc.points('web01')[0].point}"]
    assert key in report.refused[next(iter(report.refused))]
    assert report.lag_seconds > 0  # web01's point is not off-site
    assert not (tmp_path / "dst" / key).exists()
    assert Archive.open(dst).machines() == ["db01"]
    assert verify(Archive.open(dst)).ok


def test_a_pack_with_a_damaged_index_is_refused(tmp_path: Path) -> None:
    arc = source(tmp_path, {"web01": disk(6)})
    [pack] = [p for p in (tmp_path / "src" / "packs").rglob("*") if p.is_file()]
    data = bytearray(pack.read_bytes())
    data[-PACK_TRAILER.size - PACK_ENTRY.size + 3] ^= 0xFF  # an index entry: the CRC no longer matches
    pack.write_bytes(bytes(data))
    report = replicate(arc.backend.location, str(tmp_path / "dst"))
    assert not report.ok and "no readable pack" in next(iter(report.refused.values()))
    assert not list((tmp_path / "dst").glob("packs/*/*"))


def test_a_destination_that_is_another_archive_or_no_archive_is_refused(tmp_path: Path) -> None:
    arc = source(tmp_path, {"web01": disk(7)})
    Archive.init(str(tmp_path / "other"), chunk_size=64 * KiB)
    with pytest.raises(ReplicaMismatch, match="another archive"):
        replicate(arc.backend.location, str(tmp_path / "other"))
    with pytest.raises(ReplicaMismatch, match="source archive itself"):
        replicate(arc.backend.location, str(tmp_path / "src" / "." ))
    with pytest.raises(UsageError, match="ftp"):
        replicate(arc.backend.location, "ftp://example.org/x")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ReplicaMismatch, match="file"):
        replicate(arc.backend.location, str(tmp_path / "file"))
    with pytest.raises(UsageError, match="--bwlimit"):
        replicate(arc.backend.location, str(tmp_path / "dst"), bwlimit=0)


@pytest.fixture
def https_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ArchiveServer]:
    """An archive server over HTTPS with a token, serving an empty directory."""
    pki = make_pki(tmp_path)
    (tmp_path / "served").mkdir()
    monkeypatch.setenv("LIFEBOAT_ARCHIVE_TOKEN", "t0ken")
    monkeypatch.setenv("LIFEBOAT_ARCHIVE_CA", pki["ca"])
    srv = ArchiveServer(open_backend(str(tmp_path / "served")), "127.0.0.1", 0, token="t0ken",
                        tls=server_context(pki["cert"], pki["key"], None), spool=tmp_path / "spool").start()
    yield srv
    srv.shutdown()


def test_dir_to_an_archive_server_over_https(tmp_path: Path, https_server: ArchiveServer) -> None:
    assert https_server.url.startswith("https://")
    machines = {"web01": disk(8), "db01": disk(9)}
    arc = source(tmp_path, machines)
    report = replicate(arc.backend.location, https_server.url, bwlimit=64 * MiB)
    assert report.ok and report.initialised and len(report.points_published) == 2
    assert objects(tmp_path / "served") == objects(tmp_path / "src")
    restores(https_server.url, machines)
    assert replicate(arc.backend.location, https_server.url).objects_copied == 0


def test_to_an_archive_server_through_dropped_connections_then_a_lost_link(
        tmp_path: Path, https_server: ArchiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    machines = {f"m{i}": disk(30 + i, 2 * MiB) for i in range(3)}
    arc = source(tmp_path, machines)
    flaky = DroppingProxy((https_server.host, https_server.port), after=1 * MiB, drops=3)
    report = replicate(arc.backend.location, f"https://127.0.0.1:{flaky.port}")
    flaky.close()
    assert report.ok and flaky.dropped == 3 and len(report.points_published) == 3
    restores(str(tmp_path / "served"), machines)

    machines |= {"late": disk(40, 4 * MiB)}
    arc.backup("late", BytesSource(machines["late"]))
    monkeypatch.setenv("LIFEBOAT_ARCHIVE_RETRY_SECONDS", "1")
    lost = DroppingProxy((https_server.host, https_server.port), after=1 * MiB, drops=-1)
    with pytest.raises(StorageError):
        replicate(arc.backend.location, f"https://127.0.0.1:{lost.port}")
    lost.close()
    assert Archive.open(str(tmp_path / "served")).machines() == ["m0", "m1", "m2"]  # not published without its packs
    assert replicate(arc.backend.location, https_server.url).points_published[0].startswith("late@")
    restores(str(tmp_path / "served"), machines)


@pytest.mark.parametrize("store", ["s3_moto", "s3_seaweedfs"])
def test_dir_to_s3_and_back_to_a_dir(tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    location: str = request.getfixturevalue(store)
    machines = {"web01": disk(50), "db01": disk(51)}
    arc = source(tmp_path, machines)
    report = replicate(arc.backend.location, location)
    assert report.ok and report.initialised and len(report.points_published) == 2
    restores(location, machines)
    assert replicate(arc.backend.location, location).objects_copied == 0
    back = replicate(location, str(tmp_path / "back"))  # the off-site copy is a source like any other
    assert back.ok and objects(tmp_path / "back") == objects(tmp_path / "src")


def run(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIFEBOAT, *argv], capture_output=True, text=True, env=env, timeout=120)


def test_cli_killed_mid_copy_resumes_and_never_shows_a_point_without_its_packs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFEBOAT_")}
    machines = {f"m{i}": disk(10 + i, 2 * MiB) for i in range(4)}
    arc = source(tmp_path, machines)
    src, dst = arc.backend.location, tmp_path / "dst"
    total = len(objects(tmp_path / "src")) - 1  # every object but the config
    proc = subprocess.Popen([*LIFEBOAT, "replicate", "--to", str(dst), "--bwlimit", "1M", "--archive", src],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not [p for p in dst.glob("points/*/*") if ".tmp-" not in p.name]:  # a point is published: kill
            assert proc.poll() is None, "replicate finished before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    part = Archive.open(str(dst))
    shown = sum(len(part.points(m)) for m in part.machines())
    assert 0 < shown < len(machines)
    assert verify(part).ok  # every point there has every chunk it needs

    done = run("replicate", "--to", str(dst), "--archive", src, "--json", env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["to"] == str(dst) and doc["machines"] == sorted(machines)
    assert doc["points_published"] == len(machines) - shown and doc["lag_seconds"] == 0
    assert 0 < doc["objects_copied"] < total
    restores(str(dst), machines)
    again = run("replicate", "--to", str(dst), "--archive", src, "--json", env=env)
    assert json.loads(again.stdout)["objects_copied"] == 0

    bad = run("replicate", "--to", "s3x://bucket", "--archive", src, env=env)
    assert bad.returncode == 2 and "s3x" in bad.stderr and "Traceback" not in bad.stderr


def test_with_the_key_a_damaged_encrypted_blob_is_refused(tmp_path: Path) -> None:
    key = str(tmp_path / "key")
    arc = source(tmp_path, {"web01": disk(20)}, encrypt=True, key_file=key)
    damage_a_blob(tmp_path / "src")
    report = replicate(arc.backend.location, str(tmp_path / "dst"), key_file=key)
    assert not report.ok and "authentication failed" in next(iter(report.refused.values()))


def test_a_pack_with_a_damaged_magic_is_refused(tmp_path: Path) -> None:
    arc = source(tmp_path, {"web01": disk(21)})
    [pack] = [p for p in (tmp_path / "src" / "packs").rglob("*") if p.is_file()]
    pack.write_bytes(b"X" + pack.read_bytes()[1:])
    report = replicate(arc.backend.location, str(tmp_path / "dst"))
    assert not report.ok and "magic" in next(iter(report.refused.values()))


def test_follows_the_source_prunes_and_does_not_copy_repacked_chunks_again(tmp_path: Path) -> None:
    arc = source(tmp_path, {"keep": disk(70)})
    image = bytearray(disk(71, 2 * MiB))
    versions = {}
    for i in range(4):
        image[:512 * KiB] = random.Random(80 + i).randbytes(512 * KiB)  # the old copies die with their points
        versions[arc.backup("m", BytesSource(bytes(image))).point] = bytes(image)
    dst = str(tmp_path / "dst")
    assert replicate(arc.backend.location, dst).ok
    keep_point = arc.points("keep")[0]
    arc.backend.delete(keep_point.key)  # lost at the source, not pruned: stays off-site
    arc.config["retention"] = {"keep_last": 2}
    arc.save_config()
    pruned = prune(arc)
    assert len(pruned.removed) == 2 and pruned.packs_rewritten >= 1

    image[0:64 * KiB] = bytes(64 * KiB)
    image[64 * KiB:128 * KiB] = random.Random(90).randbytes(64 * KiB)
    versions[arc.backup("m", BytesSource(bytes(image))).point] = bytes(image)
    report = replicate(arc.backend.location, dst)
    assert report.ok and len(report.points_published) == 1 and sorted(report.points_removed) == sorted(
        f"m@{p}" for p in list(versions)[:2])
    assert report.objects_copied == 2  # the new point's pack and manifest: repacked chunks are there already
    assert report.packs_removed >= 1
    replica = Archive.open(dst)
    assert [p.point for p in replica.points("m")] == [p.point for p in arc.points("m")]
    assert replica.points("m")[0].parent is None  # the source's rollup, copied
    assert [p.point for p in replica.points("keep")] == [keep_point.point]
    for p in replica.points("m"):
        assert read_all(replica.reader(p)) == versions[p.point]
    assert verify(replica).ok and verify(Archive.open(arc.backend.location)).ok
    assert all((tmp_path / "dst" / "pruned" / "m" / p).exists() for p in list(versions)[:2])
    again = replicate(arc.backend.location, dst)
    assert again.objects_copied == 0 and again.points_removed == [] and again.packs_removed == 0


def test_an_archive_server_replica_follows_a_prune(tmp_path: Path, https_server: ArchiveServer) -> None:
    arc = source(tmp_path, {"m": disk(75)})
    arc.backup("m", BytesSource(disk(76)))
    assert replicate(arc.backend.location, https_server.url).ok
    arc.config["retention"] = {"keep_last": 1}
    arc.save_config()
    [old] = prune(arc).removed
    report = replicate(arc.backend.location, https_server.url)
    assert report.points_removed == [f"m@{old.point}"] and report.packs_removed == 1
    served = objects(tmp_path / "served")
    assert served == objects(tmp_path / "src") | {"config": served["config"]}  # tombstones too; the config is older
    restores(https_server.url, {"m": disk(76)})
