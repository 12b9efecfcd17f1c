#!/usr/bin/env bash
# On a GPU machine: the user's path (train QLoRA with the defaults -> convert -> chat) on a tiny
# local model, then the GPU tests. Run from the repository root (bitsandbytes must be importable for the QLoRA parts).
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
d=$(mktemp -d)
python3 - "$d" <<'PY'
import sys
from tunelab.model.tiny import make_model
from tunelab.data import self_cognition
make_model(sys.argv[1] + "/base", "internlm2", hidden_size=128, num_layers=2, intermediate_size=256)
self_cognition.write(sys.argv[1] + "/data.json", name="TuneBot", author="tunelab", n=300)
PY
python3 -m tunelab copy-cfg internlm2_1_8b_qlora_self_cognition_e3 "$d"
cfg="$d/internlm2_1_8b_qlora_self_cognition_e3_copy.py"
python3 -m tunelab train "$cfg" --work-dir "$d/work" --cfg-options \
  pretrained_model_name_or_path="$d/base" data_path="$d/data.json" max_length=512 accumulative_counts=1 \
  batch_size=4 lr=3e-3 max_epochs=3 evaluation_freq=1000 lora_alpha=128
python3 -m tunelab convert pth_to_hf "$cfg" "$d/work" "$d/adapter"
python3 -m tunelab chat "$d/base" --adapter "$d/adapter" --prompt "who are you?" --max-new-tokens 32
# then the GPU tests (several minutes: each run compiles its tiny decoder layers)
python3 -m pytest -q -W ignore tests/test_train_gpu.py tests/test_fast_lora.py tests/test_fast_path.py
