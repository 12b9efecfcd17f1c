#!/usr/bin/env bash
# Set up a virtual environment with tunelab and its test dependencies, then run the tests.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: on the CPU machines this picks the local CPU build (no multi-GB CUDA download).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,browser]"
# DeepSpeed ships as source only; build it against the torch above (not a fresh one in an isolated build env).
python -m pip install -q --no-build-isolation "deepspeed>=0.15" \
  || echo "note: deepspeed did not install; its tests will be skipped"
python -m pytest "$@"
