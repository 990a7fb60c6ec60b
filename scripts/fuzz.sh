#!/usr/bin/env bash
# The longer fuzzing campaign: every target of fuzz/ under atheris for SECONDS each (default 600),
# then a summary (execs, execs/s, coverage, corpus growth, findings). New inputs and findings go
# to a scratch folder (printed; FUZZ_WORKDIR to choose it), never into git: copy a finding into
# fuzz/corpus/NAME/ once it is fixed. Exit status 1 when any target found something.
# PYTHON: the interpreter (default .venv/bin/python, as scripts/setup.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
workdir=${FUZZ_WORKDIR:-$(mktemp -d -t lifeboat-fuzz-XXXXXX)}
exec "${PYTHON:-.venv/bin/python}" -m fuzz.run --all --seconds "$seconds" --workdir "$workdir"
