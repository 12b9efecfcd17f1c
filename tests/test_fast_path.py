"""apply_fast_path: what it switches on where (the GPU levers themselves are checked by scripts/gpu_check.py)."""

import torch

from tunelab.config.schema import TrainConfig
from tunelab.model.fast import apply_fast_path, downcast_frozen_weights


def test_frozen_fp32_weights_go_to_bf16_trainable_ones_stay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)
    saved = downcast_frozen_weights(model, torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    assert saved == (16 + 4) * 2


def test_on_cpu_the_plain_path_stays_and_training_is_unchanged(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_llama_dir), offload_activations=True)
    report = apply_fast_path(model, cfg, "cpu")
    assert report["varlen_attention"].startswith("off")
    assert "offloaded" not in report["checkpointing"] and report["compile"] == "off"
    assert model.config._attn_implementation != "tunelab_varlen"
    assert all(p.dtype == torch.float32 for p in model.parameters())
