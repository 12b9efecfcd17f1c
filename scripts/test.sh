#!/usr/bin/env bash
# Set up a virtual environment with tunelab and its test dependencies, then run the tests.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test,browser . scripts/venv.sh
# DeepSpeed ships as source only; build it against the torch above (not a fresh one in an isolated build env).
python -m pip install -q --no-build-isolation "deepspeed>=0.15" \
  || echo "note: deepspeed did not install; its tests will be skipped"
# llama-cpp-python ships as source only too; its library alone (no tools, examples or server) builds in ~3 min on
# 2 cores, and tests/test_gguf.py then checks our GGUF files against llama.cpp itself.
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
  python -m pip install -q "llama-cpp-python>=0.3" \
  || echo "note: llama-cpp-python did not build; the llama.cpp tests will be skipped"
python -m pytest "$@"
# swanlab pins protobuf < 7, where every other dependency takes 7, so it cannot share the environment: with no
# pytest arguments, its tracker test and the tests that read tokenizer.model files run once more with swanlab and
# protobuf 6 ahead of the environment on the path (what a user who installs swanlab gets).
if [ $# -eq 0 ]; then
  SITE=.venv/protobuf6-site
  if python -m pip install -q --target "$SITE" --upgrade swanlab "protobuf>=6.31.1,<7"; then
    PYTHONPATH="$SITE" python -m pytest -q tests/test_trackers.py tests/test_sentencepiece_file.py \
      tests/test_model_internlm2.py tests/test_gguf.py tests/test_export.py
  else
    echo "note: swanlab did not install; its test was skipped above"
  fi
fi
