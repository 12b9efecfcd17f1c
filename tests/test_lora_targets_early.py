"""LoRA targets that match nothing stop a run before any weight file is read (tunelab/model/targets.py): the names
come from the model built on the meta device from its config files, so a typo on a 7B model is an error in a second,
not after minutes of loading. Each case runs on a model whose weight files are truncated: the error it gives is the
one the loaded model gives, word for word, and a correct config gets past the check on the same files."""

from __future__ import annotations

import shutil

import pytest

from tests.train_helpers import tiny_cfg
from tunelab.errors import TunelabError

CASES = {
    "misspelt target": {"lora_target_modules": ["q_proj", "qproj"]},
    "misspelt module to save": {"lora_target_modules": ["q_proj"], "lora_modules_to_save": ["lm_haed"]},
    "a name as a string": {"lora_target_modules": "q_proj"},
    "a regular expression matching nothing": {"lora_target_modules": r".*\.qproj"},
}


def _truncated(model_dir, tmp_path, name="model"):
    """A copy of `model_dir` whose weight files cannot be read (a download cut short)."""
    copy = tmp_path / name
    shutil.copytree(model_dir, copy)
    for weights in copy.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:64])
    return copy


def _message_after_loading(cfg) -> str:
    """The message of the same mistake on the model with its weights loaded (the check as it ran before)."""
    from tunelab.model.load import load_causal_lm
    from tunelab.model.targets import check_lora_targets

    model = load_causal_lm(cfg.pretrained_model_name_or_path, dtype="auto", device="cpu",
                           reward_head=cfg.objective == "reward")
    with pytest.raises(TunelabError) as error:
        check_lora_targets(model, cfg.lora_target_modules, cfg.pretrained_model_name_or_path,
                           cfg.lora_modules_to_save)
    return str(error.value)


@pytest.mark.parametrize("arch", ["qwen2", "internlm2"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_target_that_matches_nothing_stops_train_before_the_weights_are_read(capsys, tmp_path, tiny_model_factory,
                                                                               arch, case):
    """Through `tunelab train`: one line, the message the loaded model gave, on weight files nobody could read.
    InternLM2 is checked as the Llama graph it loads as (q_proj, not its own wqkv)."""
    from tests.train_helpers import assert_one_line_error, write_config
    from tunelab.cli.main import main

    model_dir = tiny_model_factory(arch)
    broken = _truncated(model_dir, tmp_path)
    config = write_config(tmp_path, broken, dtype="fp32", max_steps=1, **CASES[case])
    code = main(["train", str(config), "--work-dir", str(tmp_path / "work"), "--device", "cpu"])
    message = assert_one_line_error(capsys, code, "lora_", "matches no")  # not the unreadable weights
    expected = _message_after_loading(tiny_cfg(model_dir, method="lora", **CASES[case]))
    assert message == "error: " + expected.replace(str(model_dir), str(broken))


def test_internlm2s_own_names_are_refused_with_the_names_it_loads_under(tiny_model_factory, tmp_path):
    """InternLM2 trains as the Llama graph it is converted to: its own names (wqkv, w1) match nothing there."""
    from tunelab.model.targets import check_targets_before_loading

    broken = _truncated(tiny_model_factory("internlm2"), tmp_path)
    with pytest.raises(TunelabError, match=r"'wqkv', 'w1' matches no module .* \['down_proj', 'gate_proj'"):
        check_targets_before_loading(tiny_cfg(broken, method="qlora", lora_target_modules=["wqkv", "w1"]))


@pytest.mark.parametrize("settings", [{}, {"lora_target_modules": ["q_proj", "v_proj"]},
                                      {"lora_target_modules": r".*\.(q|v)_proj"},
                                      {"lora_target_modules": ["q_proj"], "lora_modules_to_save": ["lm_head"]}])
@pytest.mark.parametrize("arch", ["qwen2", "internlm2"])
def test_correct_targets_pass_the_check_without_weights(tiny_model_factory, tmp_path, arch, settings):
    from tunelab.model.targets import check_targets_before_loading

    check_targets_before_loading(tiny_cfg(_truncated(tiny_model_factory(arch), tmp_path), method="lora",
                                               **settings))


def test_a_reward_models_head_is_a_module_to_save_before_loading(tiny_qwen2_dir, tmp_path):
    """A reward model is the sequence classifier: its head is `score`, which the check finds without weights."""
    from tunelab.model.targets import check_targets_before_loading

    broken = _truncated(tiny_qwen2_dir, tmp_path)
    check_targets_before_loading(tiny_cfg(broken, method="lora", objective="reward",
                                               lora_modules_to_save=["score"]))
    cfg = tiny_cfg(tiny_qwen2_dir, method="lora", objective="reward", lora_modules_to_save=["scroe"])
    with pytest.raises(TunelabError) as error:
        check_targets_before_loading(tiny_cfg(broken, method="lora", objective="reward",
                                                   lora_modules_to_save=["scroe"]))
    assert str(error.value) == _message_after_loading(cfg).replace(str(tiny_qwen2_dir), str(broken))


@pytest.mark.parametrize("settings,words", [
    ({"lora_target_modules": ["q_proj", "qproj"]}, "'qproj' names no linear layer of the language model"),
    ({"lora_target_modules": ["q_proj", "lm_head"]}, "lm_head trains whole"),
    ({"lora_target_modules": ["q_proj", "fc1"], "visual_encoder_lora": False}, "'fc1' names no linear layer"),
    ({"lora_modules_to_save": ["lm_haed"]}, "lora_modules_to_save: 'lm_haed' matches no module"),
])
def test_a_llava_target_that_matches_nothing_stops_before_the_weights_are_read(tiny_qwen2_dir, tiny_vision_factory,
                                                                               tmp_path, settings, words):
    """A LLaVA run: the language model and the vision tower built without weights, assembled as training does."""
    from tunelab.model.load import load_model_for_training

    cfg = tiny_cfg(_truncated(tiny_qwen2_dir, tmp_path, "llm"), method="lora",
                   visual_encoder_name_or_path=str(_truncated(tiny_vision_factory("clip"), tmp_path, "tower")),
                   **settings)
    with pytest.raises(TunelabError, match=words):
        load_model_for_training(cfg, "cpu")


def test_a_llava_tower_target_passes_without_weights_and_the_run_loads(tiny_qwen2_dir, tiny_vision_factory, tmp_path):
    """fc1 is a linear layer of the vision tower: with visual_encoder_lora it is a target (checked without weights),
    and the same config loads and gets its adapters on the intact files."""
    import torch

    from tunelab.model.load import load_model_for_training
    from tunelab.model.targets import check_targets_before_loading

    settings = dict(method="lora", lora_target_modules=["q_proj", "fc1"], visual_encoder_lora=True,
                    lora_modules_to_save=["lm_head"])
    tower = tiny_vision_factory("clip")
    check_targets_before_loading(tiny_cfg(_truncated(tiny_qwen2_dir, tmp_path, "llm"),
                                               visual_encoder_name_or_path=str(_truncated(tower, tmp_path, "tower")),
                                               **settings))
    model, _ = load_model_for_training(tiny_cfg(tiny_qwen2_dir, visual_encoder_name_or_path=str(tower), **settings),
                                       torch.device("cpu"))
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("vision_tower" in n and "fc1.lora_A" in n for n in trained)
    assert any("language_model" in n and "q_proj.lora_A" in n for n in trained)
