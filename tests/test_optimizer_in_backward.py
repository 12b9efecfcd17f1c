"""`optimizer_in_backward`: each parameter updated as soon as backward has its gradient, which is then freed.

A user relies on three things: the run trains exactly as with the step after backward (same losses, same weights,
same logged gradient norm, same resume), the gradients of the whole model never exist at once (that is the memory it
saves), and it is on only where it changes no number, with a clear error where asked for and impossible.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoTokenizer

from tests.train_helpers import capture_model, tiny_cfg, varied_rows
from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError
from tunelab.model.memory import estimate_memory
from tunelab.model.plan import plan_fast_path
from tunelab.train import layout
from tunelab.train.loop import train
from tunelab.train.optim import StepsInBackward
from tunelab.train.strategy import SingleProcess


@pytest.fixture(scope="module")
def rows(tiny_llama_dir):
    return varied_rows(AutoTokenizer.from_pretrained(tiny_llama_dir), 11)


def _cfg(model_dir, **overrides):
    settings = dict(method="lora", lora_dropout=0.1, max_norm=0.0, accumulative_counts=1, max_epochs=2, lr=1e-2,
                    warmup_ratio=0.2, lr_scheduler="cosine", weight_decay=0.01, optimizer_in_backward=True)
    return tiny_cfg(model_dir, **{**settings, **overrides})


def _count_updates_in_backward(monkeypatch) -> dict:
    """`counts["in_backward"]`: the layer updates StepsInBackward made before the loop's step(), i.e. inside backward.
    Equal runs prove nothing alone: a loop that ignored the plan would run the ordinary step both times."""
    counts = {"in_backward": 0, "pending": 0}
    step_bucket, step = StepsInBackward._step_bucket, StepsInBackward.step

    def counting_step_bucket(self, params):
        counts["pending"] += 1
        step_bucket(self, params)

    def counting_step(self):
        counts["in_backward"] += counts["pending"]
        step(self)
        counts["pending"] = 0  # those step() itself made (a layer still waiting) were not in backward

    monkeypatch.setattr(StepsInBackward, "_step_bucket", counting_step_bucket)
    monkeypatch.setattr(StepsInBackward, "step", counting_step)
    return counts


def _run(cfg, work_dir, rows, monkeypatch, **kwargs):
    captured = capture_model(monkeypatch)
    counts = _count_updates_in_backward(monkeypatch)
    result = train(cfg, work_dir, train_rows=rows, device="cpu", **kwargs)
    log = [r for r in map(json.loads, (work_dir / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    trained = {n: p.detach().clone() for n, p in captured["model"].named_parameters() if p.requires_grad}
    return result, log, trained, counts["in_backward"]


@pytest.mark.parametrize("method, optimizer", [("lora", "adamw"), ("full", "adamw"), ("lora", "adamw_8bit")])
def test_updates_in_backward_train_exactly_as_the_step_after_it(method, optimizer, tiny_llama_dir, rows, tmp_path,
                                                                monkeypatch, capsys):
    if optimizer == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    # None: on with 8-bit AdamW, since nothing needs all gradients first; torch's AdamW only when asked
    cfg = _cfg(tiny_llama_dir, method=method, optimizer=optimizer, lr=1e-2 if method == "lora" else 3e-3,
               optimizer_in_backward=None if optimizer == "adamw_8bit" else True)
    assert plan_fast_path(cfg, "cpu").optimizer_in_backward
    after, after_log, after_weights, after_updates = _run(dataclasses.replace(cfg, optimizer_in_backward=False),
                                                          tmp_path / "after", rows, monkeypatch)
    inside, inside_log, inside_weights, inside_updates = _run(cfg, tmp_path / "inside", rows, monkeypatch)
    said = "optimizer_in_backward: each layer's parameters are updated"
    assert capsys.readouterr().out.count(said) == 1  # the run says so
    assert after_updates == 0 and inside_updates > 0  # and does so: the layers were updated inside backward
    assert inside.losses == after.losses  # bit for bit
    assert inside.losses[max(inside.losses)] < inside.losses[1]  # and it did learn
    for name, weight in after_weights.items():
        torch.testing.assert_close(inside_weights[name], weight, rtol=0, atol=0, msg=name)
    # the logged gradient norm is the whole model's, as clip_grad_norm_ measures it after backward
    assert [r["grad_norm"] for r in inside_log] == pytest.approx([r["grad_norm"] for r in after_log], rel=1e-5)
    assert all(r["grad_norm"] > 0 for r in inside_log)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_no_two_layers_hold_gradients_at_once(optimizer, tiny_llama_dir):
    """What it saves: a layer's gradients are freed after its update, before backward computes the next layer's.
    Both optimisers update a layer's parameters together, after its last gradient (one launch for their norms)."""
    if optimizer == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    from tunelab.model.load import load_model_for_training
    from tunelab.train.optim import build_optimizer

    cfg = _cfg(tiny_llama_dir, method="full", optimizer=optimizer)
    model, _ = load_model_for_training(cfg, torch.device("cpu"), plan_fast_path(cfg, "cpu"))
    steps = StepsInBackward(build_optimizer(model, cfg, torch.device("cpu")), model)
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    holding, updated, original = [], [], steps._step_bucket

    def recording(params):
        holding.append({names[p] for p in names if p.grad is not None})
        updated.extend(names[p] for p in params)
        original(params)

    steps._step_bucket = recording
    before = {p: p.detach().clone() for p in names}
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    model(input_ids=ids, labels=ids).loss.backward()
    steps.step()
    assert sorted(updated) == sorted(names.values())  # every parameter updated once
    for held in holding:  # what had a gradient at each update: one layer's parameters
        layers = {n.split(".layers.")[1].split(".")[0] if ".layers." in n else n for n in held}
        assert len(layers) == 1, held
    by_layer = [h for h in holding if any(".layers.1." in n for n in h)]  # a layer's parameters in one update
    assert len(by_layer) == 1 and len(by_layer[0]) == sum(".layers.1." in n for n in names.values())
    assert all(p.grad is None for p in names)
    assert all(not torch.equal(p, before[p]) for p in names)
    assert float(steps.grad_norm()) > 0


def test_a_parameter_without_a_gradient_leaves_its_layer_to_the_step_after_backward(tiny_llama_dir):
    """A layer whose parameters did not all get a gradient (like an expert no token chose) is updated when the loop
    calls step(), as optimizer.step() would: the parameters that have a gradient, nothing else."""
    from tunelab.model.load import load_model_for_training
    from tunelab.train.optim import build_optimizer

    cfg = _cfg(tiny_llama_dir, method="full", optimizer="adamw")
    results = []
    for inside in (False, True):
        torch.manual_seed(0)
        model, _ = load_model_for_training(cfg, torch.device("cpu"), plan_fast_path(cfg, "cpu"))
        model.model.layers[0].register_parameter("unused", torch.nn.Parameter(torch.ones(3)))  # no gradient, ever
        optimizer = build_optimizer(model, cfg, torch.device("cpu"))
        stepper = StepsInBackward(optimizer, model) if inside else optimizer
        for _ in range(2):
            ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
            model(input_ids=ids, labels=ids).loss.backward()
            if inside:  # layer 0 still waits for its unused parameter; layer 1 is done
                assert model.model.layers[0].mlp.up_proj.weight.grad is not None
                assert model.model.layers[1].mlp.up_proj.weight.grad is None
            stepper.step()
            stepper.zero_grad(set_to_none=True)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    after, inside = results
    for name, weight in after.items():
        torch.testing.assert_close(inside[name], weight, rtol=0, atol=0, msg=name)
    assert torch.equal(inside["model.layers.0.unused"], torch.ones(3))
    assert all(p.grad is None for p in model.parameters())


def test_a_layer_is_updated_together_and_each_expert_apart():
    """torch's AdamW waits for a group's last gradient: a decoder layer's parameters form one group, but an MoE
    expert (which a step may route no token to) forms its own, so an idle expert never holds its layer back."""
    from tunelab.train.optim import layer_buckets

    def block():
        layer = torch.nn.Module()
        layer.attn = torch.nn.Linear(2, 2)
        layer.experts = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))
        return layer

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(4, 2)
    model.layers = torch.nn.ModuleList(block() for _ in range(2))
    model.embed.weight.requires_grad_(False)
    names = {p: n for n, p in model.named_parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = sorted(sorted(names[p] for p in group) for group in layer_buckets(model, trained))
    assert groups == sorted(
        [[f"layers.{i}.attn.bias", f"layers.{i}.attn.weight"] for i in range(2)]
        + [[f"layers.{i}.experts.{e}.bias", f"layers.{i}.experts.{e}.weight"] for i in range(2) for e in range(2)])


def test_resume_continues_the_loss_curve(tiny_llama_dir, rows, tmp_path, monkeypatch):
    """The optimiser's state is saved and loaded as ever: a run stopped after a checkpoint and resumed reproduces the
    uninterrupted one."""
    cfg = _cfg(tiny_llama_dir, save_steps=4, save_total_limit=-1)
    counts = _count_updates_in_backward(monkeypatch)
    whole = train(cfg, tmp_path / "whole", train_rows=rows, device="cpu")
    assert counts["in_backward"] > 0  # the curve is that of updates in backward, not of the ordinary step
    calls = {"n": 0}
    original = SingleProcess.forward_loss

    class Crash(Exception):
        pass

    def crash_on_step_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise Crash
        return original(*args, **kwargs)

    monkeypatch.setattr(SingleProcess, "forward_loss", crash_on_step_6)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "cut", train_rows=rows, device="cpu")
    monkeypatch.undo()
    assert layout.last_checkpoint(tmp_path / "cut") == tmp_path / "cut" / "iter_4"
    counts = _count_updates_in_backward(monkeypatch)
    resumed = train(cfg, tmp_path / "cut", resume="auto", train_rows=rows, device="cpu")
    assert counts["in_backward"] > 0  # the resumed run updates in backward too
    assert sorted(resumed.losses) == list(range(5, max(whole.losses) + 1))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(whole.losses[step], abs=1e-6), step


def test_on_by_itself_wherever_nothing_needs_every_gradient_first():
    base = dict(method="qlora", max_norm=0.0, accumulative_counts=1, dtype="bf16", optimizer="adamw_8bit")
    assert plan_fast_path(TrainConfig(**base), "cuda").optimizer_in_backward
    # torch's AdamW steps a layer at a time, one fused launch each (as fast as all at once: round 19)
    assert plan_fast_path(TrainConfig(**{**base, "optimizer": "adamw"}), "cuda").optimizer_in_backward
    assert plan_fast_path(TrainConfig(**{**base, "optimizer": "adamw"}), "cpu").optimizer_in_backward
    for blocker in (dict(max_norm=1.0), dict(accumulative_counts=4), dict(optimizer="paged_adamw_8bit"),
                    dict(nonfinite="skip"), dict(dtype="fp16"), dict(deepspeed="zero2")):
        assert not plan_fast_path(TrainConfig(**{**base, **blocker}), "cuda").optimizer_in_backward, blocker
        assert not plan_fast_path(TrainConfig(**base), "cuda", world_size=2).optimizer_in_backward
    assert not plan_fast_path(TrainConfig(**base, optimizer_in_backward=False), "cuda").optimizer_in_backward
    assert not plan_fast_path(TrainConfig(**base, fast_path=False), "cuda").optimizer_in_backward  # plain path
    assert not plan_fast_path(TrainConfig(method="qlora"), "cuda").optimizer_in_backward  # defaults clip


def test_asked_for_where_it_cannot_run_names_the_settings_in_the_way():
    cfg = TrainConfig(method="lora", optimizer_in_backward=True, accumulative_counts=8)
    with pytest.raises(TunelabError) as err:
        plan_fast_path(cfg, "cpu")
    assert "max_norm = 1" in str(err.value) and "accumulative_counts = 8" in str(err.value)


def test_memory_plan_counts_a_layers_gradients_and_suggests_it():
    """Full fine-tuning with checkpointing peaks late in backward, when every gradient is there: in backward the
    updates free them as they come. (LoRA's peak is mostly early in backward, with the saved layer inputs.)"""
    cfg = TrainConfig(pretrained_model_name_or_path="Qwen/Qwen2.5-1.5B-Instruct", method="full", max_length=2048,
                      accumulative_counts=1, dtype="bf16", gradient_checkpointing=True, optimizer="adamw_8bit")
    clipped = estimate_memory(cfg, card_bytes=4 * 2**30)
    inside = estimate_memory(dataclasses.replace(cfg, max_norm=0.0), card_bytes=4 * 2**30)
    assert clipped.parts["gradients at the peak"] > 2**30
    assert inside.parts["gradients (a layer's at a time: optimizer_in_backward) at the peak"] == 0
    assert clipped.total - inside.total == clipped.parts["gradients at the peak"]
    assert any(s.startswith("max_norm = 0  (") for s in clipped.suggestions)  # (the card is too small for either)
    assert not any(s.startswith("max_norm = 0") for s in inside.suggestions)
    with_adamw = estimate_memory(dataclasses.replace(cfg, optimizer="adamw"), card_bytes=4 * 2**30)
    assert any(s.startswith("max_norm = 0  (") for s in with_adamw.suggestions)
