"""``lifeboat web``'s dashboard and ``GET /api/machines`` on a catalog of 1,000 machines and
100,000 points, with the catalog cache (``archive/catalog.py``) and without it (every manifest
header read per request, as before the cache), in one run; the ratio is printed.

The catalog is synthetic and cached under ``$LIFEBOAT_BENCH_DIR/web-catalog-V`` (built once, in
about a minute): an archive made by ``lifeboat archive init`` whose ``points/`` holds, per machine,
100 valid manifests (``encode_point``) of 1 GiB all-zero disks taken an hour apart, with
plausible ``bytes_new``/``bytes_stored`` figures in their headers. They are written as plain
files, not through ``Backend.put`` (which fsyncs each one), so that the build stays short; the
pane reads them exactly as it reads a real archive's. The pane runs in this process (the FastAPI
app under ``fastapi.testclient``), so the figures are the server's own time, not a network's. The
peer is the same app whose catalog trusts no stamp: every request reads every manifest header.

    .venv/bin/python bench/web_bench.py [--machines 1000] [--points 100] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Hashable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient  # noqa: E402

from lifeboat.archive import Archive, PointInfo  # noqa: E402
from lifeboat.archive.catalog import Catalog  # noqa: E402
from lifeboat.archive.formats import FORMAT_VERSION, ZERO_ID, ChunkTable, encode_point  # noqa: E402
from lifeboat.orchestrator.web import app as web_app  # noqa: E402

BENCH_DIR = Path(os.environ.get("LIFEBOAT_BENCH_DIR", "/var/tmp/lifeboat-bench"))
CATALOG_VERSION = 1  # bump when the recipe changes
CHUNK = 16 * 1024 * 1024
SIZE = 1024**3
TOKEN = "bench-token"


def build(machines: int, points: int) -> Path:
    """The synthetic archive (cached): ``machines`` machines with ``points`` points each."""
    root = BENCH_DIR / f"web-catalog-{CATALOG_VERSION}-{machines}x{points}"
    done = root / "built"
    if done.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + ".tmp"))
    Archive.init(str(work), chunk_size=CHUNK)
    rng = random.Random(17)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=points)
    table = ChunkTable([ZERO_ID] * (SIZE // CHUNK))
    for m in range(machines):
        name = f"vm{m:04d}"
        folder = work / "points" / name
        folder.mkdir(parents=True)
        parent = None
        for i in range(points):
            point = f"{m:04x}{i:08x}"
            new = SIZE if parent is None else rng.randrange(1, 64) * 1024 * 1024
            info = PointInfo(name, point, (start + timedelta(hours=i)).isoformat(), parent, SIZE, CHUNK, new,
                             new, new // 3, "bench")
            (folder / point).write_bytes(encode_point(info.to_json() | {"format": FORMAT_VERSION}, table))
            parent = point
    (work / "built").write_text("")
    work.rename(root)
    return root


class Uncached(Catalog):
    """The peer: a catalog whose stamps never match, so each request reads every manifest."""

    def stamps(self) -> dict[str, Hashable]:
        return {m: object() for m in super().stamps()}


def timed(client: TestClient, path: str, runs: int) -> tuple[float, int]:
    """The median wall seconds of ``runs`` GETs of ``path`` (after one that warms up), and its size."""
    size = len(client.get(path).content)
    took = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = client.get(path)
        took.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text[:300]
    return statistics.median(took), size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=1000)
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    root = build(args.machines, args.points)
    print(f"catalog: {args.machines} machines x {args.points} points at {root} ({time.perf_counter() - t0:.1f} s)")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    results: dict[bool, dict[str, Any]] = {}
    for cached in (True, False):
        with tempfile.TemporaryDirectory() as state:
            settings = web_app.Settings(Archive.open(str(root)), Path(state), 86400.0, TOKEN, False)
            web_app.Catalog = Catalog if cached else Uncached  # type: ignore[misc]
            client = TestClient(web_app.create_app(settings), headers=headers)
            login = client.get("/login")
            csrf = login.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            assert client.post("/login", data={"token": TOKEN, "csrf": csrf, "next": "/"},
                               follow_redirects=False).status_code == 303
            t1 = time.perf_counter()
            first = client.get("/api/machines")
            cold = time.perf_counter() - t1
            assert len(first.json()) == args.machines
            results[cached] = {"cold": cold, "api": timed(client, "/api/machines", args.runs),
                               "page": timed(client, "/", args.runs)}
    c, u = results[True], results[False]
    print(f"{'request':<22}{'cached s':>10}{'uncached s':>12}{'ratio':>8}{'bytes':>10}")
    for what, key in (("GET /api/machines", "api"), ("GET / (dashboard)", "page")):
        print(f"{what:<22}{c[key][0]:>10.3f}{u[key][0]:>12.3f}{u[key][0] / c[key][0]:>7.1f}x{c[key][1]:>10}")
    print(f"first request (fills the cache): {c['cold']:.3f} s; without the cache: {u['cold']:.3f} s")


if __name__ == "__main__":
    main()
