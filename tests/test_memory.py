"""The memory estimate behind `tunelab plan`."""

import dataclasses
import json

import pytest

from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError
from tunelab.model.fit import plan_report
from tunelab.model.memory import estimate_memory
from tunelab.model.shapes import model_shape

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


def test_every_model_and_vision_tower_of_the_shipped_configs_has_a_shape_offline():
    from tunelab.config import registry
    from tunelab.model.shapes import KNOWN_SHAPES, KNOWN_VISION, ModelShape

    for model in registry.MODELS.values():
        assert model.hub_id in KNOWN_SHAPES, f"add {model.hub_id} to tunelab.model.shapes.KNOWN_SHAPES"
        assert ModelShape.from_config(KNOWN_SHAPES[model.hub_id]).total_params() > 0
    for tower in registry.VISION_TOWERS.values():
        assert tower.hub_id in KNOWN_VISION, f"add {tower.hub_id} to tunelab.model.shapes.KNOWN_VISION"
        shape = KNOWN_VISION[tower.hub_id]
        assert {"hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "image_size"} <= set(shape)


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
QWEN_1_5B = "Qwen/Qwen2.5-1.5B-Instruct"


def peak(model, method, seq, measured, *, bs=1, ckpt=None, compiled=True, **settings):
    """A peak of torch.cuda.max_memory_allocated() measured on an H100 (benchmarks/bench.py, bench_context.py;
    BENCHMARKS.md) and the settings it was measured with. bench.py takes one micro-batch a step unless said."""
    # Every QLoRA peak here kept its dequantised weights for backward unless the row says otherwise.
    settings = {"accumulative_counts": 1, "embeddings_on_cpu": False, "qlora_dequant_once": True, **settings}
    cfg = TrainConfig(pretrained_model_name_or_path=model, method=method, max_length=seq, batch_size=bs,
                      gradient_checkpointing=ckpt, use_compile=compiled, **settings)
    return pytest.param(cfg, measured, id=f"{model.split('/')[-1]}-{method}-{seq}-{measured}")


# Llama-3.1-8B, one row, with the MLP in slices of 8192 tokens (the default until round 14)
LONG = dict(lora_r=32, lora_dropout=0.0, optimizer="adamw_8bit", offload_activations=True, mlp_chunk_size=8192)
DEFAULTS = dict(embeddings_on_cpu=True, cuda_graphs=True)  # lora / qlora as `tunelab train` runs them since round 5

# The peaks the estimate was fitted to: ACT_PER_TOKEN on round 1 (uncompiled), COMPILED_ACT_FACTOR on round 2 and 4
# (compiled, the checkpoint around and inside the layer), the loss's hidden-state term on round 3's long rows, the
# accumulation term on round 7's Qwen row.
FITTED = [
    peak(LLAMA, "qlora", 2048, 7.03, compiled=False), peak(LLAMA, "qlora", 2048, 21.13, ckpt=False, compiled=False),
    peak(LLAMA, "lora", 2048, 15.77, compiled=False),
    peak(QWEN_1_5B, "full", 2048, 44.36, bs=8, ckpt=False, fp32_master_weights=False),
    peak(LLAMA, "qlora", 2048, 7.07), peak(LLAMA, "qlora", 2048, 7.04, cuda_graphs=True),
    peak(LLAMA, "qlora", 2048, 6.15, optimizer="adamw_8bit", cuda_graphs=True),
    peak(LLAMA, "lora", 2048, 15.68, cuda_graphs=True),
    peak(I2_7B, "qlora", 2048, 7.46, optimizer="adamw_8bit", cuda_graphs=True),
    peak(I2_1_8B, "qlora", 2048, 3.0, cuda_graphs=True),
    peak(I2_1_8B, "qlora", 2048, 2.62, optimizer="adamw_8bit", cuda_graphs=True),
    peak(I2_1_8B, "qlora", 2048, 4.87, bs=4, cuda_graphs=True),
    peak(I2_7B, "qlora", 8192, 12.24, cuda_graphs=True, offload_activations=False),
    peak(I2_7B, "qlora", 8192, 11.31, optimizer="adamw_8bit", cuda_graphs=True, offload_activations=False),
    peak(QWEN_1_5B, "full", 2048, 25.4, ckpt=False, cuda_graphs=True),
    *[peak(LLAMA3, "qlora", n, measured, compiled=False, **LONG)
      for n, measured in ((2972, 7.23), (21848, 9.95), (40724, 12.79), (78475, 18.87), (153977, 31.03),
                          (342733, 57.52))],
    peak(QWEN_1_5B, "full", 2048, 63.26, bs=8, ckpt=False, cuda_graphs=True, accumulative_counts=2),
]

# Peaks measured after the estimate's constants and terms were set, never used to choose them.
HELD_OUT = [
    # round 5: the input embedding in CPU memory
    peak(LLAMA, "qlora", 2048, 6.8, **DEFAULTS), peak(LLAMA, "qlora", 2048, 5.9, optimizer="adamw_8bit", **DEFAULTS),
    peak(LLAMA, "lora", 2048, 15.44, **DEFAULTS),
    peak(I2_7B, "qlora", 2048, 6.76, optimizer="adamw_8bit", **DEFAULTS),
    peak(I2_1_8B, "qlora", 2048, 2.26, optimizer="adamw_8bit", **DEFAULTS),
    peak(I2_7B, "qlora", 8192, 10.6, optimizer="adamw_8bit", offload_activations=False, **DEFAULTS),
    # round 6: gradients taken in the loss's forward, compiled bf16 LoRA linears adding their adapter elementwise
    peak(LLAMA, "lora", 2048, 15.64, cuda_graphs=True),
    peak(QWEN_1_5B, "full", 2048, 57.48, bs=8, ckpt=False, cuda_graphs=True),
    # round 7: one and two micro-batches a step
    peak(LLAMA, "qlora", 2048, 5.88, optimizer="adamw_8bit", **DEFAULTS),
    peak(LLAMA, "qlora", 2048, 6.13, optimizer="adamw_8bit", accumulative_counts=2, **DEFAULTS),
    # round 12: the 4-bit weights dequantised again in backward
    peak(LLAMA, "qlora", 2048, 6.50, qlora_dequant_once=False, **DEFAULTS),
    # round 16 (H200, Unsloth's settings: dropout 0, 8-bit AdamW): layer inputs in CPU memory, copied beside the
    # compute, with the checkpoint inside the compiled layer (the default from 8k on; attention's output kept since
    # round 21, measured at 8k and 32k below), against the inputs on the GPU under CUDA graphs
    *[peak(I2_7B, "qlora", n, measured, optimizer="adamw_8bit", lora_dropout=0.0, qlora_dequant_once=False,
           embeddings_on_cpu=True, cuda_graphs=not offload, offload_activations=offload)
      for n, offload, measured in ((8192, True, 7.92), (8192, False, 9.30), (4096, True, 6.79), (4096, False, 7.17))],
    *[peak(LLAMA3, "qlora", n, measured, lora_r=32, lora_dropout=0.0, optimizer="adamw_8bit", qlora_dequant_once=False,
           **DEFAULTS) for n, measured in ((8192, 7.42), (16384, 9.68))],
    # round 14 (H200): 16 and 24 GB caps, the 4-bit weights dequantised again in backward
    *[peak(LLAMA3, "qlora", n, measured, compiled=False, embeddings_on_cpu=True, qlora_dequant_once=False, **LONG)
      for n, measured in ((40724, 11.27), (78475, 16.92))],
    # round 15 (H200): Llama-7B QLoRA 2k at Unsloth's settings with and without CUDA graphs; the 40 GB cap; Qwen2.5-1.5B
    # full fine-tuning, 16 rows a micro-batch
    *[peak(LLAMA, "qlora", 2048, measured, optimizer="adamw_8bit", lora_dropout=0.0, qlora_dequant_once=False,
           embeddings_on_cpu=True, cuda_graphs=graphs) for graphs, measured in ((True, 5.34), (False, 5.37))],
    peak(LLAMA3, "qlora", 153977, 28.22, compiled=False, embeddings_on_cpu=True, qlora_dequant_once=False, **LONG),
    peak(QWEN_1_5B, "full", 2048, 90.9, bs=16, ckpt=False, cuda_graphs=True),
    # round 18 (H200, Unsloth's settings, max_norm = 0): each update made inside backward, its gradient then freed
    *[peak(LLAMA, "qlora", 2048, measured, optimizer="adamw_8bit", lora_dropout=0.0, qlora_dequant_once=False,
           embeddings_on_cpu=True, cuda_graphs=graphs, max_norm=0.0)
      for graphs, measured in ((True, 5.29), (False, 5.28))],
    *[peak(model, "qlora", 8192, measured, lora_r=rank, optimizer="adamw_8bit", lora_dropout=0.0,
           qlora_dequant_once=False, max_norm=0.0, **DEFAULTS)
      for model, rank, measured in ((LLAMA3, 32, 7.13), (I2_7B, 64, 7.34))],
    # round 27 (H200, the same settings): the checkpoint inside the compiled layer keeps the attention block
    # (attention's output and the q, k, v, o projections), parked beside the input
    *[peak(model, "qlora", n, measured, lora_r=rank, optimizer="adamw_8bit", lora_dropout=0.0,
           qlora_dequant_once=False, max_norm=0.0, **DEFAULTS)
      for model, rank, n, measured in ((LLAMA3, 32, 8192, 7.09), (LLAMA3, 32, 16384, 9.32), (LLAMA3, 32, 32768, 13.76),
                                       (I2_7B, 64, 8192, 7.29))],
    # rounds 7 and 8: the longest context that fit under 8-40 GB caps
    *[peak(LLAMA3, "qlora", n, measured, compiled=False, embeddings_on_cpu=True, **LONG)
      for n, measured in ((2972, 6.25), (5974, 6.98), (21848, 8.98), (33226, 10.61), (40724, 11.82),
                          (53856, 13.93), (78475, 17.91), (177074, 31.76))],
]


def _error(cfg, measured: float) -> float:
    return abs(estimate_memory(cfg).total / GIB - measured) / measured


@pytest.mark.parametrize("cfg, measured", HELD_OUT)
def test_estimate_is_within_ten_percent_of_peaks_it_was_not_fitted_to(cfg, measured):
    assert _error(cfg, measured) < 0.10


@pytest.mark.parametrize("cfg, measured", FITTED)
def test_estimate_still_matches_the_peaks_it_was_fitted_to(cfg, measured):
    assert _error(cfg, measured) < 0.10


def test_a_factor_refit_on_the_fitted_peaks_alone_still_predicts_the_held_out_ones(monkeypatch):
    """The factor every default-path row depends on (activations of a layer compiled with its checkpoint inside) is
    fitted again, on the compiled LoRA / QLoRA peaks of the fitted set only (the value with the smallest largest
    relative error on a grid), and the estimate with it must still predict every held-out peak within 10%: what
    carries the estimate to new runs is its form, not constants tuned on the rows it is checked against."""
    from tunelab.model import memory

    def worst(rows):
        return max(_error(*row.values) for row in rows)

    compiled = [row for row in FITTED if row.values[0].use_compile and row.values[0].method != "full"]
    assert len(compiled) >= 10
    fits = []
    for factor in [x / 20 for x in range(10, 31)]:
        monkeypatch.setitem(memory.COMPILED_ACT_FACTOR, "inside", factor)
        fits.append((worst(compiled), factor))
    fit_error, factor = min(fits)
    monkeypatch.setitem(memory.COMPILED_ACT_FACTOR, "inside", factor)
    assert fit_error < 0.05, factor
    assert worst(HELD_OUT) < 0.10, factor


def test_accumulation_keeps_the_whole_gradients_at_the_peak():
    def total(method, acc, **kw):
        return estimate_memory(TrainConfig(pretrained_model_name_or_path=LLAMA, method=method, max_length=2048,
                                           accumulative_counts=acc, **kw)).total

    full_grads = model_shape(LLAMA).total_params() * 4  # fp32 master weights, fp32 gradients
    assert total("full", 4) - total("full", 1) > 0.9 * full_grads
    assert total("full", 4) == total("full", 2)  # later micro-batches add into the same gradients
    from tunelab.model.lora_params import lora_params

    adapter_grads = lora_params(model_shape(LLAMA), TrainConfig(pretrained_model_name_or_path=LLAMA)) * 4
    assert 0 < total("qlora", 2) - total("qlora", 1) <= adapter_grads  # r=64 all-linear: 0.6 GiB


def test_embeddings_on_cpu_free_the_input_embedding_unless_tied_or_trained():
    def total(model, **kw):
        return estimate_memory(TrainConfig(pretrained_model_name_or_path=model, method="qlora", **kw)).total

    assert total(I2_7B, embeddings_on_cpu=False) - total(I2_7B) == 92544 * 4096 * 2  # 0.71 GiB, None means on
    qwen = "Qwen/Qwen2.5-1.5B-Instruct"  # tied to lm_head: stays
    assert total(qwen, embeddings_on_cpu=False) == total(qwen, embeddings_on_cpu=True)
    full = dict(pretrained_model_name_or_path=I2_7B, method="full")
    assert estimate_memory(TrainConfig(**full, embeddings_on_cpu=True)).total == estimate_memory(TrainConfig(**full)).total


def test_a_reward_model_is_planned_without_the_lm_head_and_its_logits():
    """A reward model (AutoModelForSequenceClassification) has a one-score head where the language model has
    lm_head, and computes no vocabulary-wide logits: the plan counts neither."""
    for method in ("qlora", "full"):
        sft = estimate_memory(TrainConfig(pretrained_model_name_or_path=LLAMA, method=method, max_length=2048))
        reward = estimate_memory(TrainConfig(pretrained_model_name_or_path=LLAMA, method=method, max_length=2048,
                                             objective="reward"))
        assert not any("logits" in name for name in reward.parts), reward.parts
        lm_head = 32000 * 4096
        weights = {"qlora": 2, "full": 4 + 2}[method]  # bf16 (QLoRA's frozen rest); full: fp32 master + bf16 copy
        assert sft.parts["frozen/base weights"] + sft.parts.get("bf16 weight copies (autocast)", 0) - (
            reward.parts["frozen/base weights"] + reward.parts.get("bf16 weight copies (autocast)", 0)) == (
            (lm_head - 4096) * weights)
    # nor lm_head's gradient, the first to arrive in backward (full, neither checkpointed nor chunked nor accumulated)
    eager = dict(pretrained_model_name_or_path=LLAMA, method="full", max_length=2048, gradient_checkpointing=False,
                 fast_path=False, accumulative_counts=1)
    assert estimate_memory(TrainConfig(**eager)).parts["gradients at the peak"] == lm_head * 2
    assert estimate_memory(TrainConfig(**eager, objective="reward")).parts["gradients at the peak"] == 0


def test_report_lists_parts_and_suggests_fixes_when_it_does_not_fit(monkeypatch):
    import types

    import torch

    card = types.SimpleNamespace(total_memory=8 * GIB, name="a pretend 8 GiB GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    cfg = TrainConfig(pretrained_model_name_or_path=LLAMA, method="lora", max_length=8192, offload_activations=False)
    est = estimate_memory(cfg, torch.device("cuda"))
    assert est.fits is False
    tips = " ".join(est.suggestions)
    assert "qlora" in tips and "max_length" in tips
    assert "offload_activations = True" in tips and "mlp_chunk_size" not in tips  # 8k: nothing to slice
    assert "cuda_graphs = False" in tips  # packed rows, one process: the plan replays graphs
    text = plan_report(cfg)
    assert "peak allocated" in text and "frozen/base weights" in text
    long = estimate_memory(TrainConfig(pretrained_model_name_or_path=LLAMA3, method="qlora", max_length=65536),
                           torch.device("cuda"))
    tips = " ".join(long.suggestions)  # offloaded by default at 64k; MLP slices of 32k
    assert "mlp_chunk_size = 8192" in tips and "offload_activations" not in tips
    assert "cuda_graphs" not in tips  # offloading already runs the layers without graphs


def test_long_context_levers_lower_the_estimate_by_what_they_free():
    llama3 = "meta-llama/Llama-3.1-8B-Instruct"
    base = dict(pretrained_model_name_or_path=llama3, method="qlora", lora_r=32, max_length=65536, use_compile=False)
    plain = estimate_memory(TrainConfig(**base, mlp_chunk_size=None, offload_activations=False)).total
    offloaded = estimate_memory(TrainConfig(**base, mlp_chunk_size=None, offload_activations=True)).total
    # 31 of 32 layer inputs (65536 tokens x 4096 x 2 bytes each, copied synchronously above PINNED_MAX_BYTES)
    # leave the GPU; at 16k, copied beside the compute, 30 (one more is on the GPU while a copy runs).
    assert plain - offloaded == 31 * 65536 * 4096 * 2
    at_16k = dict(base, max_length=16384)
    assert (estimate_memory(TrainConfig(**at_16k, mlp_chunk_size=None, offload_activations=False)).total
            - estimate_memory(TrainConfig(**at_16k, mlp_chunk_size=None, offload_activations=True)).total
            == 30 * 16384 * 4096 * 2)
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
    assert "CPU memory (offloaded)" in plan_report(cfg) and "(offload_activations)" in plan_report(cfg)
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


def test_plan_on_a_config_without_llama_fields_names_the_missing_key(tmp_path):
    from tunelab.model.shapes import model_shape

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "num_layers": 2, "hidden_size": 8,
                                                      "padded_vocab_size": 10, "ffn_hidden_size": 16}))
    with pytest.raises(TunelabError, match=r"config\.json: no 'num_attention_heads', so `plan` cannot tell"):
        model_shape(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(TunelabError, match=r"config\.json: not valid JSON"):
        model_shape(str(tmp_path))


# --- several GPUs: each row split over them, states sharded over them --------------------------------------------

def test_sequence_parallel_divides_what_grows_with_the_row_and_adds_its_buffers():
    base = dict(pretrained_model_name_or_path=LLAMA3, method="lora", max_length=65536, mlp_chunk_size=None,
                offload_activations=False,  # (None would offload in one process, not on four)
                use_compile=False)  # (compiled, the checkpoint goes around the layer under sequence parallelism)
    one = estimate_memory(TrainConfig(**base))
    four = estimate_memory(TrainConfig(**base, sequence_parallel_size=4))
    assert (one.world_size, four.world_size) == (1, 4)
    # the checkpoints, the layer at work and the loss hold a quarter of the tokens; weights, adapters and
    # optimizer states stay whole on every GPU (DDP)
    assert four.parts["activations (checkpointed)"] == pytest.approx(one.parts["activations (checkpointed)"] / 4,
                                                                     rel=1e-6)
    for name in ("frozen/base weights", "LoRA params (fp32)", "AdamW states"):
        assert four.parts[name] == one.parts[name], name
    # q, k, v and the output of one layer (32 + 8 + 8 + 32 heads of 128), sent and received, for 16k tokens
    assert "all-to-all buffers" not in one.parts
    assert four.parts["all-to-all buffers"] == 2 * 16384 * (32 + 8 + 8 + 32) * 128 * 2
    assert four.total < one.total


def test_zero_and_fsdp_divide_states_over_the_processes():
    full = dict(pretrained_model_name_or_path=LLAMA3, method="full", max_length=4096)
    ddp = estimate_memory(TrainConfig(**full), world_size=8)
    assert ddp.parts == estimate_memory(TrainConfig(**full)).parts  # every GPU holds everything
    zero1 = estimate_memory(TrainConfig(**full, deepspeed="zero1"), world_size=8).parts
    zero2 = estimate_memory(TrainConfig(**full, deepspeed="zero2"), world_size=8).parts
    zero3 = estimate_memory(TrainConfig(**full, deepspeed="zero3"), world_size=8).parts
    fsdp = estimate_memory(TrainConfig(**full, fsdp=True), world_size=8).parts
    grads = "gradients (kept across micro-batches)"
    assert zero1["AdamW states"] == ddp.parts["AdamW states"] // 8 and zero1[grads] == ddp.parts[grads]
    assert zero2[grads] == ddp.parts[grads] // 8 and zero2["frozen/base weights"] == ddp.parts["frozen/base weights"]
    assert zero3["frozen/base weights"] == ddp.parts["frozen/base weights"] // 8 and zero3["gathered weights"] > 0
    assert fsdp == zero3


def test_plan_names_the_fewest_gpus_a_long_row_must_be_split_over(tmp_path, capsys):
    from tunelab.cli.main import main
    from tunelab.model.fit import smallest_sequence_parallel

    cfg = TrainConfig(pretrained_model_name_or_path=LLAMA3, method="qlora", lora_r=32, max_length=262144)
    card = 24 * GIB
    size = smallest_sequence_parallel(cfg, card)
    assert size is not None and size > 1
    at = {n: estimate_memory(TrainConfig(**{**cfg.__dict__, "sequence_parallel_size": n}), card_bytes=card).fits
          for n in (size // 2, size)}
    assert at == {size // 2: False, size: True}  # the fewest: half as many does not fit
    assert smallest_sequence_parallel(TrainConfig(**{**cfg.__dict__, "max_length": 8192}), card) == 1
    sizes = [smallest_sequence_parallel(TrainConfig(**{**cfg.__dict__, "max_length": n}), card)
             for n in (32768, 131072, 262144, 1048576)]
    assert sizes == sorted(sizes)  # a longer row never needs fewer

    config = tmp_path / "long.py"
    config.write_text(f"pretrained_model_name_or_path = {LLAMA3!r}\nmethod = 'qlora'\nlora_r = 32\n"
                      "max_length = 262144\n")
    assert main(["plan", str(config), "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and f"sequence_parallel_size = {size} at least (each row over {size} GPUs)" in out
    assert main(["plan", str(config), "--gpus", "8", "--cfg-options", "sequence_parallel_size=4", "method='full'",
                 "deepspeed='zero3'"]) == 0
    out = capsys.readouterr().out
    assert "per GPU, on 8 GPUs (zero3, each row over 4 (sequence parallel))" in out and "gathered weights" in out
    assert main(["plan", str(config), "--gpus", "6", "--cfg-options", "sequence_parallel_size=4"]) == 2
    assert "--gpus 6: give a positive multiple of sequence_parallel_size (4)" in capsys.readouterr().err
    with pytest.raises(TunelabError, match="32 attention heads"):
        estimate_memory(TrainConfig(**{**cfg.__dict__, "sequence_parallel_size": 3}))


def test_bf16_adapters_halve_the_adapter_memory_in_the_plan():
    """fp32_master_weights = False keeps LoRA adapters, their gradients and AdamW states in bf16 (choose_precision):
    the plan counts 2 + 2 + 4 bytes an adapter parameter instead of 4 + 4 + 8."""
    common = dict(pretrained_model_name_or_path=LLAMA, method="qlora", max_length=2048, accumulative_counts=8)
    fp32 = estimate_memory(TrainConfig(**common)).parts
    bf16 = estimate_memory(TrainConfig(**common, fp32_master_weights=False)).parts
    assert bf16["LoRA params (bf16)"] * 2 == fp32["LoRA params (fp32)"]
    grads = "LoRA gradients (kept across micro-batches)"
    assert bf16[grads] * 2 == fp32[grads]
    assert bf16["AdamW states"] * 2 == fp32["AdamW states"]
    assert 1.1 * GIB < sum(fp32.values()) - sum(bf16.values()) < 1.3 * GIB  # Llama-2-7B r=64: 160M adapter weights


def test_offloaded_long_rows_keep_the_checkpoint_inside_where_the_card_holds_it_and_around_where_only_that_fits(
        monkeypatch):
    """Llama-3.1-8B QLoRA r32 at 32k (round 27: 14.7 GiB reserved inside, 13.7 without the projections kept, 12.7
    around): an 80 GB card runs the fastest arrangement (inside, attention's output and the projections kept), a 16 GB
    one the checkpoint around the compiled layer, which `tunelab plan` reports as fitting; a card too small for
    either keeps the plan (and its suggestions)."""
    from tunelab.model import fit
    from tunelab.model.fit import fit_plan_to_card

    monkeypatch.setattr(fit, "available_cpu_memory", lambda: 256 * GIB)
    cfg = TrainConfig(pretrained_model_name_or_path=LLAMA3, method="qlora", max_length=32768, lora_r=32,
                      lora_dropout=0.0, optimizer="adamw_8bit", max_norm=0.0)
    big = fit_plan_to_card(cfg, card_bytes=80 * GIB)
    assert big.checkpoint_inside_compile and big.keeps_attention and big.keeps_projections
    small = fit_plan_to_card(cfg, card_bytes=16 * 10**9)
    assert small.checkpoint_around and not small.checkpoint_inside_compile and not small.save_attention
    assert estimate_memory(cfg, plan=big, card_bytes=16 * 10**9).fits is False
    assert estimate_memory(cfg, plan=small, card_bytes=16 * 10**9).fits
    assert "-> fits" in plan_report(cfg, card_bytes=16 * 10**9)
    tiny_card = fit_plan_to_card(cfg, card_bytes=8 * 10**9)
    assert tiny_card.checkpoint_inside_compile  # neither fits: nothing gained by switching


def test_the_projections_are_kept_only_where_the_cpu_memory_holds_them(monkeypatch):
    """The kept q, k, v, o projections wait in CPU memory (Llama-3.1-8B at 32k: 20 GiB a step beside the inputs'
    and attention's 16): on a host with less memory available the plan recomputes them and keeps the rest, which
    that host holds, instead of stopping the run; with no room for even that, the plan stays and the training
    loop's check names what to change."""
    from tunelab.model import fit

    cfg = TrainConfig(pretrained_model_name_or_path=LLAMA3, method="qlora", max_length=32768, lora_r=32,
                      lora_dropout=0.0, optimizer="adamw_8bit", max_norm=0.0)
    plan = fit.plan_fast_path(cfg, "cuda")
    with_projections = estimate_memory(cfg, plan=plan).cpu_offload_bytes
    without = estimate_memory(cfg, plan=dataclasses.replace(plan, save_projections=False)).cpu_offload_bytes
    assert with_projections - without == 32 * 32768 * (4096 + 2 * 1024 + 4096) * 2
    for free, kept in ((256 * GIB, True), (int(with_projections / 0.85), True), (int(with_projections / 0.95), False),
                       (32 * GIB, False)):
        monkeypatch.setattr(fit, "available_cpu_memory", lambda: free)
        fitted = fit.fit_plan_to_card(cfg, card_bytes=80 * GIB)
        assert fitted.keeps_attention and fitted.keeps_projections == kept, free / GIB


def test_vision_tower_shape_fills_defaults_and_names_a_folder_that_is_not_a_tower(tmp_path, tiny_llama_dir):
    """A tower's config.json may leave out what equals its class's defaults (SigLIP base: patch_size 16, image_size
    224, 12 layers); a language model given as the tower has no patches, and is named as what it is."""
    from tunelab.model.shapes import vision_shape

    (tmp_path / "siglip").mkdir()
    (tmp_path / "siglip" / "config.json").write_text(json.dumps(
        {"model_type": "siglip", "text_config": {}, "vision_config": {"hidden_size": 768}}))
    shape = vision_shape(str(tmp_path / "siglip"))
    assert (shape["patch_size"], shape["image_size"], shape["num_hidden_layers"]) == (16, 224, 12)
    with pytest.raises(TunelabError, match=r"visual_encoder_name_or_path = .* is a 'llama' model; "
                                           r"the vision tower must be a CLIP or SigLIP model"):
        vision_shape(str(tiny_llama_dir))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(TunelabError, match=r"broken'?: no model config found there .*not a valid JSON"):
        vision_shape(str(tmp_path / "broken"))


# --- DoRA: what peft's forward adds, measured on the CPU ----------------------------------------------------------------

def _dora_and_lora_peaks(model_dir, **settings) -> tuple[int, int]:
    """(measured, planned) bytes that DoRA adds to LoRA's peak over one forward and backward at these settings: the
    most bytes of tensors alive at once (tests/peak_bytes.py) on the CPU under bf16 autocast, as a GPU run computes,
    eagerly; and the estimate's difference for the same plan."""
    import torch

    from tests.peak_bytes import PeakBytes
    from tests.train_helpers import tiny_cfg
    from tunelab.model.load import load_model_for_training
    from tunelab.model.loss import causal_lm_objective
    from tunelab.model.plan import plan_fast_path

    peaks, plans = {}, {}
    for dora in (False, True):
        cfg = tiny_cfg(model_dir, dtype="bf16", batch_size=1, use_dora=dora, **settings)
        plan = plan_fast_path(cfg, "cpu")
        model, _ = load_model_for_training(cfg, torch.device("cpu"), plan)
        model.train()
        tokens = cfg.max_length
        ids = torch.randint(3, 500, (1, tokens), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(tokens)[None]}
        objective = causal_lm_objective(plan)
        for _ in range(2):  # the second step, its gradients there before it (as the estimate's peak)
            model.zero_grad(set_to_none=False)
            with PeakBytes() as measured:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, _ = objective(model, batch)
                loss.backward()
        peaks[dora], plans[dora] = measured.peak, estimate_memory(cfg, plan=plan).total
    return peaks[True] - peaks[False], plans[True] - plans[False]


@pytest.mark.parametrize("shape,settings", [
    # the config DORA_BYTES_PER_OUTPUT was read off (with 256 and 768 tokens, and without checkpointing)
    ("mid", dict(method="lora", lora_dropout=0.1, max_length=512)),
    # held out: another shape (grouped KV heads), a 4-bit base, a few targets, no checkpointing
    ("held", dict(method="qlora", lora_dropout=0.0, max_length=384)),
    ("held", dict(method="lora", lora_dropout=0.1, max_length=512, gradient_checkpointing=False,
                  lora_target_modules=["q_proj", "v_proj", "down_proj"])),
])
def test_the_plan_counts_what_doras_forward_adds_to_the_peak(tmp_path_factory, shape, settings):
    """peft's DoRA forward keeps the base and adapter results a token and, with dropout, a bf16 copy of each adapted
    weight, and takes the weight norm over the whole weight (an identity matrix of the input width through the
    adapter): the plan's DoRA-minus-LoRA difference is within 25% of the measured one (measured while fitting: -12%
    to +16% over these shapes with all linears adapted, up to +33% with three of them and checkpointing, where the
    weight norm's moment is not the step's peak)."""
    pytest.importorskip("bitsandbytes")
    from tunelab.model.tiny import make_model

    sizes = {"mid": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=688),
             "held": dict(hidden_size=384, num_layers=3, num_heads=6, num_kv_heads=2, intermediate_size=1024)}
    model_dir = make_model(tmp_path_factory.mktemp(f"dora_{shape}"), "llama", **sizes[shape])
    measured, planned = _dora_and_lora_peaks(model_dir, **settings)
    assert measured > 4 * 2**20  # DoRA adds megabytes here: a difference worth planning
    assert planned == pytest.approx(measured, rel=0.25), (planned / 2**20, measured / 2**20)
