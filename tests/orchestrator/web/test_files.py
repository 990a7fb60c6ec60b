"""The file browser of a point (single-item restore) against a pane of its own: machine ``files01``
with two points of a partitioned disk of known files (``tests/filerestore/disks.py``, cached), both
the newer one indexed from the page. The pane boots its appliance once for this module (the first
file request; under TCG on a loaded machine that takes minutes) and reuses it. Viewers browse and
find; only an operator downloads or indexes, and a downloaded file's bytes are the disk's."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page

from tests.filerestore.disks import build_disk, files
from tests.orchestrator.web.conftest import TOKEN, VIEWER_TOKEN, World, pane, shot
from tests.orchestrator.web.test_api import csrf_of, login
from tests.targets.realpeers import lifeboat


@contextmanager
def session(w: World, token: str) -> Iterator[httpx.Client]:
    """A client logged in with ``token`` that waits as long as the appliance takes to boot."""
    with httpx.Client(base_url=w.url, timeout=None) as client:
        assert login(w, client, token).status_code == 303
        yield client


def newest(w: World) -> str:
    return str(w.points["files01"][-1]["point"])


@pytest.fixture(scope="module")
def fworld(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("webfiles")
    archive, state = root / "archive", root / "state"
    lifeboat("archive", "init", "--chunk-size", "65536", "--archive", str(archive), check=True)
    for version in (1, 2):
        lifeboat("backup", "files01", str(build_disk(version)), "--archive", str(archive), check=True)
    points = json.loads(lifeboat("points", "files01", "--json", "--archive", str(archive), check=True).stdout)
    leftover = state / "web-exports" / "export-left-by-a-killed-pane"
    leftover.mkdir(parents=True)
    (leftover / "disk.qcow2").write_bytes(b"partial")
    with pane(root, ["--archive", str(archive), "--state", str(state)]) as url:
        assert not leftover.exists(), "the pane removes what an earlier one left in STATE/web-exports/"
        w = World(archive, state, url, TOKEN, VIEWER_TOKEN, root, {"files01": points}, "", root)
        with session(w, TOKEN) as operator:  # the newer point indexed from its page: boots the appliance
            base = f"/machines/files01/points/{newest(w)}/files"
            assert "Index this point" in (page := operator.get(base)).text
            assert operator.post(base + "/index", data={"csrf": csrf_of(page)}).status_code == 303
        yield w


def test_a_viewer_browses_and_finds_but_does_not_download(fworld: World) -> None:
    point = newest(fworld)
    api = f"/api/machines/files01/points/{point}/files"
    assert httpx.get(fworld.url + api).status_code == 401
    with session(fworld, fworld.viewer_token) as viewer:
        found = viewer.get(api).json()  # boots the pane's appliance
        assert [f["fstype"] for f in found["filesystems"]][:3] == ["ext4", "xfs", "vfat"]
        assert found["readable"] == ["/dev/sda1", "/dev/sda2", "/dev/sda3"]  # not the LUKS volume
        listing = viewer.get(api, params={"fs": "/dev/sda1", "path": "/etc"}).json()["entries"]
        conf = next(e for e in listing if e["name"] == "app.conf")
        assert (conf["type"], conf["size"]) == ("f", len(files(2)["ext4"]["/etc/app.conf"]))
        assert viewer.get(api, params={"fs": "/dev/sda1", "path": "/nowhere"}).status_code == 400
        assert viewer.get(api, params={"fs": "/dev/sda4", "path": "/"}).status_code == 422  # encrypted: not opened
        page = viewer.get(f"/machines/files01/points/{point}/files", params={"fs": "/dev/sda1", "path": "/etc"})
        assert page.status_code == 200 and "app.conf" in page.text and "Download</button>" not in page.text
        r = viewer.post(f"/machines/files01/points/{point}/files/get",
                        data={"csrf": csrf_of(page), "fs": "/dev/sda1", "path": "/etc/app.conf"})
        assert r.status_code == 403
    with session(fworld, fworld.token) as operator:
        page = operator.get(f"/machines/files01/points/{point}/files", params={"fs": "/dev/sda1", "path": "/etc"})
        csrf = csrf_of(page)
        get = f"/machines/files01/points/{point}/files/get"
        forged = {"csrf": "forged", "fs": "/dev/sda1", "path": "/etc/app.conf"}
        assert operator.post(get, data=forged).status_code == 403
        assert operator.post(get, data={"csrf": csrf, "fs": "/dev/sda1", "path": "/etc"}).status_code == 400  # a folder
        r = operator.post(get, data={"csrf": csrf, "fs": "/dev/sda1", "path": "/etc/app.conf"})
        assert r.status_code == 200 and r.content == files(2)["ext4"]["/etc/app.conf"]
        assert r.headers["content-disposition"] == 'attachment; filename="app.conf"'
        assert "This point is indexed." in page.text
    gone(fworld.state / "web-exports")
    older = str(fworld.points["files01"][0]["point"])
    with session(fworld, fworld.viewer_token) as viewer:
        assert viewer.post(f"/machines/files01/points/{older}/files/index", data={"csrf": csrf}).status_code == 403
        hits = viewer.get("/api/machines/files01/files", params={"pattern": "app.conf"}).json()
        assert [(m["point"], m["path"]) for m in hits["matches"]] == [(point, "/etc/app.conf")]
        assert hits["unindexed"] == [older]
        found = viewer.get("/machines/files01/files", params={"pattern": "/new.txt"})
        assert found.status_code == 200 and "1 match" in found.text
        assert "1 point of files01 has no file index" in found.text
        assert viewer.get("/machines/nobody/files", params={"pattern": "x"}).status_code == 404


def gone(scratch: Path) -> None:
    """The downloads' copies are removed once sent."""
    for _ in range(200):
        if not any(scratch.iterdir()):
            break
        time.sleep(0.05)
    assert list(scratch.iterdir()) == []


def test_browse_a_point_navigate_and_download_in_a_browser(fworld: World, page: Page, tmp_path: Path) -> None:
    point = newest(fworld)
    page.set_default_timeout(900_000)  # the appliance is up already unless this test runs alone
    page.goto(fworld.url + f"/machines/files01/points/{point}")
    page.fill("input#token", fworld.token)
    page.click("button[type=submit]")
    page.wait_for_url(fworld.url + f"/machines/files01/points/{point}")
    page.click("text=Browse files")
    page.wait_for_selector("#filesystems")
    page.click("#filesystems a:has-text('/dev/sda1')")
    page.wait_for_selector("#entries a.dir:has-text('data/')")
    page.click("#entries a.dir:has-text('data/')")  # htmx swaps the listing and pushes the URL
    page.wait_for_selector("#entries .file:has-text('big.bin')")
    assert page.url.endswith("fs=/dev/sda1&path=/data")
    page.click("#entries a.dir:has-text('nested/')")
    page.wait_for_selector("#entries a.dir:has-text('deep/')")
    page.click("h2.path a:has-text('data')")  # back up by the path's crumbs
    row = page.locator("#entries tr", has_text="big.bin")
    row.wait_for()
    assert "3.0 MiB" in row.inner_text() and "rw-r--r--" in row.inner_text()
    shot(page, tmp_path, "files")
    with page.expect_download() as caught:
        row.locator("button:has-text('Download')").click()
    download = caught.value
    assert download.suggested_filename == "big.bin"
    assert Path(download.path()).read_bytes() == files(2)["ext4"]["/data/big.bin"]

    page.fill("input[name=pattern]", "report.csv")
    page.click("#find button[type=submit]")
    page.wait_for_selector("#matches")
    assert page.locator("#matches tbody tr").count() == 1  # the indexed point; the other is said unindexed
    assert page.locator("#unindexed").is_visible()
    shot(page, tmp_path, "files-find")
    gone(fworld.state / "web-exports")
