"""The shipped OpenStack runbooks end to end through the CLI, against real Keystone and Glance and
the Nova/Cinder/Neutron doubles (``openstack_cloud``), credentials from a clouds.yaml: the drill
(upload, boot on the isolated network, teardown, report) and the failover (boot from volumes on the
mapped network with the machines' fixed IPs, kept; then ``lifeboat teardown``); a wrong flavor
stops the run with exit 1 and a message naming it. The drill streams raw from the archive (no
image file), the failover uploads the default qcow2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lifeboat.archive import Archive
from lifeboat.orchestrator.state import SqliteState
from tests.targets.openstackcloud import LocalCloud
from tests.targets.realpeers import REPO, lifeboat

POINT = "sample-guest@latest"


def shipped(name: str, **settings: Any) -> dict[str, Any]:
    """A shipped runbook pointed at the local cloud and the sample guest, without network health
    checks (Nova is a double: no guest answers)."""
    doc: dict[str, Any] = yaml.safe_load((REPO / "runbooks" / name).read_text())
    doc["target"]["settings"].update(settings)
    for m in doc["machines"]:
        m["point"] = POINT
        m["health"] = []
    doc.pop("report", None)
    return doc


def run_env(cloud: LocalCloud, tmp_path: Path) -> dict[str, str]:
    """Only clouds.yaml: the runbooks name their cloud ``dr-site``."""
    return {"OS_CLIENT_CONFIG_FILE": str(cloud.clouds_yaml(tmp_path / "clouds.yaml", name="dr-site"))}


def of_run(cloud: LocalCloud, kind: str, run_id: str) -> list[dict[str, Any]]:
    return [i for i in cloud.doubles.state()[kind] if i["metadata"].get("lifeboat_run") == run_id]


def images(cloud: LocalCloud, run_id: str) -> list[Any]:
    return list(cloud.connect().image.images(tag=[f"lifeboat-run:{run_id}"]))


def test_drill(openstack_cloud: LocalCloud, sample_archive: Path, tmp_path: Path) -> None:
    """With ``image_format: raw``: the point streamed from the archive, no image file written."""
    doc = shipped("openstack-drill.yaml", isolated_network="private", security_groups=["ssh"], image_format="raw")
    rb = tmp_path / "drill.yaml"
    rb.write_text(yaml.safe_dump(doc))
    state = tmp_path / "state"
    env = run_env(openstack_cloud, tmp_path)
    done = lifeboat("run", str(rb), "--archive", str(sample_archive), "--state", str(state), "--json", env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["status"] == "succeeded", out
    report = json.loads(Path(out["report"]["json"]).read_text())
    (m,) = report["machines"]
    steps = {s["step"]: s["status"] for s in m["steps"] if not s["step"].startswith("hook.")}
    assert {steps[s] for s in ("export", "provision", "boot", "teardown")} == {"done"}, steps
    run_id = out["run_id"]
    assert of_run(openstack_cloud, "servers", run_id) == [] and images(openstack_cloud, run_id) == []
    (image,) = [r for r in SqliteState(state).resources(run_id, live=False) if r.kind == "image"]
    assert image.data["bytes"] == Archive.open(str(sample_archive)).resolve(POINT).size, "the raw point, whole"
    assert not any(r.kind == "file" for r in SqliteState(state).resources(run_id, live=False)), "no image file"
    booted = [r for r in openstack_cloud.doubles.requests if r == ("POST", "/compute/v2.1/servers")]
    assert booted, "Nova was asked for a server"


def test_failover_then_teardown(openstack_cloud: LocalCloud, sample_archive: Path, tmp_path: Path) -> None:
    doc = shipped("openstack-failover.yaml", flavor="m1.tiny", security_groups=["ssh"], availability_zone="az2")
    doc["network"]["mappings"] = [{"from": "prod-lan", "to": "private"}]
    db_nic = {"network": "private", "fixed_ip": "10.0.0.5"}
    doc["machines"][0]["target"]["settings"] = {"volume_size_gib": 2, "networks": [db_nic]}
    doc["machines"][1]["target"]["settings"] = {"networks": [{"network": "private", "fixed_ip": "10.0.0.11"}]}
    rb = tmp_path / "failover.yaml"
    rb.write_text(yaml.safe_dump(doc))
    state = tmp_path / "state"
    env = run_env(openstack_cloud, tmp_path)
    args = ["--archive", str(sample_archive), "--state", str(state), "--json"]
    done = lifeboat("failover", str(rb), "--yes", *args, env=env)
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout)["run_id"]
    servers = {s["name"].rsplit("-", 1)[-1]: s for s in of_run(openstack_cloud, "servers", run_id)}
    assert {n: s["status"] for n, s in servers.items()} == {"db01": "ACTIVE", "app01": "ACTIVE"}
    assert servers["db01"]["addresses"]["private"][0]["addr"] == "10.0.0.5"
    assert servers["app01"]["addresses"]["private"][0]["addr"] == "10.0.0.11"
    assert all(s["image"] == "" and s["OS-EXT-AZ:availability_zone"] == "az2" for s in servers.values())
    volumes = of_run(openstack_cloud, "volumes", run_id)
    assert sorted(v["size"] for v in volumes) == [1, 2] and {v["status"] for v in volumes} == {"in-use"}
    assert len(images(openstack_cloud, run_id)) == 2

    done = lifeboat("teardown", str(rb), "--yes", *args, env=env)
    assert done.returncode == 0, done.stderr
    assert of_run(openstack_cloud, "servers", run_id) == [] and of_run(openstack_cloud, "volumes", run_id) == []
    assert images(openstack_cloud, run_id) == []


def test_unknown_flavor_exits_1_naming_it(openstack_cloud: LocalCloud, sample_archive: Path, tmp_path: Path) -> None:
    doc = shipped("openstack-drill.yaml", isolated_network="private", security_groups=["ssh"], flavor="m9.nope")
    rb = tmp_path / "drill.yaml"
    rb.write_text(yaml.safe_dump(doc))
    env = run_env(openstack_cloud, tmp_path)
    done = lifeboat("run", str(rb), "--archive", str(sample_archive), "--state", str(tmp_path / "state"), env=env)
    assert done.returncode == 1, done.stderr
    assert "flavor 'm9.nope': not found" in done.stderr


def test_a_server_in_error_fails_the_drill_with_novas_fault_and_leaves_nothing(
    openstack_cloud: LocalCloud, sample_archive: Path, tmp_path: Path
) -> None:
    doc = shipped("openstack-drill.yaml", isolated_network="private", security_groups=["ssh"], flavor="x1.nohost")
    rb = tmp_path / "drill.yaml"
    rb.write_text(yaml.safe_dump(doc))
    env = run_env(openstack_cloud, tmp_path)
    state = tmp_path / "state"
    done = lifeboat("run", str(rb), "--archive", str(sample_archive), "--state", str(state), "--json", env=env)
    assert done.returncode == 1, done.stderr
    assert "went to ERROR: No valid host was found" in done.stderr
    run_id = json.loads(done.stdout)["run_id"]
    assert of_run(openstack_cloud, "servers", run_id) == [] and images(openstack_cloud, run_id) == []
    assert SqliteState(state).resources(run_id) == []
