#!/usr/bin/env bash
# Sets up .venv if needed, then lints and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# One worker per core, a test file's tests on one worker (its module fixtures built once).
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
