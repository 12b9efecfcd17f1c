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


def test_checkpointing_and_the_fast_path_lower_the_estimate():
    base = dict(pretrained_model_name_or_path=LLAMA, method="qlora", max_length=4096)
    on = estimate_memory(TrainConfig(**base)).total
    assert estimate_memory(TrainConfig(**base, gradient_checkpointing=False)).total > on
    plain = estimate_memory(TrainConfig(**base, fast_path=False))
    assert plain.total > on + 4096 * 32000 * 4  # full fp32 logits, at least
    assert "loss (full fp32 logits)" in plain.parts


LLAMA3 = "meta-llama/Llama-3.1-8B-Instruct"
I2_7B, I2_1_8B = "internlm/internlm2-chat-7b", "internlm/internlm2-chat-1_8b"


@pytest.mark.parametrize("model,method,seq,bs,ckpt,compiled,measured,extra", [
    # Peaks measured on an H100 by benchmarks/bench.py and bench_context.py (BENCHMARKS.md), same shapes.
    # Round 1 (no compile; the loss-chunk size was larger then, which a 32k vocabulary does not feel):
    (LLAMA, "qlora", 2048, 1, None, False, 7.03, {}), (LLAMA, "qlora", 2048, 1, False, False, 21.13, {}),
    (LLAMA, "lora", 2048, 1, None, False, 15.77, {}),
    # Round 2 (full fine-tuning in bf16 weights, before the smaller loss chunks: the estimate fell by ~1 GiB since):
    ("Qwen/Qwen2.5-1.5B-Instruct", "full", 2048, 8, False, True, 44.36, dict(fp32_master_weights=False)),
    # Round 4 (the checkpoint inside the compiled layer, CUDA graphs where marked):
    (LLAMA, "qlora", 2048, 1, None, True, 7.07, {}), (LLAMA, "qlora", 2048, 1, None, True, 7.04, dict(cuda_graphs=True)),
    (LLAMA, "qlora", 2048, 1, None, True, 6.15, dict(optimizer="adamw_8bit", cuda_graphs=True)),
    (LLAMA, "lora", 2048, 1, None, True, 15.68, dict(cuda_graphs=True)),
    (I2_7B, "qlora", 2048, 1, None, True, 7.46, dict(optimizer="adamw_8bit", cuda_graphs=True)),
    (I2_1_8B, "qlora", 2048, 1, None, True, 3.0, dict(cuda_graphs=True)),
    (I2_1_8B, "qlora", 2048, 1, None, True, 2.62, dict(optimizer="adamw_8bit", cuda_graphs=True)),
    (I2_1_8B, "qlora", 2048, 4, None, True, 4.87, dict(cuda_graphs=True)),
    (I2_7B, "qlora", 8192, 1, None, True, 12.24, dict(cuda_graphs=True)),
    (I2_7B, "qlora", 8192, 1, None, True, 11.31, dict(optimizer="adamw_8bit", cuda_graphs=True)),
    ("Qwen/Qwen2.5-1.5B-Instruct", "full", 2048, 1, False, True, 25.4, dict(cuda_graphs=True)),  # fp32 master
    # Round 5 (the input embedding in CPU memory, as by default for lora / qlora):
    *[(model, method, seq, 1, None, True, peak, dict(embeddings_on_cpu=True, cuda_graphs=True, optimizer=opt))
      for model, method, seq, opt, peak in ((LLAMA, "qlora", 2048, "adamw", 6.8), (LLAMA, "qlora", 2048, "adamw_8bit", 5.9),
                                            (LLAMA, "lora", 2048, "adamw", 15.44), (I2_7B, "qlora", 2048, "adamw_8bit", 6.76),
                                            (I2_1_8B, "qlora", 2048, "adamw_8bit", 2.26),
                                            (I2_7B, "qlora", 8192, "adamw_8bit", 10.6))],
    # Round 6 (gradients taken in the loss's forward; compiled bf16 LoRA linears add their adapter elementwise):
    (LLAMA, "lora", 2048, 1, None, True, 15.64, dict(cuda_graphs=True)),
    ("Qwen/Qwen2.5-1.5B-Instruct", "full", 2048, 8, False, True, 57.48, dict(cuda_graphs=True)),  # fp32 master
    ("Qwen/Qwen2.5-1.5B-Instruct", "full", 2048, 8, False, True, 63.26, dict(cuda_graphs=True, accumulative_counts=2)),
    # Longest context (Llama-3.1-8B QLoRA r=32, one sequence, layer inputs offloaded, MLP in 8k slices):
    *[(LLAMA3, "qlora", n, 1, None, False, peak, dict(lora_r=32, lora_dropout=0.0, optimizer="adamw_8bit",
                                                      offload_activations=True))
      for n, peak in ((2972, 7.23), (21848, 9.95), (40724, 12.79), (78475, 18.87), (153977, 31.03),
                      (342733, 57.52))],
    # Longest context again with round 6's loss and the input embedding in CPU memory (session 6, limits searched):
    *[(LLAMA3, "qlora", n, 1, None, False, peak, dict(lora_r=32, lora_dropout=0.0, optimizer="adamw_8bit",
                                                      offload_activations=True, embeddings_on_cpu=True))
      for n, peak in ((2972, 6.25), (5974, 6.98), (21848, 8.98), (33226, 10.61), (40724, 11.82), (53856, 13.93),
                      # session 7: 24 GB and 40 GB searched
                      (78475, 17.91), (177074, 31.76))],
])
def test_estimate_within_ten_percent_of_measured_peaks(model, method, seq, bs, ckpt, compiled, measured, extra):
    # rounds 1-4 kept the input embedding on the GPU; bench.py takes one micro-batch a step unless acc= says more
    extra = {"embeddings_on_cpu": False, "accumulative_counts": 1, **extra}
    cfg = TrainConfig(pretrained_model_name_or_path=model, method=method, max_length=seq, batch_size=bs,
                      gradient_checkpointing=ckpt, use_compile=compiled, **extra)
    assert abs(estimate_memory(cfg).total / GIB - measured) / measured < 0.10


def test_accumulation_keeps_the_whole_gradients_at_the_peak():
    def total(method, acc, **kw):
        return estimate_memory(TrainConfig(pretrained_model_name_or_path=LLAMA, method=method, max_length=2048,
                                           accumulative_counts=acc, **kw)).total

    full_grads = model_shape(LLAMA).total_params() * 4  # fp32 master weights, fp32 gradients
    assert total("full", 4) - total("full", 1) > 0.9 * full_grads
    assert total("full", 4) == total("full", 2)  # later micro-batches add into the same gradients
    from tunelab.model.memory import _lora_params

    adapter_grads = _lora_params(model_shape(LLAMA), TrainConfig(pretrained_model_name_or_path=LLAMA)) * 4
    assert 0 < total("qlora", 2) - total("qlora", 1) <= adapter_grads  # r=64 all-linear: 0.6 GiB


def test_embeddings_on_cpu_free_the_input_embedding_unless_tied_or_trained():
    def total(model, **kw):
        return estimate_memory(TrainConfig(pretrained_model_name_or_path=model, method="qlora", **kw)).total

    assert total(I2_7B, embeddings_on_cpu=False) - total(I2_7B) == 92544 * 4096 * 2  # 0.71 GiB, None means on
    qwen = "Qwen/Qwen2.5-1.5B-Instruct"  # tied to lm_head: stays
    assert total(qwen, embeddings_on_cpu=False) == total(qwen, embeddings_on_cpu=True)
    full = dict(pretrained_model_name_or_path=I2_7B, method="full")
    assert estimate_memory(TrainConfig(**full, embeddings_on_cpu=True)).total == estimate_memory(TrainConfig(**full)).total


def test_report_lists_parts_and_suggests_fixes_when_it_does_not_fit(monkeypatch):
    import types

    import torch

    card = types.SimpleNamespace(total_memory=8 * GIB, name="a pretend 8 GiB GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    cfg = TrainConfig(pretrained_model_name_or_path=LLAMA, method="lora", max_length=8192)
    est = estimate_memory(cfg, torch.device("cuda"))
    assert est.fits is False
    tips = " ".join(est.suggestions)
    assert "qlora" in tips and "max_length" in tips
    text = plan_report(cfg)
    assert "peak allocated" in text and "frozen/base weights" in text


def test_long_context_levers_lower_the_estimate_by_what_they_free():
    llama3 = "meta-llama/Llama-3.1-8B-Instruct"
    base = dict(pretrained_model_name_or_path=llama3, method="qlora", lora_r=32, max_length=65536, use_compile=False)
    plain = estimate_memory(TrainConfig(**base, mlp_chunk_size=None)).total
    offloaded = estimate_memory(TrainConfig(**base, mlp_chunk_size=None, offload_activations=True)).total
    # 31 of 32 layer inputs (65536 tokens x 4096 x 2 bytes each) leave the GPU.
    assert plain - offloaded == 31 * 65536 * 4096 * 2
    sliced = estimate_memory(TrainConfig(**base, mlp_chunk_size=8192, offload_activations=True)).total
    assert sliced < offloaded - 4 * GIB  # the MLP's intermediates for 8k tokens instead of 64k
    short = dict(base, max_length=4096)
    assert estimate_memory(TrainConfig(**short, mlp_chunk_size=8192)).total == \
        estimate_memory(TrainConfig(**short, mlp_chunk_size=None)).total  # no slices below the slice size


def test_offloading_more_than_the_cpu_memory_stops_before_loading(monkeypatch):
    import types

    import torch

    from tunelab.model import memory
    from tunelab.train.progress import check_memory_fits

    card = types.SimpleNamespace(total_memory=80 * GIB, name="a pretend 80 GiB GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    cfg = TrainConfig(pretrained_model_name_or_path="meta-llama/Llama-3.1-8B-Instruct", method="qlora",
                      max_length=131072, offload_activations=True, embeddings_on_cpu=False)
    assert "CPU memory (offloaded)" in plan_report(cfg)
    assert estimate_memory(cfg).cpu_offload_bytes == 32 * 131072 * 4096 * 2  # 32 GiB
    monkeypatch.setattr(memory, "available_cpu_memory", lambda: 16 * GIB)
    with pytest.raises(TunelabError, match=r"offload_activations = True would keep 32.0 GiB .* 16.0 GiB available"):
        check_memory_fits(cfg, torch.device("cuda"), log=lambda *a: None)
    monkeypatch.setattr(memory, "available_cpu_memory", lambda: 100 * GIB)
    check_memory_fits(cfg, torch.device("cuda"), log=lambda *a: None)  # fits in both memories: no error


def test_a_tight_fit_starts_with_a_warning_and_a_clear_miss_stops_unless_told(monkeypatch):
    import types

    import torch

    from tunelab.model.memory import CUDA_CONTEXT_BYTES
    from tunelab.train.progress import check_memory_fits

    cfg = TrainConfig(pretrained_model_name_or_path=LLAMA, method="qlora", max_length=2048, accumulative_counts=1)
    est = estimate_memory(cfg)
    card = types.SimpleNamespace(total_memory=0, name="a pretend GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)

    def check(card_bytes, **settings):
        card.total_memory = int(card_bytes)
        said = []
        check_memory_fits(TrainConfig(**{**vars(cfg), **settings}), torch.device("cuda"), log=said.append)
        return "\n".join(said)

    assert "warning" not in check(est.with_overhead + GIB)
    tight = est.total + CUDA_CONTEXT_BYTES + 0.1 * GIB  # room for the peak, not for the allocator's slack
    said = check(tight)
    assert "may run out of GPU memory" in said and "tight" in said
    with pytest.raises(TunelabError, match="check_memory = False"):
        check(est.total)  # the peak alone is more than the card
    assert "does NOT fit" in check(est.total, check_memory=False)  # told to start anyway: a warning only
