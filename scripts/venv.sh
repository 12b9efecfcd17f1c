# Sourced by demo.sh and test.sh: create and activate .venv with torch and tunelab[EXTRAS] installed.
# torch comes first and pinned: on the CPU machines this picks the local CPU build (no multi-GB CUDA download).
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${EXTRAS}]"
