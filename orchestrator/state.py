"""The engine's persisted state: runs, steps, created resources, events and the scheduler's memo.

``StateStore`` is the interface the engine, reports, the scheduler and the facade use;
``SqliteState`` (SQLite in WAL mode) is today's implementation (a PostgreSQL one can follow: no
caller sees SQL).

Where: ``--state DIR``, else ``$LIFEBOAT_STATE_DIR``, else ``$XDG_STATE_HOME/lifeboat`` (by
default ``~/.local/state/lifeboat``): ``state.db`` plus ``runs/RUN-ID/`` (machines' work files)
and ``reports/`` (unless the runbook names a report folder). Not inside the archive: the archive's
layout belongs to ``archive/FORMAT.md`` and may be an object store.

Every write is its own transaction (``synchronous=FULL``), so after ``kill -9`` the database says
exactly which steps finished and which resources exist. Resources are written *before* they are
created (``targets/base.py``), so nothing a run made is ever unknown to it.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lifeboat.targets.base import Resource

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    runbook TEXT NOT NULL,           -- the runbook's name
    path TEXT NOT NULL,
    digest TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,            -- running | succeeded | failed | interrupted | abandoned
    phase TEXT NOT NULL,             -- recover | teardown | done
    started REAL NOT NULL,
    finished REAL,
    resumes INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    report TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_runbook ON runs (runbook, started);
CREATE INDEX IF NOT EXISTS runs_by_kind ON runs (kind, started);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL,
    machine TEXT NOT NULL,           -- '' for run-level steps
    step TEXT NOT NULL,
    status TEXT NOT NULL,            -- running | done | failed | skipped
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    PRIMARY KEY (run_id, machine, step)
);
CREATE TABLE IF NOT EXISTS resources (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    machine TEXT NOT NULL,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    ident TEXT NOT NULL,
    data TEXT NOT NULL,
    created REAL NOT NULL,
    destroyed REAL,
    UNIQUE (run_id, machine, owner, kind, ident)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    time REAL NOT NULL,
    machine TEXT NOT NULL,
    step TEXT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (
    path TEXT PRIMARY KEY,
    runbook TEXT NOT NULL,
    last_fire REAL NOT NULL,
    last_run TEXT
);
"""

# the machines of each rehearsal's report (by the archive machine it booted), then per machine the
# newest run where it succeeded and the newest at all (SQLite returns the row of max(started))
VERIFYING_RUNS = """
WITH booted AS (
    SELECT r.rowid AS rid, r.started AS started, json_extract(m.value, '$.status') AS status,
           coalesce(json_extract(m.value, '$.point_machine'), json_extract(m.value, '$.name')) AS machine
    FROM runs r, json_each(r.report, '$.machines') m
    WHERE r.kind = 'rehearsal' AND r.report IS NOT NULL
), chosen AS (
    SELECT rid, max(started) FROM booted WHERE status = 'succeeded' GROUP BY machine
    UNION SELECT rid, max(started) FROM booted GROUP BY machine
)
SELECT * FROM runs WHERE rowid IN (SELECT rid FROM chosen) ORDER BY started, rowid
"""


def default_state_dir() -> Path:
    """``$LIFEBOAT_STATE_DIR``, else ``$XDG_STATE_HOME/lifeboat``, else ``~/.local/state/lifeboat``."""
    env = os.environ.get("LIFEBOAT_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "lifeboat"


@dataclass
class Run:
    """A row of ``runs``."""

    id: str
    runbook: str
    path: str
    digest: str
    kind: str
    status: str
    phase: str
    started: float
    finished: float | None
    resumes: int
    pid: int | None
    report: dict[str, Any] | None


@dataclass
class Step:
    """A row of ``steps``."""

    machine: str
    step: str
    status: str
    started: float | None
    finished: float | None
    attempts: int
    result: dict[str, Any] | None
    error: str | None


class StateStore(Protocol):
    """The operations on persisted state; ``dir`` is the local folder for work files, locks and
    reports (a database elsewhere still needs one)."""

    dir: Path

    def close(self) -> None:
        """Release the store."""

    def new_run(self, runbook: str, path: str, digest: str, kind: str) -> Run:
        """Start a run record (status running, phase recover)."""

    def run(self, run_id: str) -> Run | None:
        """A run by id."""

    def latest_run(self, runbook: str) -> Run | None:
        """The newest run of a runbook (by name)."""

    def runs(self, runbook: str | None = None) -> list[Run]:
        """All runs (of one runbook), oldest first."""

    def newest_runs(self) -> list[Run]:
        """The newest run of each runbook, by runbook name."""

    def verifying_runs(self) -> list[Run]:
        """Per archive machine, its newest succeeded rehearsal and its newest rehearsal, oldest first."""

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set fields of a run (status, phase, finished, resumes, pid, report)."""

    def step(self, run_id: str, machine: str, step: str) -> Step | None:
        """One step's record."""

    def steps(self, run_id: str) -> list[Step]:
        """Every step of a run, in the order they started."""

    def start_step(self, run_id: str, machine: str, step: str) -> None:
        """Mark a step running (again: attempts counts)."""

    def finish_step(
        self,
        run_id: str,
        machine: str,
        step: str,
        status: str,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """Mark a step done, failed or skipped (a result already stored stays if none is given)."""

    def record_resource(
        self, run_id: str, machine: str, owner: str, kind: str, ident: str, data: dict[str, Any]
    ) -> Resource:
        """Insert (or merge data into) a live resource."""

    def update_resource(self, resource: Resource, data: dict[str, Any]) -> None:
        """Merge data into a resource's record."""

    def forget_resource(self, resource: Resource) -> None:
        """Mark a resource destroyed."""

    def resources(
        self, run_id: str, machine: str | None = None, owner: str | None = None, live: bool = True
    ) -> list[Resource]:
        """Resources of a run (one machine, one owner), oldest first."""

    def machines_with_resources(self, run_id: str) -> set[str]:
        """The machines of a run that still have live resources."""

    def event(self, run_id: str, message: str, machine: str = "", step: str = "", level: str = "info") -> float:
        """Log an event; returns its time."""

    def events(self, run_id: str) -> list[dict[str, Any]]:
        """A run's events (time, machine, step, level, message), oldest first."""

    def events_after(self, run_id: str, after: int) -> list[dict[str, Any]]:
        """A run's events whose ``id`` (increasing) is above ``after``, with that id, oldest first:
        what a follower has not seen yet."""

    def last_fire(self, path: str) -> float | None:
        """When the scheduler last started a scheduled run of this runbook file."""

    def set_last_fire(self, path: str, runbook: str, fire: float, run: str | None = None) -> None:
        """Record a scheduled start (or the first sighting of a schedule)."""


class SqliteState:
    """The state database of one state directory (``StateStore`` in SQLite), shared by the threads
    of one engine."""

    def __init__(self, state_dir: Path | str | None = None) -> None:
        self.dir = (Path(state_dir) if state_dir else default_state_dir()).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "state.db"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction (serialised across this engine's threads)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args))

    # -- runs -------------------------------------------------------------------------------
    def new_run(self, runbook: str, path: str, digest: str, kind: str) -> Run:
        """Start a run record."""
        run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        with self._tx() as c:
            c.execute(
                "INSERT INTO runs (id, runbook, path, digest, kind, status, phase, started, pid) "
                "VALUES (?, ?, ?, ?, ?, 'running', 'recover', ?, ?)",
                (run_id, runbook, path, digest, kind, time.time(), os.getpid()),
            )
        run = self.run(run_id)
        assert run is not None
        return run

    def run(self, run_id: str) -> Run | None:
        """A run by id."""
        rows = self._q("SELECT * FROM runs WHERE id = ?", (run_id,))
        return _run(rows[0]) if rows else None

    def latest_run(self, runbook: str) -> Run | None:
        """The newest run of a runbook (by name)."""
        rows = self._q("SELECT * FROM runs WHERE runbook = ? ORDER BY started DESC, rowid DESC LIMIT 1", (runbook,))
        return _run(rows[0]) if rows else None

    def runs(self, runbook: str | None = None) -> list[Run]:
        """All runs (of one runbook), oldest first."""
        if runbook:
            rows = self._q("SELECT * FROM runs WHERE runbook = ? ORDER BY started, rowid", (runbook,))
        else:
            rows = self._q("SELECT * FROM runs ORDER BY started, rowid")
        return [_run(r) for r in rows]

    def newest_runs(self) -> list[Run]:
        """The newest run of each runbook, by runbook name (one row per runbook, not every run)."""
        rows = self._q("SELECT * FROM runs r WHERE rowid = (SELECT rowid FROM runs WHERE runbook = r.runbook "
                       "ORDER BY started DESC, rowid DESC LIMIT 1) ORDER BY runbook")
        return [_run(r) for r in rows]

    def verifying_runs(self) -> list[Run]:
        """Per archive machine, the newest rehearsal in which it succeeded and the newest that booted
        it at all (oldest first): what "last verified" needs, found in SQLite, not by reading every
        run."""
        rows = self._q(VERIFYING_RUNS)
        return [_run(r) for r in rows]

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set columns of a run (``report`` is stored as JSON)."""
        if "report" in fields:
            fields["report"] = json.dumps(fields["report"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as c:
            c.execute(f"UPDATE runs SET {cols} WHERE id = ?", (*fields.values(), run_id))

    # -- steps ------------------------------------------------------------------------------
    def step(self, run_id: str, machine: str, step: str) -> Step | None:
        """One step's record."""
        rows = self._q("SELECT * FROM steps WHERE run_id = ? AND machine = ? AND step = ?", (run_id, machine, step))
        return _step(rows[0]) if rows else None

    def steps(self, run_id: str) -> list[Step]:
        """Every step of a run, in the order they started."""
        rows = self._q("SELECT * FROM steps WHERE run_id = ? ORDER BY started, rowid", (run_id,))
        return [_step(r) for r in rows]

    def start_step(self, run_id: str, machine: str, step: str) -> None:
        """Mark a step running (again, after a crash: attempts counts)."""
        now = time.time()
        with self._tx() as c:
            c.execute(
                "INSERT INTO steps (run_id, machine, step, status, started, attempts) "
                "VALUES (?, ?, ?, 'running', ?, 1) "
                "ON CONFLICT (run_id, machine, step) DO UPDATE SET status = 'running', attempts = attempts + 1, "
                "error = NULL, finished = NULL, started = COALESCE(started, excluded.started)",
                (run_id, machine, step, now),
            )

    def finish_step(
        self,
        run_id: str,
        machine: str,
        step: str,
        status: str,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """Mark a step done, failed or skipped."""
        now = time.time()
        with self._tx() as c:
            c.execute(
                "INSERT INTO steps (run_id, machine, step, status, started, finished, result, error) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, machine, step) DO UPDATE SET "
                "status = excluded.status, finished = excluded.finished, result = COALESCE(excluded.result, result), "
                "error = excluded.error",
                (run_id, machine, step, status, now, now, json.dumps(result) if result is not None else None, error),
            )

    # -- resources --------------------------------------------------------------------------
    def record_resource(
        self, run_id: str, machine: str, owner: str, kind: str, ident: str, data: dict[str, Any]
    ) -> Resource:
        """Insert (or merge data into) a live resource."""
        with self._tx() as c:
            row = c.execute(
                "SELECT id, data FROM resources "
                "WHERE run_id = ? AND machine = ? AND owner = ? AND kind = ? AND ident = ?",
                (run_id, machine, owner, kind, ident),
            ).fetchone()
            if row:
                merged = {**json.loads(row["data"]), **data}
                c.execute(
                    "UPDATE resources SET data = ?, destroyed = NULL WHERE id = ?", (json.dumps(merged), row["id"])
                )
                return Resource(kind, ident, merged, owner, row["id"])
            cur = c.execute(
                "INSERT INTO resources (run_id, machine, owner, kind, ident, data, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, machine, owner, kind, ident, json.dumps(data), time.time()),
            )
            return Resource(kind, ident, dict(data), owner, cur.lastrowid)

    def update_resource(self, resource: Resource, data: dict[str, Any]) -> None:
        """Merge data into a resource's record."""
        resource.data.update(data)
        with self._tx() as c:
            c.execute("UPDATE resources SET data = ? WHERE id = ?", (json.dumps(resource.data), resource.id))

    def forget_resource(self, resource: Resource) -> None:
        """Mark a resource destroyed."""
        with self._tx() as c:
            c.execute("UPDATE resources SET destroyed = ? WHERE id = ?", (time.time(), resource.id))

    def resources(
        self, run_id: str, machine: str | None = None, owner: str | None = None, live: bool = True
    ) -> list[Resource]:
        """Resources of a run (one machine, one owner), oldest first."""
        sql = "SELECT * FROM resources WHERE run_id = ?"
        args: list[Any] = [run_id]
        if machine is not None:
            sql += " AND machine = ?"
            args.append(machine)
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        if live:
            sql += " AND destroyed IS NULL"
        rows = self._q(sql + " ORDER BY id", tuple(args))
        return [Resource(r["kind"], r["ident"], json.loads(r["data"]), r["owner"], r["id"]) for r in rows]

    def machines_with_resources(self, run_id: str) -> set[str]:
        """The machines of a run that still have live resources."""
        rows = self._q("SELECT DISTINCT machine FROM resources WHERE run_id = ? AND destroyed IS NULL", (run_id,))
        return {r["machine"] for r in rows}

    # -- events -----------------------------------------------------------------------------
    def event(self, run_id: str, message: str, machine: str = "", step: str = "", level: str = "info") -> float:
        """Log an event; returns its time."""
        now = time.time()
        with self._tx() as c:
            c.execute(
                "INSERT INTO events (run_id, time, machine, step, level, message) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, now, machine, step, level, message),
            )
        return now

    def events(self, run_id: str) -> list[dict[str, Any]]:
        """A run's events, oldest first."""
        rows = self._q("SELECT time, machine, step, level, message FROM events WHERE run_id = ? ORDER BY id", (run_id,))
        return [dict(r) for r in rows]

    def events_after(self, run_id: str, after: int) -> list[dict[str, Any]]:
        """A run's events whose ``id`` is above ``after``, with that id, oldest first."""
        rows = self._q(
            "SELECT id, time, machine, step, level, message FROM events WHERE run_id = ? AND id > ? ORDER BY id",
            (run_id, after),
        )
        return [dict(r) for r in rows]

    # -- schedules --------------------------------------------------------------------------
    def last_fire(self, path: str) -> float | None:
        """When the scheduler last started a scheduled run of this runbook file."""
        rows = self._q("SELECT last_fire FROM schedules WHERE path = ?", (path,))
        return float(rows[0]["last_fire"]) if rows else None

    def set_last_fire(self, path: str, runbook: str, fire: float, run: str | None = None) -> None:
        """Record a scheduled start (or the first sighting of a schedule)."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO schedules (path, runbook, last_fire, last_run) VALUES (?, ?, ?, ?) ON CONFLICT (path) "
                "DO UPDATE SET runbook = excluded.runbook, last_fire = excluded.last_fire, "
                "last_run = excluded.last_run",
                (path, runbook, fire, run),
            )


def _run(r: sqlite3.Row) -> Run:
    return Run(
        r["id"],
        r["runbook"],
        r["path"],
        r["digest"],
        r["kind"],
        r["status"],
        r["phase"],
        r["started"],
        r["finished"],
        r["resumes"],
        r["pid"],
        json.loads(r["report"]) if r["report"] else None,
    )


def _step(r: sqlite3.Row) -> Step:
    return Step(
        r["machine"],
        r["step"],
        r["status"],
        r["started"],
        r["finished"],
        r["attempts"],
        json.loads(r["result"]) if r["result"] else None,
        r["error"],
    )


class DbResourceLog:
    """A ``targets.base.ResourceLog`` kept in the state database for one (run, machine, owner)."""

    def __init__(self, state: StateStore, run_id: str, machine: str, owner: str) -> None:
        self.state, self.run_id, self.machine, self.owner = state, run_id, machine, owner

    def record(self, kind: str, ident: str, data: dict[str, Any]) -> Resource:
        """See ``ResourceLog.record``."""
        return self.state.record_resource(self.run_id, self.machine, self.owner, kind, ident, data)

    def update(self, resource: Resource, data: dict[str, Any]) -> None:
        """See ``ResourceLog.update``."""
        self.state.update_resource(resource, data)

    def forget(self, resource: Resource) -> None:
        """See ``ResourceLog.forget``."""
        self.state.forget_resource(resource)

    def resources(self) -> list[Resource]:
        """See ``ResourceLog.resources``."""
        return self.state.resources(self.run_id, self.machine, self.owner)
