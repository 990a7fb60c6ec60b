"""The FastAPI application of ``lifeboat web``: pages (dashboard, machine, runs), their JSON under
``/api/``, the login form and the report files of runs.

Every route but ``/login`` and ``/static`` needs the token: the API as ``Authorization: Bearer``
(or the pages' session), the pages as the session cookie; without it the API answers 401 and a
page answers 401 with the login form. Data comes from the facade (``orchestrator/api.py``) and the
archive, read per request, so the pane shows new points and runs without a restart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from lifeboat.archive import Archive, PointInfo
from lifeboat.orchestrator import api
from lifeboat.orchestrator.state import Run
from lifeboat.orchestrator.web.auth import Auth
from lifeboat.plumbing.errors import LifeboatError

HERE = Path(__file__).resolve().parent
REPORT_TYPES = {"json": "application/json", "junit": "application/xml", "html": "text/html"}
# Our pages load only our own files: no inline script, no other origin, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Settings:
    """What ``lifeboat web`` was started with."""

    archive: Archive
    state_dir: Path | None
    rpo_objective: float
    token: str
    tls: bool


class NeedLogin(Exception):
    """A page was asked for without a session: answered with the login form and 401."""


def fmt_bytes(n: int | None) -> str:
    """``1.5 GiB``: sizes as people read them."""
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def fmt_age(seconds: float | None) -> str:
    """``3 h 12 min``: an age or a duration at a glance."""
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s < 600 and s % 60 else f"{s // 60} min"
    if s < 86400:
        big, small, units = s // 3600, s % 3600 // 60, ("h", "min")
    else:
        big, small, units = s // 86400, s % 86400 // 3600, ("d", "h")
    return f"{big} {units[0]} {small} {units[1]}" if small else f"{big} {units[0]}"


def fmt_ratio(value: float) -> str:
    """``3.2`` or ``140``: a ratio with the digits that matter."""
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def fmt_time(value: str | float | None) -> str:
    """An ISO time or a Unix time as ``2026-11-30 01:02:03 UTC``."""
    if value is None:
        return "—"
    when = datetime.fromtimestamp(value, UTC) if isinstance(value, float | int) else datetime.fromisoformat(value)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_doc(r: Run) -> dict[str, Any]:
    """A run as the pages and ``/api/runs`` show it: its status, duration, per-machine RTO and
    which report files it has (served under ``/runs/ID/report/FORMAT``)."""
    report = r.report or {}
    machines = [
        {k: m.get(k) for k in ("name", "status", "point", "rto_seconds", "rpo_seconds", "rto_met")}
        for m in report.get("machines", [])
    ]
    return {
        "id": r.id,
        "runbook": r.runbook,
        "kind": r.kind,
        "status": r.status,
        "phase": r.phase,
        "started": r.started,
        "finished": r.finished,
        "duration_seconds": round(r.finished - r.started, 3) if r.finished else None,
        "machines": machines,
        "reports": sorted(fmt for fmt in report.get("files", {}) if fmt in REPORT_TYPES),
    }


def point_doc(p: PointInfo) -> dict[str, Any]:
    """A point as the machine page and its API show it."""
    return {"point": p.point, "time": p.time, "parent": p.parent, "size": p.size, "bytes_new": p.bytes_new,
            "bytes_stored": p.bytes_stored, "source": p.source}


def local_path(target: str) -> str:
    """``target`` if it is a path of this site, else ``/``: the login form's ``next`` cannot send
    the browser elsewhere."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def create_app(settings: Settings) -> FastAPI:
    """The application for ``settings``; ``lifeboat web`` serves it with uvicorn."""
    auth = Auth(settings.token, secure_cookies=settings.tls)
    app = FastAPI(
        title="lifeboat",
        summary="The state of a lifeboat archive and its runs",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(bytes=fmt_bytes, age=fmt_age, time=fmt_time, ratio=fmt_ratio)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        seed, new = auth.csrf_seed(request)
        response = templates.TemplateResponse(
            request, name, {"csrf": auth.csrf_token(seed), "logged_in": auth.session_ok(request), **context},
            status_code=status,
        )
        if new:
            auth.remember_csrf(response, seed)
        return response

    @app.exception_handler(NeedLogin)
    async def need_login(request: Request, exc: NeedLogin) -> HTMLResponse:
        return page(request, "login.html", 401, next=request.url.path, error=None)

    def api_guard(request: Request) -> None:
        if not auth.allowed(request):
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    def page_guard(request: Request) -> None:
        if not auth.session_ok(request):
            raise NeedLogin

    def catalog() -> dict[str, list[PointInfo]]:
        return api.catalog(settings.archive)

    def runs() -> list[Run]:
        state = api.open_state(settings.state_dir)
        try:
            return api.runs(state)
        finally:
            state.close()

    def latest_runs() -> list[Run]:
        state = api.open_state(settings.state_dir)
        try:
            return api.latest_runs(state)
        finally:
            state.close()

    def machine_points(machine: str) -> list[PointInfo]:
        try:
            found = settings.archive.points(machine)
        except LifeboatError as e:
            raise HTTPException(404, str(e)) from None
        if not found:
            raise HTTPException(404, f"machine {machine!r} has no points in the archive")
        return found

    # ------------------------------------------------------------------ API
    @app.get("/api/machines", tags=["api"])
    def api_machines(request: Request) -> list[dict[str, Any]]:
        """Every machine: its points, newest point and its time, RPO age against the objective, status."""
        api_guard(request)
        return api.machine_states(catalog(), settings.rpo_objective)

    @app.get("/api/machines/{machine}/points", tags=["api"])
    def api_points(request: Request, machine: str) -> list[dict[str, Any]]:
        """The points of one machine, newest first."""
        api_guard(request)
        return [point_doc(p) for p in reversed(machine_points(machine))]

    @app.get("/api/archive", tags=["api"])
    def api_archive(request: Request) -> dict[str, Any]:
        """What the archive holds: machines, points, logical and stored bytes."""
        api_guard(request)
        return api.archive_totals(catalog())

    @app.get("/api/runs", tags=["api"])
    def api_runs(request: Request) -> list[dict[str, Any]]:
        """Every run, newest first, with per-machine RTO and its report formats."""
        api_guard(request)
        return [run_doc(r) for r in reversed(runs())]

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(request: Request) -> JSONResponse:
        api_guard(request)
        return JSONResponse(app.openapi())

    # ------------------------------------------------------------------ pages
    @app.get("/login", include_in_schema=False)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return page(request, "login.html", next=local_path(next), error=None)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await request.form()
        target = local_path(str(form.get("next", "/")))
        if not auth.csrf_ok(request, str(form.get("csrf", ""))):
            return page(request, "login.html", 403, next=target, error="The form expired: please log in again.")
        if not auth.token_matches(str(form.get("token", ""))):
            return page(request, "login.html", 401, next=target, error="That token is not valid.")
        response = RedirectResponse(target, status_code=303)
        auth.open_session(response)
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        form = await request.form()
        if not auth.csrf_ok(request, str(form.get("csrf", ""))):
            raise HTTPException(403, "the form's CSRF token is missing or wrong")
        response = RedirectResponse("/login", status_code=303)
        auth.close_session(request, response)
        return response

    @app.get("/", include_in_schema=False)
    def dashboard(request: Request) -> HTMLResponse:
        page_guard(request)
        points = catalog()
        return page(
            request, "dashboard.html", machines=api.machine_states(points, settings.rpo_objective),
            totals=api.archive_totals(points), runbooks=[run_doc(r) for r in latest_runs()],
            objective=settings.rpo_objective, now=time.time(),
        )

    @app.get("/fragments/machines", include_in_schema=False)
    def machines_fragment(request: Request) -> HTMLResponse:
        page_guard(request)
        return page(request, "_machines.html", machines=api.machine_states(catalog(), settings.rpo_objective))

    @app.get("/machines/{machine}", include_in_schema=False)
    def machine_page(request: Request, machine: str) -> HTMLResponse:
        page_guard(request)
        found = machine_points(machine)
        state = api.machine_states({machine: found}, settings.rpo_objective)[0]
        return page(request, "machine.html", machine=state, points=[point_doc(p) for p in reversed(found)],
                    total_stored=sum(p.bytes_stored for p in found))

    @app.get("/runs", include_in_schema=False)
    def runs_page(request: Request) -> HTMLResponse:
        page_guard(request)
        return page(request, "runs.html", runs=[run_doc(r) for r in reversed(runs())])

    @app.get("/runs/{run_id}/report/{fmt}", include_in_schema=False)
    def report_file(request: Request, run_id: str, fmt: str) -> FileResponse:
        page_guard(request)
        found = next((r for r in runs() if r.id == run_id), None)
        path = ((found.report or {}).get("files", {}) if found else {}).get(fmt)
        if fmt not in REPORT_TYPES or not path or not Path(path).is_file():
            raise HTTPException(404, f"run {run_id} has no {fmt} report")
        # the HTML report carries its own inline style and nothing else
        return FileResponse(path, media_type=REPORT_TYPES[fmt], headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"})

    @app.get("/api", include_in_schema=False)
    def api_page(request: Request) -> HTMLResponse:
        page_guard(request)
        return page(request, "api.html", schema=app.openapi())

    return app
