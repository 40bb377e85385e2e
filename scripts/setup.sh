#!/usr/bin/env bash
# Set up tilestack on a fresh machine: a virtual environment in .venv with everything the project needs.
# torch==2.13.0 goes in first: on a CPU-only machine that is the local CPU wheel, and with it installed the
# project's looser torch requirement resolves to nothing more (never the multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev,federated]"
