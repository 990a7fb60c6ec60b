"""The server-drawn SVG charts (``orchestrator/web/charts.py``) and the run logs' pruning: valid
SVG, one line and one dot per measurement, labels escaped, readable axis ends."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from lifeboat.orchestrator.web.app import prune_logs
from lifeboat.orchestrator.web.charts import nice_ceiling, run_series, time_chart

SVG = "{http://www.w3.org/2000/svg}"


def test_a_chart_has_a_line_per_series_and_a_dot_per_point() -> None:
    runs = [
        {"runbook": "drill", "started": 1000.0, "machines": [{"name": "web01", "rto_seconds": 40.0},
                                                               {"name": "<db01>", "rto_seconds": 95.5}]},
        {"runbook": "drill", "started": 4600.0, "machines": [{"name": "web01", "rto_seconds": 35.0},
                                                               {"name": "<db01>", "rto_seconds": None}]},
    ]
    series = run_series(runs, "rto_seconds")
    assert series == {"web01": [(1000.0, 40.0), (4600.0, 35.0)], "<db01>": [(1000.0, 95.5)]}
    html = str(time_chart(series, "RTO"))
    assert "<db01>" not in html and "&lt;db01&gt;" in html
    svg = ET.fromstring(html).find(f"{SVG}svg")
    assert svg is not None and svg.get("aria-label") == "RTO"
    assert len(svg.findall(f"{SVG}polyline")) == 1  # db01 has a single point: a dot, no line
    assert len(svg.findall(f"{SVG}circle")) == 3
    labels = [t.text for t in svg.findall(f"{SVG}text")]
    assert labels[0] == "0 s" and labels[4] == "100 s"  # the y axis ends at a round value above the highest
    assert "01:16:40" in labels  # 4600 s after the epoch: the x axis's right end, within one day


def test_two_runbooks_name_their_machines_and_no_data_says_so() -> None:
    runs = [{"runbook": a, "started": 5.0, "machines": [{"name": "web01", "rpo_seconds": 3.0}]} for a in ("a", "b")]
    assert sorted(run_series(runs, "rpo_seconds")) == ["web01 (a)", "web01 (b)"]
    assert "No measurements yet" in time_chart({}, "RPO")


def test_nice_ceiling() -> None:
    assert [nice_ceiling(v) for v in (0, 0.7, 1, 3, 95.5, 240, 7000)] == [1, 1, 1, 5, 100, 250, 10000]


def test_old_run_logs_are_pruned(tmp_path: Path) -> None:
    for i in range(7):
        log = tmp_path / f"r-{i}.log"
        log.write_text(str(i))
        os.utime(log, ns=(i * 10**9, i * 10**9))
    (tmp_path / "keep.txt").write_text("not a log")
    prune_logs(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "r-4.log", "r-5.log", "r-6.log"]
