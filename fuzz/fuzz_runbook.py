"""Fuzz the runbook loader (``lifeboat.orchestrator.runbook.load``) from YAML text.

Why: a runbook is typed by people and copied between hosts; whatever its bytes (not UTF-8, bad
YAML, deep nesting, anchors and aliases, wrong types in any field, rule-breaking values), ``load``
must return a ``Runbook`` or raise ``InvalidRunbook`` / ``UsageError`` listing the mistakes, never
another exception or a hang. The input is written to ``runbook.yaml`` in a private temporary
folder (with the shipped ``playbooks/`` linked beside it, so hook checks can pass as well as
fail) and loaded from there.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from lifeboat.orchestrator.runbook import InvalidRunbook, load
from lifeboat.plumbing.errors import UsageError

_DIR = Path(tempfile.mkdtemp(prefix="lifeboat-fuzz-runbook-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
(_DIR / "playbooks").symlink_to(Path(__file__).resolve().parents[1] / "runbooks" / "playbooks")
_FILE = _DIR / "runbook.yaml"


def test_one_input(data: bytes) -> None:
    """Load ``data`` as a runbook: a ``Runbook`` or a typed error, nothing else."""
    _FILE.write_bytes(data)
    try:
        book = load(_FILE)
    except InvalidRunbook as e:
        assert e.problems, "InvalidRunbook without a problem"
        str(e)
        return
    except UsageError:
        return
    book.waves()
    for m in book.machines:
        book.machine(m.name)
