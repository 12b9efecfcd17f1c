#!/usr/bin/env bash
# Set up a virtual environment with tunelab, then run the built-in CPU demo (a tiny model learns its new identity).
# Usage: bash scripts/demo.sh [tunelab demo args, e.g. --name 小助手]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=quant . scripts/venv.sh
tunelab demo "$@"
