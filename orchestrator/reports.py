"""Run reports: JSON (the whole record), JUnit XML (for CI dashboards), a self-contained HTML page
with a timeline, and an optional webhook notification.

Measures, per machine:
- RTO: from the start of the command that began the run to the moment the last health check
  passed ("command to healthy"). A resumed run keeps its first start, so time lost to a crash of
  the orchestrator counts, as it would in a real recovery.
- RPO: the age of the point used, at the start of the run (run start minus the point's time).
"""

from __future__ import annotations

import html
import json
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lifeboat.orchestrator.runbook import Runbook, parse_duration
from lifeboat.orchestrator.state import Run, Step
from lifeboat.orchestrator.steps import machine_status

# How reports note what they did (the webhook's answer): note(message, level)
Note = Callable[[str, str], None]

STATUS_COLOURS = {"done": "#2e7d32", "failed": "#c62828", "running": "#f9a825", "skipped": "#9e9e9e"}


def iso(t: float | None) -> str | None:
    """A Unix time as ISO-8601 UTC."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds") if t else None


def steps_by_machine(steps: list[Step]) -> dict[str, dict[str, Step]]:
    """A run's step records by machine, then by step name."""
    out: dict[str, dict[str, Step]] = {}
    for st in steps:
        out.setdefault(st.machine, {})[st.step] = st
    return out


def build_report(
    rb: Runbook, run: Run, steps: list[Step], events: list[dict[str, Any]], archive: str
) -> dict[str, Any]:
    """The report document of a run of ``rb``, from its records (steps, events)."""
    by_machine = steps_by_machine(steps)
    machines = []
    for m in rb.machines:
        mine = by_machine.get(m.name, {})
        status = machine_status(mine, rb.move_to_local)
        resolve = mine.get("resolve")
        point = resolve.result if resolve and resolve.result else {}
        health = mine.get("health")
        hres = (health.result or {}) if health else {}
        healthy_at = hres.get("healthy_at") if health and health.status == "done" else None
        rto = round(healthy_at - run.started, 3) if healthy_at else None
        rpo = None
        if point.get("time"):
            rpo = round(run.started - datetime.fromisoformat(point["time"]).timestamp(), 3)
        errors = [f"{name}: {s.error}" for name, s in mine.items() if s.error]
        machines.append(
            {
                "name": m.name,
                "status": status,
                "point": point.get("point"),
                "point_machine": point.get("machine"),  # the archive's name of the machine
                "point_time": point.get("time"),
                "rto_seconds": rto,
                "rpo_seconds": rpo,
                "rto_objective_seconds": m.rto_objective,
                "rto_met": (rto is not None and rto <= m.rto_objective) if m.rto_objective is not None else None,
                "driver": m.driver,
                "source": m.source_kind,
                "depends_on": m.depends_on,
                "health": hres.get("checks", []),
                "console_tail": hres.get("console_tail", []),
                "steps": [
                    {
                        "step": name,
                        "status": s.status,
                        "started": iso(s.started),
                        "finished": iso(s.finished),
                        "start": s.started,
                        "end": s.finished,
                        "attempts": s.attempts,
                        "error": s.error,
                    }
                    for name, s in sorted(mine.items(), key=lambda kv: kv[1].started or 0)
                ],
                "error": errors[0] if errors else None,
            }
        )
    return {
        "runbook": rb.name,
        "path": str(rb.path),
        "kind": rb.kind,
        "run_id": run.id,
        "status": run.status,
        "phase": run.phase,
        "started": iso(run.started),
        "finished": iso(run.finished),
        "started_unix": run.started,
        "finished_unix": run.finished,
        "resumes": run.resumes,
        "archive": archive,
        "network": rb.network_mode,
        "teardown": rb.teardown,
        "host": socket.gethostname(),
        "machines": machines,
        "events": [
            {**e, "time": iso(e["time"]), "unix": e["time"]} for e in events if e["level"] != "debug"
        ],
    }


def report_dir(rb: Runbook, state_dir: Path) -> Path:
    """Where the report files of ``rb``'s runs go."""
    return rb.report_dir or state_dir / "reports" / rb.name


def write_reports(rb: Runbook, report: dict[str, Any], state_dir: Path, note: Note) -> dict[str, str]:
    """Write the formats the runbook asks for; send the webhook; return {format: path}."""
    out = report_dir(rb, state_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{report['runbook']}-{report['run_id']}"
    files: dict[str, str] = {}
    if "json" in rb.formats:
        files["json"] = str(stem.with_suffix(".json"))
    if "junit" in rb.formats:
        files["junit"] = str(stem.with_suffix(".xml"))
    if "html" in rb.formats:
        files["html"] = str(stem.with_suffix(".html"))
    report = {**report, "files": files}
    for fmt, path in files.items():
        text = {
            "json": lambda: json.dumps(report, indent=2) + "\n",
            "junit": lambda: junit_xml(report),
            "html": lambda: html_report(report),
        }[fmt]()
        tmp = Path(path + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    if rb.webhook:
        notify(rb.webhook, report, note)
    return files


def junit_xml(report: dict[str, Any]) -> str:
    """JUnit XML: per machine a "recovered" case, one per health check, and the RTO objective."""
    import xml.etree.ElementTree as ET  # here: lifeboat --help loads this module

    suites = ET.Element("testsuites", name="lifeboat")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"lifeboat.{report['runbook']}",
        timestamp=report["started"] or "",
        hostname=report["host"],
    )
    props = ET.SubElement(suite, "properties")
    for k in ("run_id", "kind", "status", "archive", "network", "resumes"):
        ET.SubElement(props, "property", name=k, value=str(report[k]))
    tests = failures = skipped = 0
    for m in report["machines"]:
        cls = f"lifeboat.{report['runbook']}.{m['name']}"
        case = ET.SubElement(suite, "testcase", classname=cls, name="recovered", time=f"{m['rto_seconds'] or 0:.3f}")
        tests += 1
        if m["status"] != "succeeded":
            failures += 1
            f = ET.SubElement(
                case, "failure", message=f"{m['name']} {m['status']}: {m['error'] or ''}".strip(), type=m["status"]
            )
            f.text = "\n".join(f"{s['step']}: {s['status']} {s['error'] or ''}" for s in m["steps"])
        out = ET.SubElement(case, "system-out")
        out.text = (
            f"point {m['point']} ({m['point_time']}); RTO {m['rto_seconds']} s; RPO {m['rpo_seconds']} s\n"
            + "\n".join(m["console_tail"])
        )
        for c in m["health"]:
            tests += 1
            hc = ET.SubElement(
                suite, "testcase", classname=cls, name=f"health: {c['name']}", time=f"{c['seconds']:.3f}"
            )
            if not c["ok"]:
                failures += 1
                ET.SubElement(hc, "failure", message=c["detail"], type="health")
        if m["rto_objective_seconds"] is not None:
            tests += 1
            rc = ET.SubElement(
                suite,
                "testcase",
                classname=cls,
                name=f"RTO objective {m['rto_objective_seconds']:.0f} s",
                time=f"{m['rto_seconds'] or 0:.3f}",
            )
            if m["rto_met"] is False or m["rto_seconds"] is None:
                if m["rto_seconds"] is None:
                    skipped += 1
                    ET.SubElement(rc, "skipped", message="not recovered, no RTO measured")
                else:
                    failures += 1
                    ET.SubElement(
                        rc,
                        "failure",
                        type="rto",
                        message=f"RTO {m['rto_seconds']:.1f} s exceeds the objective "
                        f"{m['rto_objective_seconds']:.0f} s",
                    )
    total = (report["finished_unix"] or report["started_unix"]) - report["started_unix"]
    for el in (suites, suite):
        el.set("tests", str(tests))
        el.set("failures", str(failures))
        el.set("errors", "0")
        el.set("time", f"{total:.3f}")
    suite.set("skipped", str(skipped))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _timeline_svg(report: dict[str, Any]) -> str:
    t0 = report["started_unix"]
    ends = [s["end"] or s["start"] for m in report["machines"] for s in m["steps"] if s["start"]]
    t1 = max(ends + [report["finished_unix"] or t0, t0 + 1])
    span = t1 - t0
    label_w, width, row_h = 150, 900, 34
    height = 30 + row_h * len(report["machines"]) + 20
    x = lambda t: label_w + (t - t0) / span * (width - label_w - 10)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="timeline">'
    ]
    for i in range(6):
        t = t0 + span * i / 5
        parts.append(
            f'<line x1="{x(t):.1f}" y1="20" x2="{x(t):.1f}" y2="{height - 15}" stroke="#ddd"/>'
            f'<text x="{x(t):.1f}" y="14" font-size="11" text-anchor="middle">{t - t0:.0f} s</text>'
        )
    for row, m in enumerate(report["machines"]):
        y = 26 + row * row_h
        parts.append(f'<text x="4" y="{y + 17}" font-size="13">{html.escape(m["name"])}</text>')
        for s in m["steps"]:
            if not s["start"]:
                continue
            a, b = x(s["start"]), x(s["end"] or t1)
            colour = STATUS_COLOURS.get(s["status"], "#607d8b")
            title = html.escape(f"{s['step']}: {s['status']} ({(s['end'] or t1) - s['start']:.1f} s)")
            parts.append(
                f'<rect x="{a:.1f}" y="{y}" width="{max(b - a, 2):.1f}" height="24" fill="{colour}" '
                f'stroke="#fff" opacity="0.85"><title>{title}</title></rect>'
            )
            if b - a > 48:
                parts.append(
                    f'<text x="{a + 3:.1f}" y="{y + 16}" font-size="10" fill="#fff">{html.escape(s["step"])}</text>'
                )
        if m["rto_seconds"] is not None:
            hx = x(t0 + m["rto_seconds"])
            parts.append(
                f'<line x1="{hx:.1f}" y1="{y - 2}" x2="{hx:.1f}" y2="{y + 26}" stroke="#000" '
                f'stroke-width="2"><title>healthy at {m["rto_seconds"]:.1f} s</title></line>'
            )
    parts.append("</svg>")
    return "".join(parts)


def html_report(report: dict[str, Any]) -> str:
    """A self-contained HTML page: summary, timeline, health checks, console tails, events."""
    e = html.escape
    ok = report["status"] == "succeeded"
    rows = []
    for m in report["machines"]:
        rto = f"{m['rto_seconds']:.1f} s" if m["rto_seconds"] is not None else "—"
        rpo = f"{m['rpo_seconds']:.0f} s" if m["rpo_seconds"] is not None else "—"
        obj = (
            f"{m['rto_objective_seconds']:.0f} s ({'met' if m['rto_met'] else 'missed'})"
            if m["rto_objective_seconds"] is not None
            else "—"
        )
        rows.append(
            f"<tr class='{e(m['status'])}'><td>{e(m['name'])}</td><td>{e(m['status'])}</td>"
            f"<td><code>{e(str(m['point']))}</code><br><small>{e(str(m['point_time']))}</small></td>"
            f"<td>{rto}</td><td>{rpo}</td><td>{obj}</td><td>{e(m['error'] or '')}</td></tr>"
        )
    details = []
    for m in report["machines"]:
        checks = (
            "".join(
                f"<li class='{'ok' if c['ok'] else 'bad'}'>{e(c['name'])} ({e(c['kind'])}): "
                f"{'passed' if c['ok'] else 'FAILED'} in {c['seconds']:.1f} s — {e(c['detail'])}</li>"
                for c in m["health"]
            )
            or "<li>no health checks ran</li>"
        )
        console = e("\n".join(m["console_tail"])) or "(no console captured)"
        details.append(
            f"<section><h3>{e(m['name'])}</h3><ul>{checks}</ul>"
            f"<details><summary>console (last lines)</summary><pre>{console}</pre></details></section>"
        )
    events = "".join(
        f"<tr class='{e(ev['level'])}'><td>{e(ev['time'] or '')}</td><td>{e(ev['machine'])}</td>"
        f"<td>{e(ev['message'])}</td></tr>"
        for ev in report["events"]
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>lifeboat {e(report["kind"])} {e(report["runbook"])}: {e(report["status"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
h1 .status {{ padding: 0.1em 0.5em; border-radius: 4px; color: #fff; background: {"#2e7d32" if ok else "#c62828"}; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
tr.failed td, tr.blocked td, tr.error td {{ background: #fdecea; }}
tr.succeeded td {{ background: #edf7ed; }}
tr.warning td {{ background: #fff8e1; }}
li.bad {{ color: #c62828; }} li.ok {{ color: #2e7d32; }}
pre {{ background: #111; color: #ddd; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>{e(report["runbook"])} <span class="status">{e(report["status"])}</span></h1>
<p>{e(report["kind"])} run <code>{e(report["run_id"])}</code> on {e(report["host"])},
started {e(report["started"] or "")}, finished {e(report["finished"] or "not yet")};
resumed {report["resumes"]} time(s). Archive <code>{e(report["archive"])}</code>,
network {e(report["network"])}, teardown {e(report["teardown"])}.</p>
<h2>Machines</h2>
<table><tr><th>machine</th><th>status</th><th>point</th><th>RTO</th><th>RPO</th><th>RTO objective</th>
<th>error</th></tr>
{"".join(rows)}</table>
<p><small>RTO: command start to healthy. RPO: age of the point used when the run started.</small></p>
<h2>Timeline</h2>
{_timeline_svg(report)}
<p><small>Bars are steps (green done, red failed, yellow running); the black line marks "healthy".</small></p>
<h2>Health checks</h2>
{"".join(details)}
<h2>Events</h2>
<table><tr><th>time</th><th>machine</th><th>event</th></tr>{events}</table>
</body></html>
"""


def notify(hook: dict[str, Any], report: dict[str, Any], note: Note) -> None:
    """POST a summary to the runbook's webhook, if its ``on`` condition holds; never fails the run."""
    import urllib.error  # here: lifeboat --help loads this module
    import urllib.request

    when = hook.get("when", "always")
    ok = report["status"] == "succeeded"
    if (when == "failure" and ok) or (when == "success" and not ok):
        return
    body = {
        "runbook": report["runbook"],
        "run_id": report["run_id"],
        "kind": report["kind"],
        "status": report["status"],
        "started": report["started"],
        "finished": report["finished"],
        "host": report["host"],
        "machines": [
            {k: m[k] for k in ("name", "status", "point", "rto_seconds", "rpo_seconds", "rto_met", "error")}
            for m in report["machines"]
        ],
        "files": report.get("files", {}),
    }
    req = urllib.request.Request(
        hook["url"],
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "lifeboat", **hook.get("headers", {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=parse_duration(hook.get("timeout", 10))) as resp:
            note(f"webhook {hook['url']}: HTTP {resp.status}", "info")
    except (urllib.error.URLError, OSError) as err:
        note(f"webhook {hook['url']} failed: {err}", "warning")
