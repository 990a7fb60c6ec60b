"""Output conventions of the CLI: JSON on stdout, progress and logs on stderr.

Progress is a rich bar when stderr is a terminal and one log line per step otherwise, so logs
from cron, systemd or CI stay readable. rich is imported only to draw a bar (importing it costs
tens of milliseconds, a good part of a whole incremental backup): log lines are plain text, printed
through the bar's console only while a bar is on screen.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

# How lifeboat starts itself as a child (``lifeboat serve`` for a run, ``lifeboat run`` for the
# scheduler): this interpreter, so a child runs the same installation as its parent.
SELF_COMMAND = [sys.executable, "-m", "lifeboat"]

# The control characters rich drops from printed text (BEL, BS, VT, FF, CR): a log line stays one line.
_CONTROL = dict.fromkeys((7, 8, 11, 12, 13))
# The console of the progress bar on screen, if any: log lines go through it to print above the bar.
_bar_console: Console | None = None


def log(message: str) -> None:
    """One line on stderr."""
    if _bar_console is not None:
        _bar_console.print(message, markup=False, soft_wrap=True, emoji=False)
        return
    sys.stderr.write(message.translate(_CONTROL) + "\n")
    sys.stderr.flush()


def emit_json(doc: Any) -> None:
    """The single JSON document of a ``--json`` command, on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A callback advancing by a number of bytes: a bar on a terminal, else a line per 10 %."""
    global _bar_console
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        console = Console(stderr=True, highlight=False)
        outer, _bar_console = _bar_console, console
        try:
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task(label, total=total)
                yield lambda n: bar.advance(task, n)
        finally:
            _bar_console = outer
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
