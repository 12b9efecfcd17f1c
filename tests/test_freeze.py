"""Partial ("freeze") fine-tuning, method = 'full' with trainable_layers / trainable_modules / trainable_extra_modules
(LLaMA-Factory's finetuning_type: freeze): only the chosen weights change and the rest stays bit-identical, the loss
falls, the frozen weights get no gradient, no optimiser state and no fp32 copy, the plan counts what training trains,
names that match nothing stop before any weight is read, a resume with another choice is refused, and the checkpoint
converts and chats as a full fine-tuning's does, also from two processes."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.train_helpers import (assert_one_line_error, capture_model, identity_rows, tiny_cfg, train_on_ranks,
                                 write_config)
from tunelab.cli.main import main
from tunelab.errors import TunelabError
from tunelab.train.loop import train


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _base_weights(model_dir) -> dict[str, torch.Tensor]:
    weights = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def _changed(before: dict, after: dict) -> set[str]:
    return {name for name, weight in before.items() if not torch.equal(weight, after[name].to(weight.dtype))}


# tiny llama: 2 decoder layers; what each choice trains, by parameter name
CHOICES = {
    "the last layer": ({"trainable_layers": 1}, lambda n: n.startswith("model.layers.1.")),
    "the first layer's MLP and lm_head": ({"trainable_layers": -1, "trainable_modules": ["mlp"],
                                          "trainable_extra_modules": ["lm_head"]},
                                         lambda n: n.startswith("model.layers.0.mlp.") or n.startswith("lm_head.")),
    "q_proj of every layer and the final norm": ({"trainable_modules": ["q_proj"],
                                                  "trainable_extra_modules": ["norm"], "lr": 3e-2},
                                                 lambda n: ".q_proj." in n or n == "model.norm.weight"),
}


@pytest.mark.parametrize("choice", list(CHOICES))
def test_only_the_chosen_weights_change_and_the_frozen_ones_stay_bit_identical(choice, tiny_llama_dir, tokenizer,
                                                                              tmp_path, monkeypatch):
    settings, trains = CHOICES[choice]
    captured = capture_model(monkeypatch)
    before = _base_weights(tiny_llama_dir)
    cfg = tiny_cfg(tiny_llama_dir, max_steps=12, batch_size=4, **settings)
    result = train(cfg, tmp_path, train_rows=identity_rows(tokenizer), device="cpu")

    assert result.losses[12] < 0.99 * result.losses[1], result.losses
    model = captured["model"]
    chosen = {name for name in before if trains(name)}
    assert chosen and chosen != set(before)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == chosen
    assert _changed(before, model.state_dict()) == chosen  # every chosen weight moved, nothing else did
    # the checkpoint is the whole model, its frozen weights the base's to the bit
    saved = load_file(tmp_path / "iter_12" / "model" / "model.safetensors")
    assert _changed(before, saved) == chosen


def test_frozen_weights_get_no_gradient_no_optimiser_state_and_no_fp32_copy(tiny_llama_dir):
    """On a GPU the model loads in bf16 and `choose_precision` makes fp32 master weights of the trained weights
    only; the optimiser holds the trained ones alone (its states are what the plan counts)."""
    from tunelab.model.load import load_model_for_training
    from tunelab.train.optim import build_optimizer, choose_precision

    cfg = tiny_cfg(tiny_llama_dir, trainable_layers=1, dtype="bf16")
    model, _ = load_model_for_training(cfg, torch.device("cpu"))
    model.to(torch.bfloat16)  # as it loads on a GPU (compute dtype); choose_precision only casts
    choose_precision(model, torch.bfloat16, torch.device("cuda"), fp32_master_weights=True)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {dtypes[n] for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    assert {dtypes[n] for n, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}


PLANNED = {
    "llama, the last layer": ("llama", {"trainable_layers": 1}),
    "llama, the first layer's attention and lm_head": ("llama", {"trainable_layers": -1,
                                                                "trainable_modules": ["self_attn"],
                                                                "trainable_extra_modules": ["lm_head"]}),
    "qwen2 (tied lm_head), lm_head alone": ("qwen2", {"trainable_layers": 0, "trainable_extra_modules": ["lm_head"]}),
    "llama reward model, the last layer (and its new head)": ("llama", {"trainable_layers": 1,
                                                                       "objective": "reward"}),
    "internlm2 (loaded as Llama), down_proj of every layer": ("internlm2", {"trainable_modules": ["down_proj"]}),
}


@pytest.mark.parametrize("case", list(PLANNED))
def test_the_plan_counts_the_parameters_training_trains(case, tiny_model_factory):
    """The plan's trained parameters are the loaded model's `requires_grad` ones; its AdamW states and gradients
    are theirs alone (fp32 master weights: 8 and 4 bytes a trained parameter)."""
    from tunelab.model.fit import plan_report
    from tunelab.model.freeze import trained_part
    from tunelab.model.load import load_model_for_training
    from tunelab.model.memory import estimate_memory

    arch, settings = PLANNED[case]
    cfg = tiny_cfg(tiny_model_factory(arch), accumulative_counts=2, **settings)
    model, _ = load_model_for_training(cfg, torch.device("cpu"))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    part = trained_part(cfg)
    assert (part.params, part.total) == (trained, total)
    assert f"partial fine-tuning: {trained:,} of {total:,} parameters train" in plan_report(cfg)  # `tunelab plan`
    assert 0 < trained < total
    est = estimate_memory(cfg)
    assert est.parts["AdamW states"] == 8 * trained
    assert est.parts["gradients (kept across micro-batches)"] == 4 * trained
    whole = estimate_memory(tiny_cfg(tiny_model_factory(arch), accumulative_counts=2,
                                     objective=settings.get("objective", "sft")))
    assert est.parts["AdamW states"] < whole.parts["AdamW states"]


def test_layers_before_the_first_trained_one_keep_nothing_for_backward_as_the_plan_says(tiny_llama_dir):
    """Measured on the CPU: the tensors each decoder layer saves for backward. A frozen layer before the first
    trained one saves none (autograd records nothing there), and the plan counts activations for the layers
    backward runs through only."""
    from tunelab.data.collate import collate
    from tunelab.model.load import load_model_for_training
    from tunelab.model.loss import causal_lm_loss
    from tunelab.model.memory import estimate_memory
    from tunelab.model.parts import decoder_layers

    rows = identity_rows(AutoTokenizer.from_pretrained(tiny_llama_dir), 1)
    saved = {}
    for layers in (None, 1):
        cfg = tiny_cfg(tiny_llama_dir, trainable_layers=layers)
        model, _ = load_model_for_training(cfg, torch.device("cpu"))
        per_layer, current = [0, 0], [None]
        for i, layer in enumerate(decoder_layers(model)):
            layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
            layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))

        def pack(t):
            if current[0] is not None:
                per_layer[current[0]] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = causal_lm_loss(model, collate(rows, 0))
        loss.backward()
        saved[layers] = per_layer
        planned = estimate_memory(cfg).parts["activations"]
        if layers is None:
            whole_plan = planned
    assert saved[None][0] > 0 and saved[None][1] > 0
    assert saved[1][0] == 0 and saved[1][1] > 0  # the frozen first layer keeps nothing
    assert planned == whole_plan // 2  # backward through 1 of 2 layers


REFUSED_BY_THE_MODEL = {
    "a module no layer has": ({"trainable_layers": 1, "trainable_modules": ["mlpp"]},
                              ("trainable_modules", "'mlpp'", "'mlp'", "'self_attn'")),
    "a module outside the layers it does not have": ({"trainable_layers": 1, "trainable_extra_modules": ["lm_haed"]},
                                                     ("trainable_extra_modules", "'lm_haed'", "'lm_head'",
                                                      "'embed_tokens'")),
    "more layers than it has": ({"trainable_layers": 3}, ("trainable_layers = 3", "has 2 decoder layers")),
}


@pytest.mark.parametrize("case", list(REFUSED_BY_THE_MODEL))
def test_a_name_that_matches_nothing_stops_train_before_the_weights_are_read(case, capsys, tmp_path, tiny_llama_dir):
    """Through `tunelab train`, on weight files nobody could read: the names come from the model built on the meta
    device, as LoRA's targets do (tunelab/model/targets.py), and the message lists the model's own names."""
    settings, words = REFUSED_BY_THE_MODEL[case]
    broken = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:64])
    config = write_config(tmp_path, broken, method="full", dtype="fp32", max_steps=1, **settings)
    code = main(["train", str(config), "--work-dir", str(tmp_path / "work"), "--device", "cpu"])
    assert_one_line_error(capsys, code, *words)


REFUSED_SETTINGS = {
    "with LoRA": ({"method": "lora", "trainable_layers": 2}, ("trainable_layers", "method = 'full'")),
    "with QLoRA": ({"method": "qlora", "trainable_extra_modules": ["lm_head"]},
                   ("trainable_extra_modules", "method = 'full'")),
    "nothing left to train": ({"trainable_layers": 0}, ("trainable_layers = 0", "trainable_extra_modules")),
    "modules of no layer": ({"trainable_layers": 0, "trainable_modules": ["mlp"],
                             "trainable_extra_modules": ["lm_head"]}, ("trainable_modules",)),
    "'all' in a list": ({"trainable_modules": ["all"]}, ("trainable_modules", "'all'")),
    "LLaMA-Factory's name": ({"freeze_trainable_layers": 2}, ("freeze_trainable_layers", "trainable_layers")),
}


def test_a_reward_model_may_train_its_score_head_alone(tmp_path, tiny_llama_dir):
    """trainable_layers = 0 with no extra module trains nothing for a language model (refused above), but a reward
    model's new score head trains whatever they say: a linear probe, its plan counting the head alone."""
    from tunelab.config.loader import load_config
    from tunelab.model.freeze import trained_modules, trained_part
    from tunelab.model.targets import empty_model

    cfg = load_config(write_config(tmp_path, tiny_llama_dir, method="full", objective="reward", trainable_layers=0))
    assert trained_modules(empty_model(cfg), cfg) == ["score"]
    part = trained_part(cfg)
    assert part.params == 64 and part.backward_layers == 0 and not part.lm_head  # hidden size 64, one score


@pytest.mark.parametrize("case", list(REFUSED_SETTINGS))
def test_settings_that_cannot_work_together_name_the_key(case, tmp_path, tiny_llama_dir):
    from tunelab.config.loader import load_config

    settings, words = REFUSED_SETTINGS[case]
    config = write_config(tmp_path, tiny_llama_dir, **{"method": "full", **settings})
    with pytest.raises(TunelabError) as error:
        load_config(config)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_a_resume_with_another_choice_is_refused_and_the_same_one_continues(tiny_llama_dir, tokenizer, tmp_path):
    cfg = tiny_cfg(tiny_llama_dir, max_steps=4, save_steps=2, batch_size=4, trainable_layers=1)
    rows = identity_rows(tokenizer)
    full = train(cfg, tmp_path / "run", train_rows=rows, device="cpu").losses
    shutil.rmtree(tmp_path / "run" / "iter_4")
    # -1: the first layer instead of the last, of the same shapes, whose optimiser states would load without a word
    for changed in ({"trainable_layers": -1}, {"trainable_layers": 2}, {"trainable_modules": ["mlp"]},
                    {"trainable_extra_modules": ["norm"]}):
        with pytest.raises(TunelabError) as error:
            train(dataclasses.replace(cfg, **changed), tmp_path / "run", resume="auto",
                  train_rows=rows, device="cpu")
        assert f"{next(iter(changed))} was " in str(error.value)
    resumed = train(cfg, tmp_path / "run", resume="auto", train_rows=rows, device="cpu").losses
    assert resumed[3] == pytest.approx(full[3], abs=1e-6) and resumed[4] == pytest.approx(full[4], abs=1e-6)


def test_the_checkpoint_converts_with_pth_to_hf_and_chats(tiny_llama_dir, tokenizer, tmp_path, capsys):
    """`convert pth_to_hf` writes the whole model (bf16), its frozen weights the base's, and it answers as trained."""
    from tunelab.data.templates import get_template
    from tunelab.model.generate import GenerationSettings, generate_reply
    from tunelab.model.load import load_model_for_inference

    config = write_config(tmp_path, tiny_llama_dir, method="full", trainable_layers=1,
                          trainable_extra_modules=["lm_head"], lr=3e-3, max_steps=30, save_steps=30, batch_size=4,
                          dtype="fp32")
    assert main(["train", str(config), "--work-dir", str(tmp_path / "work"), "--device", "cpu"]) == 0
    assert main(["convert", "pth_to_hf", str(config), str(tmp_path / "work"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    before, exported = _base_weights(tiny_llama_dir), _base_weights(tmp_path / "hf")
    chosen = {n for n in before if n.startswith("model.layers.1.") or n.startswith("lm_head.")}
    assert {n for n in before if not torch.equal(before[n].to(torch.bfloat16), exported[n])} == chosen
    model, hf_tokenizer = load_model_for_inference(str(tmp_path / "hf"), device="cpu")
    question = [{"role": "user", "content": "Who are you?"}]
    reply = generate_reply(model, hf_tokenizer, get_template("qwen_chat"), question,
                           GenerationSettings(max_new_tokens=16))
    assert "Tuna" in reply, reply


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2"])
def test_two_ranks_train_the_chosen_layer_only(engine, tiny_llama_dir, tmp_path):
    """`NPROC_PER_NODE=2 tunelab train` (gloo): the engines train the chosen weights and save the whole model with
    the frozen ones untouched."""
    if engine == "zero2":
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'tunelab[deepspeed]'")
    config = write_config(tmp_path, tiny_llama_dir, method="full", trainable_layers=1, max_steps=2, save_steps=2,
                          batch_size=1, dtype="fp32", fsdp=engine == "fsdp",
                          deepspeed="zero2" if engine == "zero2" else None)
    train_on_ranks(config, tmp_path / "run", 2, last_step=2)
    before = _base_weights(tiny_llama_dir)
    saved = load_file(tmp_path / "run" / "iter_2" / "model" / "model.safetensors")
    assert _changed(before, saved) == {n for n in before if n.startswith("model.layers.1.")}
