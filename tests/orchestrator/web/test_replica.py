"""The dashboard when the replica cannot be read (an object store down): it says why and shows
the lag as unknown, instead of failing; the pane runs in-process here (``fastapi.testclient``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lifeboat.archive import Archive
from lifeboat.archive.errors import StorageError
from lifeboat.orchestrator.web.app import Settings, create_app
from tests.archive.helpers import BytesSource

TOKEN = "replica-test-token"


def test_an_unreadable_replica_leaves_the_lag_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=4096)
    arc.backup("web01", BytesSource(bytes(8192)))
    replica = Archive.init(str(tmp_path / "replica"), chunk_size=4096)

    def down(_prefix: str) -> None:
        raise StorageError("replica.example: connection refused")

    monkeypatch.setattr(replica.backend, "change_stamps", down)
    app = create_app(Settings(arc, tmp_path / "state", 3600.0, TOKEN, False, replica=replica))
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        doc = client.get("/api/dashboard").json()
        form = client.get("/login").text
        csrf = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        client.post("/login", data={"token": TOKEN, "csrf": csrf, "next": "/"})
        page = client.get("/").text
    assert "Off-site lag unknown" in page and "connection refused" in page and ">unknown<" in page
    assert doc["replica"] is True and "connection refused" in doc["replica_error"]
    assert [(m["machine"], m["offsite"]) for m in doc["machines"]] == [("web01", None)]
