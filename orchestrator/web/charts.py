"""Charts drawn on the server as inline SVG: no script, no library, nothing the page's CSP must
allow (SVG presentation attributes are not inline styles). ``time_chart`` draws one line per
series of (Unix time, value) points, with its axes, a legend and a tooltip (``<title>``) per point."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from markupsafe import Markup, escape

PALETTE = ("#1d4ed8", "#ea580c", "#059669", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#4b5563")
WIDTH, HEIGHT = 1100, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 40
Y_TICKS = 4
X_TICKS = 6
PAD = 12  # between the plot's edges and its first and last dots


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5 or 5 times a power of ten that is at least ``value``: an axis
    whose ticks read well."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value)


def axis(high: float) -> tuple[float, int, float, str]:
    """The y axis for values up to ``high`` seconds: its step and tick count in one unit (s, min
    or h, whichever reads best), that unit's seconds and its name."""
    unit, name = (1.0, "s") if high < 120 else (60.0, "min") if high < 7200 else (3600.0, "h")
    step = nice_ceiling(high / unit / Y_TICKS)
    return step, max(1, math.ceil(high / unit / step)), unit, name


def seconds_label(value: float) -> str:
    """An axis label for a duration: ``45 s``, ``12 min``, ``3.5 h``."""
    if value < 120:
        return f"{value:g} s"
    if value < 7200:
        return f"{value / 60:.3g} min"
    return f"{value / 3600:.3g} h"


def time_chart(series: dict[str, list[tuple[float, float]]], what: str) -> Markup:
    """An SVG line chart of ``series`` (label -> points, any order) with durations in seconds on
    the y axis; ``what`` names it for screen readers. Empty series draw a note instead."""
    points = [p for found in series.values() for p in found]
    if not points:
        return Markup('<p class="muted">No measurements yet.</p>')
    t0, t1 = min(t for t, _ in points), max(t for t, _ in points)
    span = (t1 - t0) or 1.0
    step, ticks, unit, unit_name = axis(max(v for _, v in points))
    top = step * ticks * unit
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:  # the dots keep clear of the plot's edges
        return LEFT + PAD + (t - t0) / span * (plot_w - 2 * PAD) if t1 > t0 else LEFT + plot_w / 2

    def y(v: float) -> float:
        return TOP + plot_h - v / top * plot_h

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(what)}" '
             f'xmlns="http://www.w3.org/2000/svg" font-size="12" font-family="system-ui, sans-serif">']
    for i in range(ticks + 1):
        v = step * i * unit
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e4e7ec"/>')
        parts.append(f'<text x="{LEFT - 8}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#667085">'
                     f'{step * i:g} {unit_name}</text>')
    if t1 == t0:
        times, fmt = [t0], "%Y-%m-%d %H:%M"
    else:
        times = [t0 + span * i / X_TICKS for i in range(X_TICKS + 1)]
        fmt = "%m-%d %H:%M" if span > 86400 else "%H:%M" if span > 3600 else "%H:%M:%S"
    for i, t in enumerate(times):
        label = datetime.fromtimestamp(t, UTC).strftime(fmt)
        anchor = "middle" if len(times) == 1 or 0 < i < len(times) - 1 else "start" if i == 0 else "end"
        at = x(t) - PAD if anchor == "start" else x(t) + PAD if anchor == "end" else x(t)
        parts.append(f'<text x="{at:.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="{anchor}" fill="#667085">'
                     f'{escape(label)}</text>')
    for n, (label, found) in enumerate(sorted(series.items())):
        colour = PALETTE[n % len(PALETTE)]
        ordered = sorted(found)
        if len(ordered) > 1:
            line = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in ordered)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for t, v in ordered:
            taken = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3.5" fill="{colour}">'
                         f'<title>{escape(label)}: {escape(seconds_label(round(v, 1)))} at {taken}</title></circle>')
    parts.append("</svg>")
    legend = "".join(f'<span class="key"><span class="swatch swatch-{n % len(PALETTE)}"></span>{escape(label)}</span>'
                     for n, label in enumerate(sorted(series)))
    return Markup(f'<figure class="chart">{"".join(parts)}<figcaption>{legend}</figcaption></figure>')


def run_series(runs: list[dict[str, Any]], field: str) -> dict[str, list[tuple[float, float]]]:
    """Per machine (``machine`` or ``machine (runbook)`` when several runbooks ran), the runs'
    ``field`` (``rto_seconds``, ``rpo_seconds``) by the time each run started."""
    several = len({r["runbook"] for r in runs}) > 1
    out: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        for m in r["machines"]:
            value = m.get(field)
            if value is None:
                continue
            label = f"{m['name']} ({r['runbook']})" if several else str(m["name"])
            out.setdefault(label, []).append((float(r["started"]), float(value)))
    return out
