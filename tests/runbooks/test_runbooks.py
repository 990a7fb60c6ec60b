"""Runbooks: the shipped ones validate and say when to use them; every mistake is reported as one
line FILE:LINE:COLUMN: FIELD: message, exits 2, and runs nothing."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from lifeboat.orchestrator.cli import main
from lifeboat.orchestrator.runbook import SCHEMA_PATH, InvalidRunbook, load
from tests.runbooks.cases import BASE, CASES
from tests.targets.realpeers import REPO, lifeboat

SHIPPED = sorted((REPO / "runbooks").glob("*.yaml"))


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_PATH.read_text()))
    for schema in (REPO / "targets" / "schemas").glob("*.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(schema.read_text()))


def test_shipped_runbooks_cover_every_scenario_and_validate() -> None:
    runbooks = {p.stem: load(p) for p in SHIPPED}
    scenarios = {rb.doc.get("scenario") for rb in runbooks.values()}
    kinds = {rb.kind for rb in runbooks.values()}
    assert {"P2V", "V2V", "V2P", "P2P"} <= scenarios
    assert {"rehearsal", "failover"} <= kinds
    assert load(REPO / "examples" / "rehearsal.yaml").kind == "rehearsal"
    for path in SHIPPED:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "use it" in path.read_text().split("version:")[0], path.name


def test_base_case_is_valid(tmp_path: Path) -> None:
    p = tmp_path / "ok.yaml"
    p.write_text(BASE)
    rb = load(p)
    assert rb.machines[0].selector == "web01@latest" and rb.teardown == "always" and rb.network_mode == "isolated"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_located_and_nothing_runs(
    case: tuple[str, str, list[tuple[int, int, str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cid, text, expected = case
    path = tmp_path / f"{cid}.yaml"
    path.write_text(text)
    with pytest.raises(InvalidRunbook) as err:
        load(path)
    got = [(p.line, p.column, p.message) for p in err.value.problems]
    assert len(got) == len(expected), got
    for (line, col, msg), (eline, ecol, words) in zip(got, expected, strict=True):
        assert (line, col) == (eline, ecol) and words in msg, got

    state = tmp_path / "state"
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(path), "--state", str(state)])
    assert exit_.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    line, col, _ = expected[0]
    assert lines[0].startswith(f"{path}:{line}:{col}: "), lines
    assert expected[0][2] in lines[0]
    assert lines[-1].endswith("nothing was run")
    assert not state.exists()  # not even the state database was created


def test_cli_validate_and_exit_status(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CASES[1][1])
    done = lifeboat("validate", str(bad), *map(str, SHIPPED))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[0] == f"{bad}:4:1: name: duplicate key 'name' (first at line 2)"
    assert len(lines) == 1  # the shipped runbooks (V2P and P2P with the pxe driver too) are valid, no warnings
    assert lifeboat("validate", *map(str, SHIPPED)).returncode == 0
    doc = json.loads(lifeboat("validate", str(REPO / "runbooks" / "v2p.yaml"), "--json").stdout)
    assert doc["valid"] and doc["problems"] == [] and doc["warnings"] == []
    done = lifeboat("run", str(bad), "--state", str(tmp_path / "st"), "--json")
    assert done.returncode == 2 and done.stdout == "" and not (tmp_path / "st").exists()
