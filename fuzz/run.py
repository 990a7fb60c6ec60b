"""Run fuzz targets under atheris (coverage-guided, libFuzzer) and sum up what they found.

    python -m fuzz.run NAME [NAME ...] [--seconds S] [--corpus DIR] [--workdir DIR]
    python -m fuzz.run --all [--seconds S]

Each target runs in a child process (libFuzzer ends its process when done, and a hang or a
runaway allocation must end only that child): lifeboat's modules (and PyYAML's, which the runbook
loader parses with) are instrumented for coverage as the target imports them, the seed corpus
``fuzz/corpus/NAME/`` (or ``--corpus``) is read, and the new inputs that reach new code are
written to a scratch folder (``--workdir``, default a folder under the system's temp dir), never
into git; so are the findings (``crash-*``, ``timeout-*``, ``oom-*``), each a reproducer:
``python -m fuzz.run NAME --reproduce FILE`` runs one input without the fuzzer.
libFuzzer's bounds: ``-max_total_time`` (``--seconds``), ``-rss_limit_mb`` (``--rss-mb``),
``-timeout`` per input (``--timeout``), ``-max_len`` (``--max-len``).

The summary has one line per target (execs, execs/s, coverage, corpus growth, findings) and the
exit status is 1 when any target found something or did not run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTRUMENTED = ["lifeboat", "fuzz", "yaml"]  # packages whose code guides the fuzzer
FINDING_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")


def targets() -> list[str]:
    """Every target's NAME: the modules ``fuzz/fuzz_NAME.py``."""
    return sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))


def corpus_dir(name: str) -> Path:
    """The seed corpus committed for target ``name``."""
    return HERE / "corpus" / name


@dataclass
class Summary:
    """What one fuzzing run of one target did, read from libFuzzer's output and the scratch folder."""

    target: str
    exit_status: int
    seconds: float
    execs: int
    execs_per_s: int
    coverage: int  # libFuzzer's "cov": instrumented edges reached
    features: int  # libFuzzer's "ft"
    seed_inputs: int
    corpus_inputs: int  # seed inputs plus new ones, as libFuzzer ended
    new_inputs: int
    peak_rss_mb: int
    findings: list[str]

    @property
    def ok(self) -> bool:
        """libFuzzer ran to its time limit and found nothing."""
        return self.exit_status == 0 and not self.findings

    def line(self) -> str:
        """One line for the table of ``--all``."""
        found = ", ".join(self.findings) or "none"
        return (f"{self.target:<22} {self.execs:>10} {self.execs_per_s:>8} {self.coverage:>6} {self.features:>6} "
                f"{self.seed_inputs:>5} -> {self.corpus_inputs:<6} {self.peak_rss_mb:>6}  {found}")


HEADER = (f"{'target':<22} {'execs':>10} {'exec/s':>8} {'cov':>6} {'ft':>6} {'corpus (seed -> end)':<15} "
          f"{'rss MB':>6}  findings")


def _stat(log: str, key: str) -> int:
    m = re.search(rf"^stat::{key}:\s*(\d+)", log, re.M)
    return int(m.group(1)) if m else 0


def summarize(name: str, log: str, status: int, seconds: float, scratch: Path, seeds: int) -> Summary:
    """A ``Summary`` from libFuzzer's log (its last status line and ``-print_final_stats``)."""
    lines = re.findall(r"^#\d+\s+\w+\s+(.*)$", log, re.M)
    last = lines[-1] if lines else ""

    def field(key: str) -> int:
        m = re.search(rf"\b{key}: (\d+)", last)
        return int(m.group(1)) if m else 0

    findings = sorted(p.name for p in scratch.iterdir() if p.name.startswith(FINDING_PREFIXES))
    return Summary(
        target=name, exit_status=status, seconds=round(seconds, 1), execs=_stat(log, "number_of_executed_units"),
        execs_per_s=_stat(log, "average_exec_per_sec"), coverage=field("cov"), features=field("ft"),
        seed_inputs=seeds, corpus_inputs=field("corp"), new_inputs=_stat(log, "new_units_added"),
        peak_rss_mb=_stat(log, "peak_rss_mb"), findings=findings,
    )


def run_target(name: str, *, seconds: int, workdir: Path, corpus: Path | None = None, rss_mb: int = 2048,
               timeout: int = 10, max_len: int = 65536, quiet: bool = False) -> Summary:
    """Fuzz ``name`` for ``seconds`` in a child process; its scratch folder is ``workdir/NAME``."""
    seed_dir = corpus or corpus_dir(name)
    if not seed_dir.is_dir():
        raise SystemExit(f"fuzz: no corpus folder {seed_dir} for target {name!r}")
    scratch = workdir / name
    (scratch / "corpus").mkdir(parents=True, exist_ok=True)
    log_path = scratch / "fuzz.log"
    args = [
        sys.executable, "-m", "fuzz.run", "--libfuzzer", name, "--",
        f"-max_total_time={seconds}", f"-rss_limit_mb={rss_mb}", f"-timeout={timeout}", f"-max_len={max_len}",
        "-print_final_stats=1", f"-artifact_prefix={scratch}/",
        str(scratch / "corpus"), str(seed_dir),  # the first folder gets the new inputs
    ]
    started = time.monotonic()
    with open(log_path, "w") as log:
        try:
            status = subprocess.run(args, cwd=HERE.parent, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=seconds + 10 * timeout + 120).returncode
        except subprocess.TimeoutExpired:
            status = -1  # libFuzzer's own time limits did not hold
    text = log_path.read_text(errors="replace")
    summary = summarize(name, text, status, time.monotonic() - started, scratch,
                        sum(1 for p in seed_dir.iterdir() if p.is_file()))
    if not summary.ok and not quiet:
        print(f"fuzz: {name}: exit status {status}; the log is {log_path}; its end:", file=sys.stderr)
        print("\n".join(text.splitlines()[-40:]), file=sys.stderr)
    return summary


def _libfuzzer(name: str, flags: list[str]) -> None:
    """In the child: instrument lifeboat as the target imports it, then hand over to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        module = importlib.import_module(f"fuzz.fuzz_{name}")
    atheris.Setup([sys.argv[0], *flags], module.test_one_input)
    atheris.Fuzz()  # never returns: libFuzzer exits with 0, or with 77/70/71 on a finding


def reproduce(name: str, path: Path) -> None:
    """Run one input through target ``name`` without the fuzzer (a finding's traceback shows)."""
    module = importlib.import_module(f"fuzz.fuzz_{name}")
    module.test_one_input(path.read_bytes())
    print(f"fuzz: {name}: {path} ran without a finding")


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module's docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--libfuzzer"]:
        _libfuzzer(argv[1], argv[3:])
        return 0
    p = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", metavar="NAME", help=f"targets: {', '.join(targets())}")
    p.add_argument("--all", action="store_true", help="every target, one after the other")
    p.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default 60)")
    p.add_argument("--corpus", type=Path, help="seed corpus folder (default fuzz/corpus/NAME; one target only)")
    p.add_argument("--workdir", type=Path, help="scratch folder for new inputs, findings and logs")
    p.add_argument("--rss-mb", type=int, default=2048, help="memory bound of the fuzzing process (default 2048)")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take (default 10)")
    p.add_argument("--max-len", type=int, default=65536, help="largest input libFuzzer makes (default 65536)")
    p.add_argument("--reproduce", type=Path, metavar="FILE", help="run FILE through the target, no fuzzer")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    a = p.parse_args(argv)
    names = targets() if a.all else a.names
    unknown = sorted(set(names) - set(targets()))
    if not names or unknown:
        p.error(f"name targets from {', '.join(targets())} (or --all)" + (f"; unknown: {unknown}" if unknown else ""))
    if a.reproduce:
        if len(names) != 1:
            p.error("--reproduce takes one target")
        reproduce(names[0], a.reproduce)
        return 0
    if a.corpus and len(names) != 1:
        p.error("--corpus takes one target")
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="lifeboat-fuzz-"))
    summaries = []
    if not a.json:
        print(f"fuzz: {len(names)} target(s), {a.seconds} s each; new inputs, findings and logs in {workdir}")
        print(HEADER)
    for name in names:
        s = run_target(name, seconds=a.seconds, workdir=workdir, corpus=a.corpus, rss_mb=a.rss_mb,
                       timeout=a.timeout, max_len=a.max_len)
        summaries.append(s)
        if not a.json:
            print(s.line(), flush=True)
    if a.json:
        print(json.dumps([asdict(s) | {"ok": s.ok} for s in summaries], indent=2))
    else:
        bad = [s.target for s in summaries if not s.ok]
        print(f"fuzz: {len(summaries) - len(bad)} of {len(summaries)} target(s) clean" +
              (f"; findings or failures in: {', '.join(bad)} (see {workdir})" if bad else ""))
    return 0 if all(s.ok for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
