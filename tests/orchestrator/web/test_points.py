"""A point's page and its actions against the real pane (``conftest.py``): downloads in two
formats checked against the disk that was backed up (``qemu-img compare``), an NBD export read
by ``qemu-img`` and then stopped, a rehearsal booted from an older point; viewers, forged forms
and unknown points change nothing."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx

from tests.orchestrator.web.conftest import DRILL, World
from tests.orchestrator.web.test_api import csrf_of, drill_runs, session, wait_done


def same_disk(image: Path | str, fmt: str, disk: Path) -> None:
    done = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(image), str(disk)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_point_downloads_as_an_image(world: World, tmp_path: Path) -> None:
    newest = world.points["web01"][-1]["point"]
    disk = world.archive.parent / "web01.img"  # the disk as the newest point took it
    with session(world, world.token) as client:
        page = client.get(f"/machines/web01/points/{newest}")
        assert page.status_code == 200 and "Download" in page.text and "qcow2" in page.text
        csrf = csrf_of(page)
        for fmt in ("raw", "qcow2"):
            r = client.post(f"/machines/web01/points/{newest}/export", data={"csrf": csrf, "format": fmt})
            assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
            name = r.headers["content-disposition"].split('filename="')[1].rstrip('"')
            assert name.startswith(f"web01-{newest}-") and name.endswith(".img" if fmt == "raw" else ".qcow2")
            (tmp_path / name).write_bytes(r.content)
            same_disk(tmp_path / name, fmt, disk)
        scratch = world.state / "web-exports"
        for _ in range(200):  # the qcow2's scratch file is removed once it has been sent
            if not any(scratch.iterdir()):
                break
            time.sleep(0.05)
        assert list(scratch.iterdir()) == []
        assert client.post(f"/machines/web01/points/{newest}/export",
                           data={"csrf": csrf, "format": "qcow3"}).status_code == 400
        assert client.post(f"/machines/web01/points/{newest}/export",
                           data={"csrf": "forged", "format": "raw"}).status_code == 403
        assert client.post("/machines/web01/points/000000000000/export",
                           data={"csrf": csrf, "format": "raw"}).status_code == 404
    with session(world, world.viewer_token) as viewer:
        page = viewer.get(f"/machines/web01/points/{newest}")
        assert page.status_code == 200 and "Download</button>" not in page.text
        r = viewer.post(f"/machines/web01/points/{newest}/export", data={"csrf": csrf_of(page), "format": "raw"})
        assert r.status_code == 403
    assert httpx.post(world.url + f"/machines/web01/points/{newest}/export", data={"format": "raw"}).status_code == 401


def test_a_point_is_served_over_nbd_then_stopped(world: World) -> None:
    newest = world.points["web01"][-1]["point"]
    with session(world, world.viewer_token) as viewer:
        csrf = csrf_of(viewer.get(f"/machines/web01/points/{newest}"))
        assert viewer.post(f"/machines/web01/points/{newest}/serve", data={"csrf": csrf}).status_code == 403
    with session(world, world.token) as client:
        csrf = csrf_of(client.get("/"))
        started = client.post(f"/machines/web01/points/{newest}/serve", data={"csrf": csrf})
        assert started.status_code == 303
        page = client.get(started.headers["location"])
        url = page.text.split('id="nbd-url">')[1].split("<")[0]
        assert url.startswith("nbd://127.0.0.1:") and url.endswith(f"/web01-{newest}")
        assert "serving" in client.get("/machines/web01").text
        same_disk(url, "raw", world.archive.parent / "web01.img")  # qemu-img reads NBD URLs
        listed = httpx.get(world.url + "/api/serves", headers={"Authorization": f"Bearer {world.token}"}).json()
        assert [(x["machine"], x["point"], x["url"]) for x in listed] == [("web01", newest, url)]
        stopped = client.post(f"/machines/web01/points/{newest}/unserve", data={"csrf": csrf})
        assert stopped.status_code == 303 and 'id="nbd-url"' not in client.get(stopped.headers["location"]).text
        assert client.get("/api/serves").json() == []
        gone = subprocess.run(["qemu-img", "info", url], capture_output=True, text=True)
        assert gone.returncode != 0


def test_a_rehearsal_starts_from_an_older_point(world: World) -> None:
    full = world.points["web01"][0]["point"]
    before = drill_runs(world)
    with session(world, world.token) as client:
        page = client.get(f"/machines/web01/points/{full}")
        assert "drill.yaml (web01)" in page.text
        csrf = csrf_of(page)
        refused = client.post(f"/machines/web01/points/{full}/rehearse",
                              data={"csrf": csrf, "runbook": "failover.yaml"})
        assert refused.status_code == 400
        assert drill_runs(world) == before
        started = client.post(f"/machines/web01/points/{full}/rehearse", data={"csrf": csrf, "runbook": "drill.yaml"})
        assert started.status_code == 303
        run = wait_done(world, started.headers["location"].removeprefix("/runs/"))
    assert (run["runbook"], run["status"]) == (DRILL, "succeeded")
    assert [(m["name"], m["point"]) for m in run["machines"]] == [("web01", full)]  # not the runbook's @latest

