#!/usr/bin/env bash
# The README's test command: set up, then lint, type-check and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest -ra --durations=15 "$@"  # the slowest tests, to keep the budget in view
