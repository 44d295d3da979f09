#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job on its built-in default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
.venv/bin/python -m launch.quickstart --config=configs/quickstart.py --workdir="${WORKDIR:-out/demo}" "$@"
