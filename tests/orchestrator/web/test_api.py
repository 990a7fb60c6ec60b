"""``lifeboat web``'s JSON API and login, against a real server on a real archive and state folder
(``conftest.py``): 401 without the token, ``GET /api/machines`` as shared/CLI.md says, the pages'
JSON, the OpenAPI document, the session cookie and CSRF checks."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest

from lifeboat.archive import PointInfo
from lifeboat.archive.catalog import summarize
from lifeboat.orchestrator import api
from tests.orchestrator.web.conftest import DRILL, World

KEYS = ["machine", "points", "newest_point", "newest_time", "rpo_age_seconds", "rpo_objective_seconds", "status"]


def bearer(world: World) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.token}"}


@pytest.mark.parametrize("path", ["/api/machines", "/api/runs", "/api/archive", "/api/machines/web01/points",
                                  "/api/dashboard", "/api/serves",
                                  "/api/openapi.json"])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Basic d2ViOnRva2Vu", "Bearer"])
def test_the_api_answers_401_without_the_token(world: World, path: str, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    r = httpx.get(world.url + path, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "web01" not in r.text


def test_api_machines_is_what_cli_md_says(world: World) -> None:
    r = httpx.get(world.url + "/api/machines", headers=bearer(world))
    assert r.status_code == 200
    machines = r.json()
    assert [m["machine"] for m in machines] == ["db01", "web01"]
    for m in machines:
        assert list(m) == KEYS
        newest = world.points[m["machine"]][-1]
        assert m["points"] == len(world.points[m["machine"]])
        assert (m["newest_point"], m["newest_time"]) == (newest["point"], newest["time"])
        assert 0 <= m["rpo_age_seconds"] < 3600 and m["status"] == "compliant"
    # web01's objective is the drill runbook's rpo_objective; db01 keeps --rpo-objective's default
    assert [m["rpo_objective_seconds"] for m in machines] == [86400, 43200]
    assert [m["points"] for m in machines] == [1, 2]


def test_the_pages_json(world: World) -> None:
    points = httpx.get(world.url + "/api/machines/web01/points", headers=bearer(world)).json()
    full, incremental = world.points["web01"]
    assert [p["point"] for p in points] == [incremental["point"], full["point"]]  # newest first
    assert points[0]["parent"] == full["point"] and points[1]["parent"] is None
    for shown, listed in zip(points, [incremental, full], strict=True):
        assert {k: shown[k] for k in ("time", "size", "bytes_new", "bytes_stored")} == {
            k: listed[k] for k in ("time", "size", "bytes_new", "bytes_stored")}
    assert httpx.get(world.url + "/api/machines/db99/points", headers=bearer(world)).status_code == 404

    totals = httpx.get(world.url + "/api/archive", headers=bearer(world)).json()
    assert totals["machines"] == 2 and totals["points"] == 3 and totals["logical_bytes"] == 4 * 1024 * 1024
    assert 0 < totals["stored_bytes"] < totals["logical_bytes"]

    every = httpx.get(world.url + "/api/runs", headers=bearer(world)).json()
    runs = [r for r in every if r["runbook"] == "rehearse-web"]
    assert [(r["id"], r["status"]) for r in runs] == [(world.run_id, "succeeded")]
    assert runs[0]["reports"] == ["html", "json", "junit"]
    assert runs[0]["machines"][0]["name"] == "web01" and runs[0]["machines"][0]["rto_seconds"] > 0

    doc = httpx.get(world.url + "/api/openapi.json", headers=bearer(world)).json()
    assert {"/api/machines", "/api/runs", "/api/archive", "/api/machines/{machine}/points"} <= set(doc["paths"])


def test_the_dashboard_api_shows_protect_verified_and_offsite(world: World) -> None:
    doc = httpx.get(world.url + "/api/dashboard", headers=bearer(world)).json()
    rows = {m["machine"]: m for m in doc["machines"]}
    assert list(rows) == ["db01", "web01"] and doc["replica"] is True
    assert rows["web01"]["protect"]["state"] == "capturing" and rows["db01"]["protect"]["state"] == "stopped"
    verified = rows["web01"]["verified"]
    assert verified["point"] == world.points["web01"][-1]["point"] and verified["rto_seconds"] > 0
    assert rows["db01"]["verified"] is None  # no rehearsal has booted it
    assert rows["web01"]["offsite"] == {"newest_point": world.points["web01"][-1]["point"],
                                        "newest_time": world.points["web01"][-1]["time"], "lag_seconds": 0}
    never = rows["db01"]["offsite"]  # never replicated: its newest point's age
    assert never["newest_point"] is None and never["lag_seconds"] > 0
    assert doc["totals"]["points"] == 3


def login(world: World, client: httpx.Client, token: str) -> httpx.Response:
    form = client.get("/login")
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', form.text)
    assert csrf
    return client.post("/login", data={"token": token, "csrf": csrf.group(1), "next": "/runs"})


def test_login_sets_a_strict_httponly_session_and_needs_csrf(world: World) -> None:
    with httpx.Client(base_url=world.url) as client:
        refused = client.get("/")
        assert refused.status_code == 401 and 'name="token"' in refused.text and "web01" not in refused.text
        assert login(world, client, "wrong").status_code == 401
        no_csrf = client.post("/login", data={"token": world.token, "next": "/"})
        assert no_csrf.status_code == 403 and "lifeboat_session" not in no_csrf.headers.get("set-cookie", "")

        ok = login(world, client, world.token)
        assert ok.status_code == 303 and ok.headers["location"] == "/runs"
        cookie = ok.headers["set-cookie"]
        assert "lifeboat_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        page = client.get("/")
        assert page.status_code == 200 and "web01" in page.text and "db01" in page.text
        assert world.token not in page.text and world.token not in str(page.url)
        assert client.get("/api/machines").status_code == 200  # the pages' session reaches their JSON
        report = client.get(f"/runs/{world.run_id}/report/html")
        assert report.status_code == 200 and "rehearse-web" in report.text

        assert client.post("/logout", data={"csrf": "forged"}).status_code == 403
        assert client.get("/").status_code == 200
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert csrf and client.post("/logout", data={"csrf": csrf.group(1)}).status_code == 303
        assert client.get("/").status_code == 401


def test_login_next_stays_on_the_site(world: World) -> None:
    with httpx.Client(base_url=world.url) as client:
        form = client.get("/login", params={"next": "https://elsewhere.example/"})
        assert 'name="next" value="/"' in form.text


def test_rpo_status_against_the_objective() -> None:
    def point(machine: str, when: str) -> PointInfo:
        return PointInfo(machine, "p-" + when, when, None, 1, 1, 1, 1, 1, "test")

    now = datetime.fromisoformat("2026-01-02T00:00:00+00:00").timestamp()
    found = {
        "fresh": [point("fresh", "2026-01-01T23:00:00+00:00")],
        "late": [point("late", "2026-01-01T00:00:00+00:00"), point("late", "2026-01-01T22:00:00+00:00")],
        "gone": [point("gone", "2025-12-31T00:00:00+00:00")],
    }
    summaries = {m: s for m, ps in found.items() if (s := summarize(m, ps))}
    states = {s["machine"]: s for s in api.machine_states(summaries, 5400, now)}
    assert {m: s["status"] for m, s in states.items()} == {"fresh": "compliant", "late": "exceeded", "gone": "critical"}
    assert states["late"]["rpo_age_seconds"] == 7200 and states["late"]["points"] == 2


@contextmanager
def session(world: World, token: str) -> Iterator[httpx.Client]:
    """A client logged in with ``token``."""
    with httpx.Client(base_url=world.url) as client:
        assert login(world, client, token).status_code == 303
        yield client


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found
    return found.group(1)


def drill_runs(world: World) -> list[str]:
    return [r["id"] for r in httpx.get(world.url + "/api/runs", headers=bearer(world)).json() if r["runbook"] == DRILL]


def test_a_viewer_sees_everything_and_may_act_on_nothing(world: World) -> None:
    before = drill_runs(world)
    viewer = {"Authorization": f"Bearer {world.viewer_token}"}
    assert httpx.get(world.url + "/api/machines", headers=viewer).status_code == 200
    with session(world, world.viewer_token) as client:
        for path in ("/", "/runs", "/runbooks", "/machines/web01", f"/runs/{world.run_id}"):
            assert client.get(path).status_code == 200, path
        page = client.get("/runbooks")
        assert 'id="role">viewer<' in page.text and "Start rehearsal" not in page.text
        refused = client.post("/runbooks/drill.yaml/rehearse", data={"csrf": csrf_of(page)})
        assert refused.status_code == 403 and "viewers" in refused.text
    assert drill_runs(world) == before


def test_state_changing_requests_need_a_session_and_csrf(world: World) -> None:
    before = drill_runs(world)
    with httpx.Client(base_url=world.url) as anonymous:
        assert anonymous.post("/runbooks/drill.yaml/rehearse", data={"csrf": "x"}).status_code == 401
    # the API's bearer token does not open the pages' forms (they need the session and its CSRF)
    assert httpx.post(world.url + "/runbooks/drill.yaml/rehearse", headers=bearer(world)).status_code == 401
    with session(world, world.token) as client:
        page = client.get("/runbooks")
        assert 'id="role">operator<' in page.text and "Start rehearsal" in page.text
        assert client.post("/runbooks/drill.yaml/rehearse", data={"csrf": "forged"}).status_code == 403
        assert client.post("/runbooks/drill.yaml/rehearse", data={}).status_code == 403
        # only rehearsals start from this button; a runbook outside the folder does not exist
        assert client.post("/runbooks/failover.yaml/rehearse", data={"csrf": csrf_of(page)}).status_code == 400
        assert client.post("/runbooks/..%2Frehearse.yaml/rehearse", data={"csrf": csrf_of(page)}).status_code == 404
    assert drill_runs(world) == before


def test_the_runbooks_are_validated_and_planned(world: World) -> None:
    docs = {d["file"]: d for d in httpx.get(world.url + "/api/runbooks", headers=bearer(world)).json()}
    assert sorted(docs) == ["broken.yaml", "drill.yaml", "failover.yaml"]
    broken = docs["broken.yaml"]
    assert broken["plan"] is None and broken["problems"]
    assert all(re.match(rf"{re.escape(str(world.runbooks / 'broken.yaml'))}:\d+:\d+: ", p) for p in broken["problems"])
    drill = docs["drill.yaml"]
    assert drill["problems"] == [] and drill["unavailable"] == []
    assert drill["plan"]["runbook"] == DRILL and drill["plan"]["kind"] == "rehearsal"
    newest = world.points["web01"][-1]["point"]
    assert drill["plan"]["machines"][0]["resolved"]["point"] == newest
    assert docs["failover.yaml"]["plan"]["kind"] == "failover"


def sse(text: str) -> list[dict[str, str]]:
    """The messages of an event stream, as field -> value."""
    messages = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        messages.append(fields)
    return messages


def test_a_run_streams_its_events_then_done(world: World) -> None:
    with session(world, world.viewer_token) as client:
        with client.stream("GET", f"/runs/{world.run_id}/events") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            messages = sse(r.read().decode())
        assert messages[-1] == {"event": "done", "data": "{}"}
        progress = messages[:-1]
        assert progress and all(m["event"] == "progress" for m in progress)
        ids = [int(m["id"]) for m in progress]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        first = json.loads(progress[0]["data"])
        assert first["id"] == ids[0] and "started" in first["message"]
        # a browser that reconnects sends the last id it saw and gets only what came after
        resumed = sse(client.get(f"/runs/{world.run_id}/events", headers={"Last-Event-ID": str(ids[0])}).text)
        assert [int(m["id"]) for m in resumed[:-1]] == ids[1:]
        assert client.get("/runs/no-such-run/events").status_code == 404
    assert httpx.get(world.url + f"/runs/{world.run_id}/events").status_code == 401


def runs_of(world: World, runbook: str) -> list[dict[str, Any]]:
    return [r for r in httpx.get(world.url + "/api/runs", headers=bearer(world)).json() if r["runbook"] == runbook]


def wait_done(world: World, run_id: str) -> dict[str, Any]:
    """The run once it has ended (its child process runs it)."""
    for _ in range(600):
        doc: dict[str, Any] = httpx.get(world.url + f"/api/runs/{run_id}", headers=bearer(world)).json()
        if doc["ended"]:
            return doc
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} never ended")


def test_failover_needs_the_typed_name_and_teardown_removes_what_it_left(world: World) -> None:
    with session(world, world.viewer_token) as viewer:
        csrf = csrf_of(viewer.get("/runbooks"))
        for action in ("failover", "teardown"):
            r = viewer.post(f"/runbooks/failover.yaml/{action}", data={"csrf": csrf, "confirm": "web-failover"})
            assert r.status_code == 403, action
    assert runs_of(world, "web-failover") == []
    with session(world, world.token) as client:
        page = client.get("/runbooks")
        csrf = csrf_of(page)
        assert "Start failover" in page.text
        for wrong in ("", "web-failover2", "WEB-FAILOVER", "failover.yaml"):
            refused = client.post("/runbooks/failover.yaml/failover", data={"csrf": csrf, "confirm": wrong})
            assert refused.status_code == 400 and "type the runbook&#39;s name" in refused.text, wrong
        forged = client.post("/runbooks/failover.yaml/failover", data={"csrf": "forged", "confirm": "web-failover"})
        assert forged.status_code == 403
        assert client.post("/runbooks/drill.yaml/failover", data={"csrf": csrf, "confirm": DRILL}).status_code == 400
        assert runs_of(world, "web-failover") == []
        # nothing to tear down yet
        assert client.post("/runbooks/failover.yaml/teardown",
                           data={"csrf": csrf, "confirm": "web-failover"}).status_code == 409

        started = client.post("/runbooks/failover.yaml/failover", data={"csrf": csrf, "confirm": "web-failover"})
        assert started.status_code == 303
        run_id = started.headers["location"].removeprefix("/runs/")
        done = wait_done(world, run_id)
        assert (done["kind"], done["status"]) == ("failover", "succeeded")

        # a failover's machines serve: its teardown needs the typed name too
        kept = client.post("/runbooks/failover.yaml/teardown", data={"csrf": csrf, "confirm": "nope"})
        assert kept.status_code == 400 and wait_done(world, run_id)["status"] == "succeeded"
        removed = client.post("/runbooks/failover.yaml/teardown", data={"csrf": csrf, "confirm": "web-failover"})
        assert removed.status_code == 303 and removed.headers["location"] == f"/runs/{run_id}"
        # the teardown runs in the background; the run has not ended until it is over
        torn = wait_done(world, run_id)
        assert torn["status"] == "torn-down" and torn["teardown"] == {"state": "done"}
        assert any(s["step"] == "teardown" and s["status"] == "done" for s in torn["steps"])
        logs = list((world.state / "web-runs").glob("web-failover-*.log"))
        assert {p.name.split("-")[2] for p in logs} == {"failover", "teardown"}
