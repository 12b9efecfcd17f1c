"""The memory estimate behind `tunelab plan`."""

import json

import pytest

from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError
from tunelab.model.memory import estimate_memory, model_shape, plan_report

LLAMA = "meta-llama/Llama-2-7b-chat-hf"
GIB = 2**30


def test_shape_comes_from_a_local_config_json(tiny_llama_dir):
    shape = model_shape(str(tiny_llama_dir))
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert shape.hidden_size == config["hidden_size"]
    assert shape.num_hidden_layers == config["num_hidden_layers"]


def test_unknown_model_names_the_key():
    with pytest.raises(TunelabError, match="pretrained_model_name_or_path"):
        model_shape("nobody/no-such-model")


def test_estimate_grows_with_max_length():
    totals = [estimate_memory(TrainConfig(pretrained_model_name_or_path=LLAMA, max_length=n)).total
              for n in (512, 2048, 8192, 32768)]
    assert totals == sorted(totals) and len(set(totals)) == 4


def test_qlora_smaller_than_lora_smaller_than_full():
    est = {m: estimate_memory(TrainConfig(pretrained_model_name_or_path=LLAMA, method=m)).total
           for m in ("qlora", "lora", "full")}
    assert est["qlora"] < est["lora"] < est["full"]


def test_checkpointing_and_chunked_loss_lower_the_estimate():
    base = dict(pretrained_model_name_or_path=LLAMA, method="qlora", max_length=4096)
    on = estimate_memory(TrainConfig(**base)).total
    assert estimate_memory(TrainConfig(**base, gradient_checkpointing=False)).total > on
    assert estimate_memory(TrainConfig(**base, use_chunked_loss=False)).total > on


@pytest.mark.parametrize("model,method,seq,bs,ckpt,compiled,measured", [
    # peaks measured on an H100 by benchmarks/bench.py (BENCHMARKS.md, rounds 1 and 2), same shapes
    (LLAMA, "qlora", 2048, 1, None, False, 7.03), (LLAMA, "qlora", 2048, 1, False, False, 21.13),
    (LLAMA, "lora", 2048, 1, None, False, 15.77),
    (LLAMA, "qlora", 2048, 1, None, True, 6.93), (LLAMA, "lora", 2048, 1, None, True, 15.72),
    ("internlm/internlm2-chat-7b", "qlora", 2048, 1, None, True, 8.81),
    ("internlm/internlm2-chat-1_8b", "qlora", 2048, 4, None, True, 4.71),
    ("Qwen/Qwen2.5-1.5B-Instruct", "full", 2048, 8, False, True, 44.36),
])
def test_estimate_within_ten_percent_of_measured_peaks(model, method, seq, bs, ckpt, compiled, measured):
    cfg = TrainConfig(pretrained_model_name_or_path=model, method=method, max_length=seq, batch_size=bs,
                      gradient_checkpointing=ckpt, use_compile=compiled)
    assert abs(estimate_memory(cfg).total / GIB - measured) / measured < 0.10


def test_report_lists_parts_and_suggests_fixes_when_it_does_not_fit():
    cfg = TrainConfig(pretrained_model_name_or_path=LLAMA, method="lora", max_length=8192)
    est = estimate_memory(cfg)
    est.device_bytes = 8 * GIB
    assert est.fits is False
    from tunelab.model.memory import _suggestions

    tips = " ".join(_suggestions(cfg, est, True))
    assert "qlora" in tips and "max_length" in tips
    text = plan_report(cfg)
    assert "peak allocated" in text and "frozen/base weights" in text
