"""The pane in a real browser: Debian's chromium driven by Playwright (it cannot download its own
browser here, so it is launched from ``/usr/bin/chromium``, once per session; a missing chromium
fails the test). Logs in, sees the archive's machines on the dashboard, opens a machine page and the
runs page, and is refused without logging in. A screenshot of each page is kept under the test's
tmp folder and under ``/tmp/lifeboat-web-shots/`` for people to look at."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import Page

from tests.orchestrator.web.conftest import DRILL, World, shot


def test_refused_without_logging_in(world: World, page: Page, tmp_path: Path) -> None:
    response = page.goto(world.url + "/machines/web01")
    assert response is not None and response.status == 401
    assert page.locator("input#token").is_visible() and page.locator("table").count() == 0
    shot(page, tmp_path, "login")
    page.fill("input#token", "not-the-token")
    page.click("button[type=submit]")
    assert page.get_by_role("alert").inner_text() == "That token is not valid."
    shot(page, tmp_path, "login-refused")


def test_log_in_see_the_machines_open_one_and_the_runs(world: World, page: Page, tmp_path: Path) -> None:
    page.goto(world.url + "/")
    page.fill("input#token", world.token)
    page.click("button[type=submit]")
    page.wait_for_url(world.url + "/")
    rows = page.locator("#machines tbody tr")
    assert rows.count() == 2
    assert [rows.nth(i).locator("td").first.inner_text() for i in range(2)] == ["db01", "web01"]
    db01, web01 = rows.nth(0), rows.nth(1)
    assert web01.locator("td").nth(1).inner_text() == "compliant"
    assert str(world.points["web01"][-1]["point"]) in web01.inner_text()
    assert "/ 12 h" in web01.inner_text() and "/ 1 d" in db01.inner_text()  # the runbook's objective, the default
    assert web01.locator(".protect").inner_text() == "capturing" and db01.locator(".protect").inner_text() == "stopped"
    assert "ago" in web01.locator(".verified").inner_text() and db01.locator(".verified").inner_text() == "never"
    assert web01.locator(".offsite").inner_text() == "up to date"
    assert db01.locator(".offsite").inner_text() == "not off-site"
    assert "rehearse-web" in page.locator("#runbooks").inner_text()
    assert world.token not in page.content()
    shot(page, tmp_path, "dashboard")

    page.click("text=web01")
    page.wait_for_url(world.url + "/machines/web01")
    points = page.locator("#points tbody tr.point")
    assert points.count() == 2
    full, incremental = world.points["web01"]
    assert str(incremental["point"]) in points.nth(0).inner_text()
    assert str(full["point"]) in points.nth(0).locator("td").last.inner_text()  # its parent
    assert points.nth(1).locator("td").last.inner_text() == "full"
    assert page.locator("#points tr.day").first.inner_text() == str(incremental["time"])[:10]  # grouped by date
    shot(page, tmp_path, "machine")

    points.nth(0).locator("a").first.click()  # the point's page: download, serve, rehearse, files
    page.wait_for_url(world.url + f"/machines/web01/points/{incremental['point']}")
    assert page.get_by_label("image format").input_value() == "qcow2"
    assert "drill.yaml (web01)" in page.get_by_label("rehearsal runbook").inner_text()
    page.locator("#serve").get_by_role("button", name="Serve").click()
    assert page.locator("#nbd-url").inner_text().startswith("nbd://127.0.0.1:")
    shot(page, tmp_path, "point-serving")
    page.locator("#serve").get_by_role("button", name="Stop serving").click()
    assert page.locator("#nbd-url").count() == 0

    page.click("nav >> text=Runs")
    page.wait_for_url(world.url + "/runs")
    run = page.locator("#runs tbody tr", has_text=world.run_id)  # other tests start runs too
    assert run.count() == 1 and "succeeded" in run.inner_text()
    shot(page, tmp_path, "runs")
    with page.expect_navigation():
        run.locator("a", has_text="HTML").click()
    assert "rehearse-web" in page.content()
    shot(page, tmp_path, "report")

    page.goto(world.url + "/api")
    assert "/api/machines" in page.locator("#endpoints").inner_text()
    shot(page, tmp_path, "api")

    page.goto(world.url + "/")
    page.click("text=Log out")
    page.wait_for_url(world.url + "/login")
    assert page.goto(world.url + "/") is not None and page.locator("input#token").is_visible()


def test_an_operator_starts_a_rehearsal_and_sees_it_succeed(world: World, page: Page, tmp_path: Path) -> None:
    page.goto(world.url + "/runbooks")
    page.fill("input#token", world.token)
    page.click("button[type=submit]")
    page.wait_for_url(world.url + "/runbooks")
    broken = page.locator('[id="runbook-broken.yaml"]')
    assert "invalid" in broken.inner_text() and "broken.yaml:" in broken.locator(".problems").inner_text()
    failover = page.locator('[id="runbook-failover.yaml"]')
    assert failover.get_by_role("button", name="Start rehearsal").count() == 0
    failover.get_by_label("confirm failover").fill("web-failover?")  # not its name: refused, nothing starts
    failover.get_by_role("button", name="Start failover").click()
    alert = page.locator('[id="runbook-failover.yaml"] [role=alert]')
    assert "type the runbook's name, web-failover, to confirm" in alert.inner_text()
    shot(page, tmp_path, "failover-refused")
    drill = page.locator('[id="runbook-drill.yaml"]')
    assert "web01" in drill.locator("table.plan").inner_text()
    shot(page, tmp_path, "runbooks")

    drill.get_by_role("button", name="Start rehearsal").click()
    page.wait_for_url(re.compile(re.escape(world.url) + r"/runs/[0-9T]+-[0-9a-f]+$"))
    assert page.locator("#run-status").inner_text() == "running"
    page.locator("#run-status", has_text="succeeded").wait_for(timeout=120_000)  # the page follows the run
    assert page.locator("#steps tbody tr").count() > 1
    statuses = page.locator("#steps tbody .badge").all_inner_texts()
    assert statuses and set(statuses) == {"done"}
    shot(page, tmp_path, "run")
    run_url = page.url
    with page.expect_navigation():
        page.locator("#run-reports a", has_text="HTML").click()
    assert DRILL in page.content()

    page.goto(world.url + "/runs")  # the drill's RTO and RPO are on the charts
    for chart in ("#rto-chart", "#rpo-chart"):
        assert page.locator(f"{chart} svg circle").count() >= 2 and "web01" in page.locator(chart).inner_text()
    shot(page, tmp_path, "runs-charts")

    page.click("nav >> text=Runbooks")  # a teardown goes on in the background; the run page follows it
    page.locator('[id="runbook-drill.yaml"]').get_by_role("button", name="Tear down last run").click()
    page.wait_for_url(run_url)
    page.locator("#teardown", has_text="Torn down").wait_for(timeout=60_000)
    assert page.locator("#run-status").inner_text() == "torn-down"
    shot(page, tmp_path, "run-torn-down")
