#!/usr/bin/env bash
# Set up a virtual environment with tunelab and its test dependencies, then run the tests.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test,browser . scripts/venv.sh
# DeepSpeed ships as source only; build it against the torch above (not a fresh one in an isolated build env).
python -m pip install -q --no-build-isolation "deepspeed>=0.15" \
  || echo "note: deepspeed did not install; its tests will be skipped"
python -m pytest "$@"
