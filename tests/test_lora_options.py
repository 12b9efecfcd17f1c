"""The LoRA options as a user sets them (use_dora, use_rslora, lora_bias, lora_target_modules, lora_modules_to_save,
lora_dropout), against peft: the fast path computes peft's own loss and adapter gradients for each (or turns itself
off for it), and the settings peft cannot take are refused before loading. The export of each setting (pth_to_hf,
PeftModel.from_pretrained, merge) is checked in tests/test_export_matrix.py's way for the settings that touch it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.train_helpers import tiny_cfg
from tunelab.model.load import load_model_for_training
from tunelab.model.loss import causal_lm_objective
from tunelab.model.plan import plan_fast_path

SETTINGS = {
    "plain": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True, "lora_r": 16, "lora_alpha": 4},
    "bias_all": {"lora_bias": "all"},
    "bias_lora_only": {"lora_bias": "lora_only", "lora_target_modules": ["q_proj"]},
    "regex": {"lora_target_modules": r".*\.(q|v)_proj"},
    "lm_head_target": {"lora_target_modules": ["q_proj", "lm_head"]},
    "embed_target": {"lora_target_modules": ["q_proj", "embed_tokens"]},
    "lm_head_saved": {"lora_target_modules": ["q_proj"], "lora_modules_to_save": ["lm_head"]},
    "embed_saved": {"lora_target_modules": ["q_proj"], "lora_modules_to_save": ["embed_tokens"]},
    "dropout": {"lora_dropout": 0.2},
}


def _loss_and_grads(model_dir, fast_path: bool, **settings):
    """The training loss of one batch and the trained parameters' gradients, as the loop computes them."""
    cfg = tiny_cfg(model_dir, method="lora", dtype="fp32", gradient_checkpointing=False, fast_path=fast_path,
                   **settings)
    plan = plan_fast_path(cfg, "cpu")
    if fast_path:  # the lean LoRA forward is a GPU lever; it runs on the CPU too, with the same numbers
        plan = dataclasses.replace(plan, lean_lora=True)
    torch.manual_seed(0)
    model, report = load_model_for_training(cfg, torch.device("cpu"), plan)
    with torch.no_grad():  # lora_B (and DoRA's start) make the adapter a no-op: give every trained tensor a value
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    model.train()
    torch.manual_seed(2)  # the same dropout masks in both runs
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(16).repeat(2, 1)}
    loss, _ = causal_lm_objective(plan)(model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, report


@pytest.mark.parametrize("name", list(SETTINGS))
def test_fast_path_trains_each_lora_setting_as_peft_does(tiny_qwen2_dir, name):
    """Qwen2 (biases on q, k, v for lora_bias): the fast path's loss and every trained tensor's gradient equal the
    plain path's (transformers and peft as they come) on the same batch."""
    loss, grads, report = _loss_and_grads(tiny_qwen2_dir, True, **SETTINGS[name])
    ref_loss, ref_grads, _ = _loss_and_grads(tiny_qwen2_dir, False, **SETTINGS[name])
    assert int(report["lean_lora"].split()[0]) > 0
    assert ("DoRA" in report["lean_lora"]) == bool(SETTINGS[name].get("use_dora"))  # DoRA layers run peft's forward
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        assert ref is not None and grads[key] is not None, key
        torch.testing.assert_close(grads[key], ref, rtol=1e-4, atol=1e-6, msg=key)


def test_an_adapter_on_lm_head_turns_the_chunked_loss_off_and_says_so(tiny_qwen2_dir):
    """The chunked loss multiplies by lm_head's own weight: with a LoRA adapter on lm_head it would leave the
    adapter out (no gradient, another loss), so the plan computes full logits through peft's lm_head instead."""
    cfg = tiny_cfg(tiny_qwen2_dir, method="lora", lora_target_modules=["q_proj", "lm_head"])
    assert not plan_fast_path(cfg, "cpu").chunked_loss
    assert not plan_fast_path(tiny_cfg(tiny_qwen2_dir, method="lora", lora_target_modules=r".*lm_head"),
                              "cpu").chunked_loss
    assert plan_fast_path(tiny_cfg(tiny_qwen2_dir, method="lora", lora_modules_to_save=["lm_head"]),
                          "cpu").chunked_loss
    _, _, report = _loss_and_grads(tiny_qwen2_dir, True, lora_target_modules=["q_proj", "lm_head"])
    assert "lm_head" in report["chunked_loss"] and report["chunked_loss"].startswith("off")


def test_an_adapter_on_lm_head_with_rows_split_over_gpus_is_refused_naming_the_fix(tiny_qwen2_dir):
    from tunelab.config.checks import combination_errors

    cfg = tiny_cfg(tiny_qwen2_dir, method="lora", lora_target_modules=["q_proj", "lm_head"], sequence_parallel_size=2)
    errors = combination_errors(cfg)
    assert len(errors) == 1 and "lora_target_modules" in errors[0] and "lora_modules_to_save" in errors[0]


PLAN_SETTINGS = {**SETTINGS, "list": {"lora_target_modules": ["q_proj", "v_proj"]},
                 "lm_head_and_embed_saved": {"lora_target_modules": ["q_proj"],
                                             "lora_modules_to_save": ["embed_tokens", "lm_head"]},
                 "dora_on_lm_head_and_embed": {"use_dora": True, "lora_target_modules": ["lm_head", "embed_tokens"]}}


@pytest.mark.parametrize("name", list(PLAN_SETTINGS))
def test_plan_counts_the_trainable_parameters_peft_trains(tiny_qwen2_dir, name):
    """`tunelab plan` sizes the adapters, their gradients and AdamW states from this count: DoRA's magnitude
    vectors, a regular expression's matches, LoRA on lm_head or the embedding and the full copies of
    lora_modules_to_save count as peft counts them (biases, a few hundred numbers a layer, are left out)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.model.load import _lora_config
    from tunelab.model.lora_params import lora_params
    from tunelab.model.shapes import model_shape

    cfg = tiny_cfg(tiny_qwen2_dir, method="lora", **PLAN_SETTINGS[name])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir), _lora_config(cfg))
    trained = peft_model.get_nb_trainable_parameters()[0]
    assert lora_params(model_shape(str(tiny_qwen2_dir)), cfg) == pytest.approx(trained, rel=0.02)


# --- settings refused before training, naming the key and the fix ---------------------------------------------------

@pytest.mark.parametrize("key,value", [("use_dora", True), ("use_rslora", True), ("lora_bias", "all"),
                                       ("lora_modules_to_save", ["lm_head"])])
def test_a_lora_setting_with_full_fine_tuning_is_refused_not_ignored(tiny_qwen2_dir, key, value):
    from tunelab.config.checks import combination_errors

    errors = combination_errors(tiny_cfg(tiny_qwen2_dir, method="full", **{key: value}))
    assert len(errors) == 1 and key in errors[0] and "method = 'lora'" in errors[0], errors


def test_a_module_both_adapted_and_trained_whole_is_refused(tiny_qwen2_dir):
    """peft wraps a module of lora_modules_to_save whole and leaves its lora_target_modules entry out: the adapter
    the user asked for would silently not exist."""
    from tunelab.config.checks import combination_errors

    cfg = tiny_cfg(tiny_qwen2_dir, method="lora", lora_target_modules=["q_proj", "lm_head"],
                   lora_modules_to_save=["lm_head"])
    errors = combination_errors(cfg)
    assert len(errors) == 1 and "'lm_head'" in errors[0] and "lora_modules_to_save" in errors[0], errors


def _train_error(capsys, tmp_path, model_dir, **settings) -> str:
    from tests.train_helpers import assert_one_line_error, write_config
    from tunelab.cli.main import main

    config = write_config(tmp_path, model_dir, dtype="fp32", max_steps=1, **settings)
    code = main(["train", str(config), "--work-dir", str(tmp_path / "work"), "--device", "cpu"])
    return assert_one_line_error(capsys, code)


def test_lora_modules_to_save_that_match_nothing_are_refused(capsys, tmp_path, tiny_qwen2_dir):
    message = _train_error(capsys, tmp_path, tiny_qwen2_dir, lora_target_modules=["q_proj"],
                           lora_modules_to_save=["lm_haed"])
    assert "lora_modules_to_save" in message and "'lm_haed'" in message and "'lm_head'" in message


def test_a_module_name_given_as_a_string_is_told_to_be_a_list(capsys, tmp_path, tiny_qwen2_dir):
    """peft reads a string as a regular expression over whole module names: 'q_proj' matches none of
    'model.layers.0.self_attn.q_proj'. The message says so, and what to write."""
    message = _train_error(capsys, tmp_path, tiny_qwen2_dir, lora_target_modules="q_proj")
    assert "lora_target_modules = ['q_proj']" in message and "regular expression" in message


@pytest.mark.parametrize("first,second", [({}, {"lora_bias": "all"}), ({}, {"lora_modules_to_save": ["lm_head"]}),
                                          ({"lora_modules_to_save": ["lm_head"]}, {})])
def test_resuming_with_other_trained_modules_is_refused_naming_the_setting(capsys, tmp_path, tiny_qwen2_dir, first,
                                                                           second):
    """lora_bias and lora_modules_to_save change which tensors train: the checkpoint's optimiser state and adapter
    would not load into them (a traceback from torch or peft after loading)."""
    from tests.train_helpers import assert_one_line_error, write_config
    from tunelab.cli.main import main

    work = tmp_path / "work"
    config = write_config(tmp_path / "a", tiny_qwen2_dir, dtype="fp32", max_steps=1, **first)
    assert main(["train", str(config), "--work-dir", str(work), "--device", "cpu"]) == 0
    capsys.readouterr()
    config = write_config(tmp_path / "b", tiny_qwen2_dir, dtype="fp32", max_steps=2, **second)
    code = main(["train", str(config), "--work-dir", str(work), "--device", "cpu", "--resume", "auto"])
    assert_one_line_error(capsys, code, *(second or first))


def test_tokens_added_to_the_tokenizer_but_not_to_the_embedding_are_refused(capsys, tmp_path, tiny_qwen2_dir):
    """A tokenizer given new tokens without resizing the model: the rows hold ids past the embedding's last row,
    which stopped with 'IndexError: index out of range in self' (on a GPU a device-side assert). The message says
    how many rows there are and how to resize, and that lora_modules_to_save then trains the new rows."""
    import json
    import shutil

    from tests.train_helpers import assert_one_line_error, write_config
    from tunelab.cli.main import main
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_qwen2_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens([f"<t{i}>" for i in range(800)])
    tokenizer.save_pretrained(base)
    config = write_config(tmp_path, base, dtype="fp32", max_steps=1)
    (tmp_path / "identity.json").write_text(json.dumps([{"instruction": "hi", "input": "", "output": "<t700>"}] * 4))
    code = main(["train", str(config), "--work-dir", str(tmp_path / "work"), "--device", "cpu"])
    assert_one_line_error(capsys, code, "resize_token_embeddings", "lora_modules_to_save")


@pytest.mark.parametrize("settings", [{"lora_modules_to_save": ["embed_tokens"]},
                                      {"lora_target_modules": ["q_proj", "embed_tokens"]}])
def test_a_trained_embedding_is_not_planned_into_cpu_memory(tiny_llama_dir, settings):
    """EmbeddingOnCPU takes a frozen nn.Embedding only: a trained copy or a LoRA embedding stays on the GPU, so the
    plan (and the memory estimate it feeds) must not count its bytes as moved."""
    from tunelab.model.memory import estimate_memory

    plain = tiny_cfg(tiny_llama_dir, method="lora")
    cfg = tiny_cfg(tiny_llama_dir, method="lora", **settings)
    assert plan_fast_path(plain, "cuda").embeddings_on_cpu
    assert not plan_fast_path(cfg, "cuda").embeddings_on_cpu
    assert "embeddings_on_cpu" not in estimate_memory(cfg).cpu_offload


def _llava_like():
    """The module names of a LLaVA model's parts that lora_targets reads."""
    lm = torch.nn.Module()
    lm.q_proj, lm.v_proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.language_model = lm
    model.lm_head = torch.nn.Linear(4, 8)
    return model


@pytest.mark.parametrize("wanted,word", [(["q_proj", "lm_head"], "'lm_head'"), (["q_proj", "qproj"], "'qproj'"),
                                         (r".*\.q_proj", "a list")])
def test_a_llava_target_it_cannot_adapt_is_refused_not_skipped(wanted, word):
    """A LLaVA run adapts the language model's linear layers: an entry naming none of them (lm_head, a typo) was
    passed over while another matched, and a regular expression was read as text to find names in."""
    from tunelab.errors import TunelabError
    from tunelab.model.llava_train import lora_targets

    assert lora_targets(_llava_like(), ["q_proj"]) == ["model.language_model.q_proj"]
    with pytest.raises(TunelabError, match="lora_target_modules") as error:
        lora_targets(_llava_like(), wanted)
    assert word in str(error.value)


# --- DoRA on an 8-bit base -------------------------------------------------------------------------------------------

def test_dora_on_an_8bit_base_is_refused_on_the_cpu_before_loading(capsys, tmp_path, tiny_qwen2_dir, monkeypatch):
    """peft's DoRA puts an 8-bit layer's weight back on the CPU without its scales, and the layer's second forward
    (checkpointing's recompute) failed inside bitsandbytes' 8-bit matmul with a traceback. Refused before the model
    loads, naming the settings and what trains on the CPU instead; on a GPU the same settings are not refused."""
    pytest.importorskip("bitsandbytes")
    import tunelab.model.load as load

    monkeypatch.setattr(load, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    message = _train_error(capsys, tmp_path, tiny_qwen2_dir, method="qlora", quant_bits=8, use_dora=True)
    for words in ("use_dora = True", "quant_bits = 8", "CPU", "quant_bits = 4", "use_dora = False"):
        assert words in message, message
    from tunelab.model.load import check_runs_on

    check_runs_on(tiny_cfg(tiny_qwen2_dir, method="qlora", quant_bits=8, use_dora=True), "cuda")
    check_runs_on(tiny_cfg(tiny_qwen2_dir, method="qlora", use_dora=True), "cpu")  # 4-bit DoRA trains on the CPU


def test_a_dora_adapter_is_refused_on_an_8bit_base_on_the_cpu_by_chat(tmp_path, tiny_qwen2_dir, monkeypatch):
    """The same peft loss of the 8-bit scales broke `chat --bits 8` on a DoRA adapter at its first reply (a traceback
    from inside generation); refused before the base loads, with the flags that work."""
    pytest.importorskip("bitsandbytes")
    from tests.train_helpers import write_config
    from tunelab.chat.engine import load_chat_model
    from tunelab.cli.main import main
    from tunelab.errors import TunelabError

    config = write_config(tmp_path, tiny_qwen2_dir, use_dora=True, max_steps=1, dtype="fp32")
    assert main(["train", str(config), "--work-dir", str(tmp_path / "w"), "--device", "cpu"]) == 0
    import tunelab.model.load as load

    monkeypatch.setattr(load, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(TunelabError, match=r"--bits 8 with the DoRA adapter .* CPU.*Use --bits 4"):
        load_chat_model(str(tmp_path / "w"), bits=8, device="cpu")


@pytest.mark.parametrize("settings", [{"quant_bits": 8}, {"quant_bits": 4, "use_dora": True}])
def test_the_cpu_alternatives_to_8bit_dora_train(tmp_path, tiny_qwen2_dir, settings):
    """What the refusal above offers trains on the CPU: 8-bit QLoRA without DoRA, 4-bit QLoRA with it (checkpointing
    on, so each layer runs forward twice a step)."""
    pytest.importorskip("bitsandbytes")
    from tests.train_helpers import identity_rows
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.train.loop import train

    cfg = tiny_cfg(tiny_qwen2_dir, method="qlora", max_steps=4, lr=1e-2, save_steps=100, **settings)
    tokenizer = load_tokenizer(str(tiny_qwen2_dir))
    losses = train(cfg, tmp_path, train_rows=identity_rows(tokenizer), tokenizer=tokenizer, device="cpu").losses
    assert losses[4] < losses[1] - 0.1, losses
