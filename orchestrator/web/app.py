"""The FastAPI application of ``lifeboat web``: pages (dashboard, machine, runs), their JSON under
``/api/``, the login form and the report files of runs.

Every route but ``/login`` and ``/static`` needs the token: the API as ``Authorization: Bearer``
(or the pages' session), the pages as the session cookie; without it the API answers 401 and a
page answers 401 with the login form. Data comes from the facade (``orchestrator/api.py``) and the
archive, read per request (the catalog through ``archive.catalog.Catalog``, which re-reads only the
machines whose points changed), so the pane shows new points and runs without a restart.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.catalog import Catalog, MachineSummary, summarize
from lifeboat.archive.fileindex import Match, read_manifest
from lifeboat.archive.points import parse_selector
from lifeboat.filerestore import indexed, session
from lifeboat.orchestrator import api, overview
from lifeboat.orchestrator.runbook import InvalidRunbook, Runbook, load
from lifeboat.orchestrator.state import Run, Step, default_state_dir
from lifeboat.orchestrator.web import charts
from lifeboat.orchestrator.web.auth import OPERATOR, Auth
from lifeboat.orchestrator.web.files import Appliance, error_status, file_download
from lifeboat.orchestrator.web.points import Serves, export_formats, export_response
from lifeboat.plumbing.errors import LifeboatError, UsageError

HERE = Path(__file__).resolve().parent
RUNBOOK_SUFFIXES = (".yaml", ".yml")
FOLLOW_SECONDS = 0.5  # how often a run's stream looks for new events
REPLICA_SECONDS = 30  # how long the replica's listed catalog is shown before it is listed again
KEEP_LOGS = 50  # the newest output logs of started runs and teardowns kept in STATE/web-runs/
RUNS_SHOWN = 200  # rows of the Runs page's table (its charts and /api/runs have every run)
RUN_START_SECONDS = 60  # how long a started `lifeboat run` may take to record its run
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
    viewer_token: str | None = None
    runbooks: Path | None = None  # --runbooks DIR
    archive_arg: str | None = None  # --archive as given, passed on to the runs it starts
    key_file: str | None = None
    protect_status: Path | None = None  # --protect-status DIR: the status files of `lifeboat protect`
    replica: Archive | None = None  # --replica DEST: the off-site copy `lifeboat replicate` fills


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


def run_ended(r: Run) -> bool:
    """Whether ``r`` has ended (its report written): a run no longer running, done or left open to
    be resumed (a failed failover keeps its machines)."""
    return r.status != "running" and r.report is not None


def run_doc(r: Run) -> dict[str, Any]:
    """A run as the pages and ``/api/runs`` show it: its status, duration, per-machine RTO and
    which report files it has (served under ``/runs/ID/report/FORMAT``)."""
    report = r.report or {}
    machines = [
        {k: m.get(k) for k in ("name", "status", "point", "rto_seconds", "rpo_seconds", "rto_met")}
        for m in report.get("machines", [])
    ]
    return {
        **api.run_fields(r),
        "ended": run_ended(r),
        "duration_seconds": round(r.finished - r.started, 3) if r.finished else None,
        "machines": machines,
        "reports": sorted(fmt for fmt in report.get("files", {}) if fmt in REPORT_TYPES),
    }


def point_doc(p: PointInfo) -> dict[str, Any]:
    """A point as the machine page and its API show it."""
    return {"point": p.point, "time": p.time, "parent": p.parent, "size": p.size, "bytes_new": p.bytes_new,
            "bytes_stored": p.bytes_stored, "source": p.source}


def step_doc(s: Step) -> dict[str, Any]:
    """A step as the run page shows it."""
    took = round(s.finished - s.started, 3) if s.started and s.finished else None
    return {"machine": s.machine, "step": s.step, "status": s.status, "started": s.started,
            "duration_seconds": took, "attempts": s.attempts, "error": s.error}


def runbook_files(folder: Path | None) -> list[Path]:
    """The runbook files of ``--runbooks DIR``, by name."""
    if folder is None:
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in RUNBOOK_SUFFIXES and p.is_file())


def prune_logs(folder: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` logs of ``folder``."""
    logs = sorted(folder.glob("*.log"), key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    for old in logs[keep:]:
        old.unlink(missing_ok=True)


def local_path(target: str) -> str:
    """``target`` if it is a path of this site, else ``/``: the login form's ``next`` cannot send
    the browser elsewhere."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def create_app(settings: Settings) -> FastAPI:
    """The application for ``settings``; ``lifeboat web`` serves it with uvicorn."""
    auth = Auth(settings.token, settings.viewer_token, secure_cookies=settings.tls)
    archive_args = ["--archive", settings.archive_arg] if settings.archive_arg else []
    archive_args += ["--key-file", settings.key_file] if settings.key_file else []
    state_dir = (settings.state_dir or default_state_dir()).resolve()  # as the state store resolves it
    serves = Serves(archive_args, state_dir / "web-runs")
    appliance = Appliance(settings.archive)
    shutil.rmtree(state_dir / "web-exports", ignore_errors=True)  # what a pane killed mid-download left

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        serves.stop_all()  # the NBD exports the pane started end with it
        appliance.close()

    app = FastAPI(
        title="lifeboat",
        summary="The state of a lifeboat archive and its runs",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(bytes=fmt_bytes, age=fmt_age, time=fmt_time, ratio=fmt_ratio,
                                 filemode=lambda mode: "?????????" if mode is None else stat.filemode(mode)[1:])
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
            request, name, {"csrf": auth.csrf_token(seed), "role": auth.session_role(request), **context},
            status_code=status,
        )
        if new:
            auth.remember_csrf(response, seed)
        return response

    @app.exception_handler(NeedLogin)
    async def need_login(request: Request, exc: NeedLogin) -> HTMLResponse:
        return page(request, "login.html", 401, next=request.url.path, error=None)

    def api_guard(request: Request) -> None:
        if not auth.role(request):
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    def page_guard(request: Request) -> None:
        if not auth.session_role(request):
            raise NeedLogin

    async def operator_form(request: Request) -> dict[str, str]:
        """The form of a state-changing page request, once its sender is known (401), is an
        operator (403) and the form carries this browser's CSRF token (403)."""
        role = auth.session_role(request)
        if not role:
            raise HTTPException(401, "log in first")
        if role != OPERATOR:
            raise HTTPException(403, "viewers may look, not act: log in with an operator's token")
        form = {k: str(v) for k, v in (await request.form()).items()}
        if not auth.csrf_ok(request, form.get("csrf", "")):
            raise HTTPException(403, "the form's CSRF token is missing or wrong")
        return form

    catalog = Catalog(settings.archive)  # per-machine summaries, re-read where points changed
    replica = Catalog(settings.replica) if settings.replica is not None else None
    replica_seen: list[tuple[float, dict[str, MachineSummary]]] = []  # when it was last listed, and what
    runbook_seen: dict[Path, tuple[int, Runbook | None]] = {}  # by file: its mtime and what it held

    def valid_runbooks() -> list[Runbook]:
        """The valid runbooks of ``--runbooks``, each loaded again only once its file changed."""
        out = []
        for path in runbook_files(settings.runbooks):
            mtime = path.stat().st_mtime_ns
            seen = runbook_seen.get(path)
            if seen is None or seen[0] != mtime:
                try:
                    seen = (mtime, load(path))
                except LifeboatError:
                    seen = (mtime, None)
                runbook_seen[path] = seen
            if seen[1] is not None:
                out.append(seen[1])
        return out

    def machine_rows(summaries: dict[str, MachineSummary], now: float | None = None) -> list[dict[str, Any]]:
        """``GET /api/machines``: each machine's RPO row against its objective (runbooks, else
        ``--rpo-objective``)."""
        return api.machine_states(summaries, settings.rpo_objective, now, overview.rpo_objectives(valid_runbooks()))

    def replica_summaries() -> tuple[dict[str, MachineSummary] | None, str | None]:
        """The replica's catalog, listed again at most every ``REPLICA_SECONDS`` (an object store's
        listing costs more than a dashboard refresh is worth), or why it cannot be read now."""
        if replica is None:
            return None, None
        now = time.monotonic()
        if not replica_seen or now - replica_seen[0][0] > REPLICA_SECONDS:
            try:
                replica_seen[:] = [(now, replica.summaries())]
            except LifeboatError as e:
                return None, f"the replica cannot be read: {e}"
        return replica_seen[0][1], None

    def dashboard_doc() -> dict[str, Any]:
        """The dashboard's data (``GET /api/dashboard``): each machine's RPO row with its protect
        loop, its last verified restore and its off-site lag; the archive's totals; the newest run
        of each runbook."""
        now = time.time()
        summaries = catalog.summaries()
        rows = machine_rows(summaries, now)
        protect = overview.protect_states(settings.protect_status, now)
        verified = overview.last_verified(verifying_runs())
        there, replica_error = replica_summaries()
        lag = overview.offsite_lag(summaries, there, now) if there is not None else {}
        for row in rows:
            m = row["machine"]
            row["protect"] = protect.get(m)
            row["verified"] = verified.get(m)
            row["offsite"] = lag.get(m)
        return {"machines": rows, "totals": api.archive_totals(summaries), "replica": replica is not None,
                "replica_error": replica_error,
                "runbooks": [run_doc(r) for r in latest_runs()], "now": now}

    def runs() -> list[Run]:
        state = api.open_state(settings.state_dir)
        try:
            return api.runs(state)
        finally:
            state.close()

    def verifying_runs() -> list[Run]:
        state = api.open_state(settings.state_dir)
        try:
            return api.verifying_runs(state)
        finally:
            state.close()

    def latest_runs() -> list[Run]:
        state = api.open_state(settings.state_dir)
        try:
            return api.latest_runs(state)
        finally:
            state.close()

    def run_detail(run_id: str) -> dict[str, Any]:
        state = api.open_state(settings.state_dir)
        try:
            found = state.run(run_id)
            if found is None:
                raise HTTPException(404, f"no run {run_id}")
            doc = {**run_doc(found), "steps": [step_doc(s) for s in state.steps(run_id)],
                   "events": state.events(run_id), "teardown": teardown_doc(run_id)}
            doc["ended"] = doc["ended"] and not tearing_down(run_id)
            return doc
        finally:
            state.close()

    def run_news(run_id: str, after: int) -> tuple[list[dict[str, Any]], bool]:
        """The run's events after id ``after``, and whether the run had ended before they were read
        (then they are its last)."""
        state = api.open_state(settings.state_dir)
        try:
            found = state.run(run_id)
            ended = found is None or run_ended(found) and not tearing_down(run_id)
            return api.events_after(state, run_id, after), ended
        finally:
            state.close()

    async def follow(request: Request, run_id: str, after: int) -> AsyncIterator[str]:
        """Server-Sent Events: each new event of the run as ``progress`` (its id as the SSE id, so a
        reconnecting browser resumes after it), then ``done`` once the run has ended."""
        while True:
            events, ended = await run_in_threadpool(run_news, run_id, after)
            for e in events:
                after = e["id"]
                yield f"id: {after}\nevent: progress\ndata: {json.dumps(e)}\n\n"
            if ended:
                yield "event: done\ndata: {}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(FOLLOW_SECONDS)

    def machine_points(machine: str) -> list[PointInfo]:
        try:
            found = settings.archive.points(machine)
        except LifeboatError as e:
            raise HTTPException(404, str(e)) from None
        if not found:
            raise HTTPException(404, f"machine {machine!r} has no points in the archive")
        return found

    def runbook_doc(path: Path) -> dict[str, Any]:
        """A runbook file as its page shows it: its problems (``file:line:col``) or its plan, and
        the drivers this lifeboat lacks."""
        doc: dict[str, Any] = {"file": path.name, "problems": [], "plan": None, "unavailable": []}
        try:
            rb = load(path)
        except InvalidRunbook as e:
            doc["problems"] = [str(p) for p in e.problems]
            return doc
        except LifeboatError as e:
            doc["problems"] = [str(e)]
            return doc
        doc["plan"] = api.plan(rb, archive=settings.archive_arg, key_file=settings.key_file)
        doc["unavailable"] = api.unavailable_drivers(rb)
        return doc

    def runbook_file(name: str) -> Path:
        found = next((p for p in runbook_files(settings.runbooks) if p.name == name), None)
        if found is None:
            raise HTTPException(404, f"no runbook {name!r} in --runbooks")
        return found

    def spawn(rb: Runbook, command: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        """Start ``lifeboat COMMAND RUNBOOK`` as a child in its own session, its output in a new log
        of ``STATE/web-runs/`` (the newest ``KEEP_LOGS`` are kept). A child rather than a thread of
        this server: it outlives a restart or a crash of the pane, and records its own output."""
        cmd = [sys.executable, "-m", "lifeboat", *command, str(rb.path), "--json", "--state", str(state_dir),
               *archive_args]
        logs = state_dir / "web-runs"
        logs.mkdir(parents=True, exist_ok=True)
        prune_logs(logs, KEEP_LOGS - 1)
        log_path = logs / f"{rb.name}-{command[0]}-{time.time_ns()}.log"
        with log_path.open("wb") as out:
            child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        threading.Thread(target=child.wait, daemon=True).start()  # reaped when it ends
        return child, log_path

    def start_run(rb: Runbook, command: list[str]) -> str:
        """Start ``lifeboat COMMAND`` (``run``, ``failover --yes``) on ``rb`` and return its run's id
        once recorded."""
        state = api.open_state(settings.state_dir)
        try:
            before = state.latest_run(rb.name)
            if before is not None and not run_ended(before):
                raise HTTPException(409, f"runbook {rb.name!r} has a run going, {before.id}: see its page")
            # an open run (interrupted, or a failover that failed) is resumed by the child
            resumes = before is not None and before.phase != "done"
            child, log_path = spawn(rb, command)
            deadline = time.monotonic() + RUN_START_SECONDS
            while time.monotonic() < deadline:
                latest = state.latest_run(rb.name)
                if latest is not None and (before is None or latest.id != before.id):
                    return latest.id
                if resumes and latest is not None and before is not None and latest.resumes > before.resumes:
                    return latest.id
                if child.poll() is not None:
                    break
                time.sleep(0.2)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise HTTPException(500, f"lifeboat {command[0]} {rb.path.name} recorded no run: {tail}")
        finally:
            state.close()

    teardowns: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}  # run id -> the teardown child this pane started

    def start_teardown(rb: Runbook) -> str:
        """Start ``lifeboat teardown`` of ``rb``'s newest run in the background and return that
        run's id: its page shows the teardown's steps as they go."""
        state = api.open_state(settings.state_dir)
        try:
            latest = state.latest_run(rb.name)
            if latest is None:
                raise HTTPException(409, f"runbook {rb.name!r} has no runs in {state.dir}")
            if not run_ended(latest) or tearing_down(latest.id):
                raise HTTPException(409, f"runbook {rb.name!r} has a run or a teardown going, {latest.id}")
            teardowns[latest.id] = spawn(rb, ["teardown", "--yes"])
            return latest.id
        finally:
            state.close()

    def tearing_down(run_id: str) -> bool:
        found = teardowns.get(run_id)
        return found is not None and found[0].poll() is None

    def teardown_doc(run_id: str) -> dict[str, Any] | None:
        """The teardown this pane started for ``run_id``: running, done, or failed with the end of
        its output."""
        found = teardowns.get(run_id)
        if found is None:
            return None
        child, log_path = found
        code = child.poll()
        if code is None:
            return {"state": "running"}
        if code == 0:
            return {"state": "done"}
        try:
            tail = log_path.read_text(errors="replace")[-2000:]
        except OSError:
            tail = ""
        return {"state": "failed", "output": tail}

    # ------------------------------------------------------------------ API
    @app.get("/api/machines", tags=["api"])
    def api_machines(request: Request) -> list[dict[str, Any]]:
        """Every machine: its points, newest point and its time, RPO age against the objective, status."""
        api_guard(request)
        return machine_rows(catalog.summaries())

    @app.get("/api/dashboard", tags=["api"])
    def api_dashboard(request: Request) -> dict[str, Any]:
        """The dashboard: each machine's RPO row with ``protect``, ``verified`` (its last verified
        restore) and ``offsite`` (lag behind the replica), the archive's totals, the last run of
        each runbook."""
        api_guard(request)
        return dashboard_doc()

    @app.get("/api/serves", tags=["api"])
    def api_serves(request: Request) -> list[dict[str, Any]]:
        """The points this pane serves over NBD (started from a point's page): machine, point, URL."""
        api_guard(request)
        return [{"machine": x.machine, "point": x.point, "url": x.url, "started": x.started}
                for _, x in sorted(serves.current().items())]

    @app.get("/api/machines/{machine}/points", tags=["api"])
    def api_points(request: Request, machine: str) -> list[dict[str, Any]]:
        """The points of one machine, newest first."""
        api_guard(request)
        return [point_doc(p) for p in reversed(machine_points(machine))]

    @app.get("/api/archive", tags=["api"])
    def api_archive(request: Request) -> dict[str, Any]:
        """What the archive holds: machines, points, logical and stored bytes."""
        api_guard(request)
        return api.archive_totals(catalog.summaries())

    @app.get("/api/runs", tags=["api"])
    def api_runs(request: Request) -> list[dict[str, Any]]:
        """Every run, newest first, with per-machine RTO and its report formats."""
        api_guard(request)
        return [run_doc(r) for r in reversed(runs())]

    @app.get("/api/runbooks", tags=["api"])
    def api_runbooks(request: Request) -> list[dict[str, Any]]:
        """The runbooks of ``--runbooks DIR``: each one's problems or its plan."""
        api_guard(request)
        return [runbook_doc(p) for p in runbook_files(settings.runbooks)]

    @app.get("/api/runs/{run_id}", tags=["api"])
    def api_run(request: Request, run_id: str) -> dict[str, Any]:
        """One run with its steps and events (the run page's data)."""
        api_guard(request)
        return run_detail(run_id)

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
        role = auth.token_role(str(form.get("token", "")))
        if role is None:
            return page(request, "login.html", 401, next=target, error="That token is not valid.")
        response = RedirectResponse(target, status_code=303)
        auth.open_session(response, role)
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
        return page(request, "dashboard.html", objective=settings.rpo_objective, **dashboard_doc())

    @app.get("/fragments/machines", include_in_schema=False)
    def machines_fragment(request: Request) -> HTMLResponse:
        page_guard(request)
        return page(request, "_machines.html", **dashboard_doc())

    @app.get("/machines/{machine}", include_in_schema=False)
    def machine_page(request: Request, machine: str) -> HTMLResponse:
        page_guard(request)
        found = machine_points(machine)
        summary = summarize(machine, found)
        assert summary is not None  # machine_points has refused a machine without points
        state = machine_rows({machine: summary})[0]
        return page(request, "machine.html", machine=state, points=[point_doc(p) for p in reversed(found)],
                    total_stored=sum(p.bytes_stored for p in found), serving=serves.current())

    def point_info(machine: str, point: str) -> PointInfo:
        found = next((p for p in machine_points(machine) if p.point == point), None)
        if found is None:
            raise HTTPException(404, f"machine {machine!r} has no point {point!r}")
        return found

    def rehearsals_of(machine: str) -> dict[str, list[str]]:
        """The rehearsal runbooks (by file name) with the names of their machines that boot a
        point of archive machine ``machine``."""
        out: dict[str, list[str]] = {}
        for rb in valid_runbooks():
            names = [m.name for m in rb.machines if parse_selector(m.selector)[0] == machine]
            if rb.kind == "rehearsal" and names:
                out[rb.path.name] = names
        return out

    def point_view(request: Request, machine: str, point: str, status: int = 200,
                   problem: str | None = None) -> HTMLResponse:
        info = point_info(machine, point)
        return page(request, "point.html", status, point=point_doc(info), machine=machine,
                    formats=export_formats(), serving=serves.current().get(f"{machine}@{point}"),
                    rehearsals=rehearsals_of(machine), problem=problem)

    @app.get("/machines/{machine}/points/{point}", include_in_schema=False)
    def point_page(request: Request, machine: str, point: str) -> HTMLResponse:
        page_guard(request)
        return point_view(request, machine, point)

    @app.post("/machines/{machine}/points/{point}/export", include_in_schema=False)
    async def export_point(request: Request, machine: str, point: str) -> Response:
        form = await operator_form(request)
        fmt = form.get("format", "")
        if fmt not in export_formats():
            raise HTTPException(400, f"no export format {fmt!r} (known: {', '.join(export_formats())})")
        info = await run_in_threadpool(point_info, machine, point)
        try:
            return await run_in_threadpool(export_response, settings.archive, info, fmt, state_dir / "web-exports")
        except LifeboatError as e:
            return point_view(request, machine, point, 400, f"Not exported: {e}")

    @app.post("/machines/{machine}/points/{point}/serve", include_in_schema=False)
    async def serve_point(request: Request, machine: str, point: str) -> Response:
        await operator_form(request)
        info = await run_in_threadpool(point_info, machine, point)
        try:
            await run_in_threadpool(serves.start, info)
        except LifeboatError as e:
            return point_view(request, machine, point, 500, f"Not served: {e}")
        return RedirectResponse(f"/machines/{machine}/points/{point}", status_code=303)

    @app.post("/machines/{machine}/points/{point}/unserve", include_in_schema=False)
    async def unserve_point(request: Request, machine: str, point: str) -> Response:
        await operator_form(request)
        await run_in_threadpool(serves.stop, machine, point)
        return RedirectResponse(f"/machines/{machine}/points/{point}", status_code=303)

    @app.post("/machines/{machine}/points/{point}/rehearse", include_in_schema=False)
    async def rehearse_point(request: Request, machine: str, point: str) -> Response:
        form = await operator_form(request)
        await run_in_threadpool(point_info, machine, point)
        names = (await run_in_threadpool(rehearsals_of, machine)).get(form.get("runbook", ""))
        if not names:
            raise HTTPException(400, f"{form.get('runbook', '')!r} is not a rehearsal runbook of machine {machine!r}")
        rb = valid_runbook(form["runbook"])
        command = ["run"] + [arg for n in names for arg in ("--point", f"{n}={machine}@{point}")]
        run_id = await run_in_threadpool(start_run, rb, command)
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    def browse(info: PointInfo, device: str | None, path: str | None) -> dict[str, Any]:
        """A point's file systems and, given ``path``, that directory's entries (folders first):
        from the point's file index when it can answer (no appliance to boot), else from its disk."""
        if path is not None and not path.startswith("/"):
            raise UsageError(f"{path!r}: a path in a point starts with '/'")
        found = indexed.disk(settings.archive, info)
        entries = None if path is None or found is None else indexed.ls(settings.archive, info, path, device)
        if found is None or (path is not None and entries is None):
            with appliance.disk(info) as files:
                found = files.fs()
                entries = None if path is None else files.ls(path, device)
        readable = [f["device"] for f in session.readable(found["filesystems"])]
        if entries is not None:
            entries = sorted(entries, key=lambda e: (e["type"] != "d", e["name"]))
        return {"filesystems": found["filesystems"], "os": found["os"], "readable": readable, "entries": entries}

    @app.get("/api/machines/{machine}/points/{point}/files", tags=["api"])
    async def api_files(request: Request, machine: str, point: str, path: str | None = None,
                        fs: str | None = None) -> dict[str, Any]:
        """A point's file systems (``lifeboat files fs``) and, given ``path``, a directory of it
        (``lifeboat files ls``; within file system ``fs``, else as its operating system mounts them).
        The first request for a point boots the pane's appliance (20 s or more)."""
        api_guard(request)
        info = await run_in_threadpool(point_info, machine, point)
        try:
            return await run_in_threadpool(browse, info, fs or None, path)
        except LifeboatError as e:
            raise HTTPException(error_status(e), str(e)) from e

    @app.get("/api/machines/{machine}/files", tags=["api"])
    def api_find(request: Request, machine: str, pattern: str) -> dict[str, Any]:
        """The points of ``machine`` holding a path that matches ``pattern`` (``lifeboat files
        find``: the file index alone), and the points without an index."""
        api_guard(request)
        machine_points(machine)
        matches, unindexed = api.files_find(settings.archive, machine, pattern)
        return {"matches": [m.to_json() for m in matches], "unindexed": [p.point for p in unindexed]}

    @app.get("/machines/{machine}/points/{point}/files", include_in_schema=False)
    async def point_files(request: Request, machine: str, point: str, path: str | None = None,
                          fs: str = "") -> HTMLResponse:
        """The point's file browser: its file systems, then a directory; htmx asks for the listing
        alone when a folder is clicked."""
        page_guard(request)
        info = await run_in_threadpool(point_info, machine, point)
        view: dict[str, Any] = {"filesystems": [], "os": [], "readable": [], "entries": None}
        problem, status = None, 200
        try:
            view = await run_in_threadpool(browse, info, fs or None, path)
        except LifeboatError as e:
            problem, status = str(e), error_status(e)
        parts = [p for p in (path or "").split("/") if p]
        crumbs = [(name, "/" + "/".join(parts[:i + 1])) for i, name in enumerate(parts)]
        name = "_listing.html" if request.headers.get("HX-Request") and path is not None else "files.html"
        indexed = await run_in_threadpool(read_manifest, settings.archive, machine, point) is not None
        return page(request, name, status, point=point_doc(info), machine=machine, fs=fs, path=path,
                    crumbs=crumbs, problem=problem, indexed=indexed, **view)

    @app.post("/machines/{machine}/points/{point}/files/get", include_in_schema=False)
    async def download_file(request: Request, machine: str, point: str) -> Response:
        """One file of the point, downloaded (operator only, as an image download: a file's bytes
        are the data itself)."""
        form = await operator_form(request)
        info = await run_in_threadpool(point_info, machine, point)
        path, device = form.get("path", ""), form.get("fs") or None

        def copy_out() -> Response:
            with appliance.disk(info) as files:
                return file_download(files, path, device, state_dir / "web-exports")

        try:
            return await run_in_threadpool(copy_out)
        except LifeboatError as e:
            raise HTTPException(error_status(e), f"Not downloaded: {e}") from e

    @app.post("/machines/{machine}/points/{point}/files/index", include_in_schema=False)
    async def index_point(request: Request, machine: str, point: str) -> Response:
        """Record the point's file lists in the archive (``lifeboat files index MACHINE@POINT``) with
        the pane's appliance, so that finding a path searches this point too (operator only)."""
        await operator_form(request)
        info = await run_in_threadpool(point_info, machine, point)

        def index() -> None:
            with appliance.disk(info) as files:
                files.store_index(settings.archive, info)

        try:
            await run_in_threadpool(index)
        except LifeboatError as e:
            raise HTTPException(500, f"Not indexed: {e}") from e
        return RedirectResponse(f"/machines/{machine}/points/{point}/files", status_code=303)

    @app.get("/machines/{machine}/files", include_in_schema=False)
    def find_page(request: Request, machine: str, pattern: str = "") -> HTMLResponse:
        """Which points of ``machine`` hold a path (the file index)."""
        page_guard(request)
        machine_points(machine)
        matches: list[Match] = []
        unindexed: list[PointInfo] = []
        problem = None
        if pattern:
            try:
                matches, unindexed = api.files_find(settings.archive, machine, pattern)
            except LifeboatError as e:
                problem = str(e)
        return page(request, "find.html", 400 if problem else 200, machine=machine, pattern=pattern,
                    matches=matches, unindexed=unindexed, problem=problem)

    @app.get("/runs", include_in_schema=False)
    def runs_page(request: Request) -> HTMLResponse:
        page_guard(request)
        docs = [run_doc(r) for r in reversed(runs())]
        return page(request, "runs.html", runs=docs[:RUNS_SHOWN], total=len(docs),
                    rto_chart=charts.time_chart(charts.run_series(docs, "rto_seconds"), "RTO per machine over time"),
                    rpo_chart=charts.time_chart(charts.run_series(docs, "rpo_seconds"), "RPO per machine over time"))

    def runbooks_view(request: Request, status: int = 200, refused: tuple[str, str] | None = None) -> HTMLResponse:
        """The Runbooks page; ``refused`` is (file, why) when an action on that runbook was refused."""
        state = api.open_state(settings.state_dir)
        try:
            latest = {r.runbook: run_doc(r) for r in api.latest_runs(state)}
        finally:
            state.close()
        return page(request, "runbooks.html", status, folder=settings.runbooks, latest=latest, refused=refused,
                    runbooks=[runbook_doc(p) for p in runbook_files(settings.runbooks)])

    def valid_runbook(name: str) -> Runbook:
        try:
            return load(runbook_file(name))
        except LifeboatError as e:
            raise HTTPException(400, f"runbook {name} is not valid: {e}") from None

    @app.get("/runbooks", include_in_schema=False)
    def runbooks_page(request: Request) -> HTMLResponse:
        page_guard(request)
        return runbooks_view(request)

    @app.post("/runbooks/{name}/rehearse", include_in_schema=False)
    async def rehearse(request: Request, name: str) -> Response:
        await operator_form(request)
        rb = valid_runbook(name)
        if rb.kind != "rehearsal":
            raise HTTPException(400, f"runbook {name} is a {rb.kind}, not a rehearsal")
        run_id = await run_in_threadpool(start_run, rb, ["run"])
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    @app.post("/runbooks/{name}/failover", include_in_schema=False)
    async def failover(request: Request, name: str) -> Response:
        form = await operator_form(request)
        rb = valid_runbook(name)
        if rb.kind == "rehearsal":
            raise HTTPException(400, f"runbook {name} is a rehearsal: start it as one")
        if form.get("confirm", "").strip() != rb.name:
            return runbooks_view(request, 400, (name, f"Not started: type the runbook's name, {rb.name}, to confirm."))
        run_id = await run_in_threadpool(start_run, rb, ["failover", "--yes"])
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    @app.post("/runbooks/{name}/teardown", include_in_schema=False)
    async def teardown(request: Request, name: str) -> Response:
        form = await operator_form(request)
        rb = valid_runbook(name)
        if rb.kind != "rehearsal" and form.get("confirm", "").strip() != rb.name:
            return runbooks_view(request, 400, (name, f"Not torn down: its machines may be serving; type the "
                                                      f"runbook's name, {rb.name}, to confirm."))

        run_id = await run_in_threadpool(start_teardown, rb)
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    @app.get("/runs/{run_id}", include_in_schema=False)
    def run_page(request: Request, run_id: str) -> HTMLResponse:
        page_guard(request)
        return page(request, "run.html", run=run_detail(run_id))

    @app.get("/runs/{run_id}/events", include_in_schema=False)
    async def run_events(request: Request, run_id: str) -> StreamingResponse:
        page_guard(request)
        await run_in_threadpool(run_detail, run_id)  # 404 for a run that does not exist
        last = request.headers.get("last-event-id", "0")
        after = int(last) if last.isdigit() else 0
        return StreamingResponse(follow(request, run_id, after), media_type="text/event-stream")

    @app.get("/fragments/runs/{run_id}", include_in_schema=False)
    def run_fragment(request: Request, run_id: str) -> HTMLResponse:
        page_guard(request)
        return page(request, "_run.html", run=run_detail(run_id))

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
