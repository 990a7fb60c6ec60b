"""Output conventions of the CLI: JSON on stdout, progress and logs on stderr.

Progress is a rich bar when stderr is a terminal and one log line per step otherwise, so logs
from cron, systemd or CI stay readable.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

err = Console(stderr=True, highlight=False)


def log(message: str) -> None:
    """One line on stderr."""
    err.print(message, markup=False, soft_wrap=True)


def emit_json(doc: Any) -> None:
    """The single JSON document of a ``--json`` command, on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A callback advancing by a number of bytes: a bar on a terminal, else a line per 10 %."""
    if sys.stderr.isatty():
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)
        return
    done = 0
    next_step = 0
    start = time.monotonic()

    def advance(n: int) -> None:
        nonlocal done, next_step
        done += n
        pct = 100 if total == 0 else done * 100 // total
        if pct >= next_step:
            rate = done / max(time.monotonic() - start, 1e-6) / 1e6
            log(f"{label}: {pct}% ({done} of {total} bytes, {rate:.0f} MB/s)")
            next_step = pct - pct % 10 + 10

    yield advance
