"""Mistakes around loading a model end in a TunelabError that says what is wrong and how to fix it."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError
from tunelab.model.load import load_model_for_inference, load_model_for_training
from tunelab.model.tokenizer import load_tokenizer


def _train(path, **kw):
    cfg = TrainConfig(pretrained_model_name_or_path=str(path), method="lora", dtype="fp32", **kw)
    return load_model_for_training(cfg, torch.device("cpu"))


def test_missing_model_directory(tmp_path):
    with pytest.raises(TunelabError, match=r"pretrained_model_name_or_path.*does not exist") as e:
        _train(tmp_path / "no_such_model")
    assert str(tmp_path / "no_such_model") in str(e.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TunelabError, match="no config.json"):
        _train(tmp_path)


def test_directory_without_weights(tiny_llama_dir, tmp_path):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(TunelabError, match=r"no weights \(\*\.safetensors"):
        _train(tmp_path)


def test_config_json_that_is_not_json(tiny_llama_dir, tmp_path):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama",\n  oops}')
    with pytest.raises(TunelabError, match=r"config.json: not valid JSON \(line 2\)"):
        _train(tmp_path / "m")


def test_tokenizer_without_pad_token_is_fixed_and_says_so(tiny_llama_dir, caplog):
    assert json.loads((tiny_llama_dir / "tokenizer_config.json").read_text()).get("pad_token") is None
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        tok = load_tokenizer(str(tiny_llama_dir))
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id
    assert "no pad token" in caplog.text and "'</s>'" in caplog.text


@pytest.fixture
def remote_code_model(tiny_llama_dir, tmp_path):
    d = tmp_path / "fancy"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["FancyForCausalLM"], model_type="fancy",
               auto_map={"AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_architecture_needing_remote_code(remote_code_model):
    with pytest.raises(TunelabError) as e:
        _train(remote_code_model)
    msg = str(e.value)
    assert "FancyForCausalLM" in msg and "config.json" in msg
    assert "trust_remote_code = True" in msg and "--trust-remote-code" in msg and "own risk" in msg
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "InternLM2ForCausalLM", "Gemma2ForCausalLM"):
        assert arch in msg  # says which ones we do support


def test_chat_on_unsupported_architecture(remote_code_model):
    with pytest.raises(TunelabError, match="--trust-remote-code"):
        load_model_for_inference(str(remote_code_model), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_for_and_absent(tiny_llama_dir):
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_llama_dir), method="lora")
    with pytest.raises(TunelabError, match="CUDA is not available.*--device cpu"):
        load_model_for_training(cfg, torch.device("cuda"))
    with pytest.raises(TunelabError, match="CUDA is not available"):
        load_model_for_inference(str(tiny_llama_dir), device="cuda")


def test_hub_id_while_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(TunelabError) as e:
        _train("internlm/internlm2-chat-1_8b")
    msg = str(e.value)
    assert "'internlm/internlm2-chat-1_8b' is not a local directory" in msg
    assert "hub is unreachable" in msg and "local directory" in msg
    assert_download_command_exists(msg)


def assert_download_command_exists(msg: str) -> None:
    """The download command an error suggests is one the installed huggingface_hub ships (`hf`; the transformers
    tunelab needs comes with a huggingface_hub that has no `huggingface-cli`)."""
    import importlib.metadata
    import re

    command = re.search(r"`(\S+) download ", msg)
    assert command, msg
    scripts = {ep.name for ep in importlib.metadata.distribution("huggingface_hub").entry_points
               if ep.group == "console_scripts"}
    assert command.group(1) in scripts, (command.group(1), scripts)


def test_plan_of_a_model_not_here_suggests_a_download_command_that_exists(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tunelab.model.shapes import model_shape, vision_shape

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    for shape, name in ((model_shape, "someone/unknown-model"), (vision_shape, "someone/unknown-tower")):
        with pytest.raises(TunelabError) as e:
            shape(name)
        assert_download_command_exists(str(e.value))


def test_adapter_directory_without_adapter(tiny_llama_dir, tmp_path):
    from tunelab.chat.engine import load_chat_model

    with pytest.raises(TunelabError, match="is not a LoRA adapter: .*adapter_config.json is missing"):
        load_chat_model(str(tiny_llama_dir), adapter=str(tmp_path), device="cpu")


def test_full_finetune_of_a_quantised_base(tiny_llama_dir):
    with pytest.raises(TunelabError, match="method = 'full' with quant_bits = 4"):
        load_model_for_training(TrainConfig(pretrained_model_name_or_path=str(tiny_llama_dir), method="full",
                                            quant_bits=4, dtype="fp32"), torch.device("cpu"))


def test_a_device_name_that_is_not_one_is_a_tunelab_error():
    from tunelab.model.load import check_device

    with pytest.raises(TunelabError, match="'gpu': not a device name; use cpu, cuda or cuda:N"):
        check_device("gpu")


def test_max_length_beyond_the_models_positions_is_a_warning_naming_both(tiny_llama_dir, caplog):
    # trained silently before; a warning, not an error: extending the context with rope_scaling is deliberate
    with caplog.at_level(logging.WARNING, logger="tunelab.model.load"):
        _train(tiny_llama_dir, max_length=2048)  # the tiny model's max_position_embeddings: no warning
        assert "max_position_embeddings" not in caplog.text
        _train(tiny_llama_dir, max_length=4096)
    assert (f"max_length = 4096 is longer than {tiny_llama_dir}'s max_position_embeddings = 2048" in caplog.text
            and "rope_scaling" in caplog.text)


def test_a_llava_model_as_the_language_model_names_its_parts(tmp_path):
    """A LLaVA export (tunelab's or the hub's) given as pretrained_model_name_or_path: the message names its
    parts, not trust_remote_code = True, which cannot help (there is no remote code; it is not a text model)."""
    from tunelab.model.model_dir import check_architecture

    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "text_config": {"model_type": "qwen2"}, "vision_config": {"model_type": "clip_vision_model"}}
    (tmp_path / "tunelab.json").write_text(json.dumps({"base_model": "/models/qwen", "llava": {
        "visual_encoder": "/models/clip"}}))
    with pytest.raises(TunelabError) as e:
        check_architecture(config, tmp_path, trust_remote_code=False)
    message = str(e.value)
    assert "a 'llava' model (a language model with a vision tower)" in message
    assert "built from pretrained_model_name_or_path = '/models/qwen'" in message
    assert "built with visual_encoder_name_or_path = '/models/clip'" in message and "pretrained_pth" in message
    assert "trust_remote_code" not in message


@pytest.mark.parametrize("arch", ["llama", "internlm2"])
def test_a_weight_file_cut_short_is_named_with_the_fix(arch, tiny_model_factory, tmp_path):
    """A download or copy cut short: the file is named, not safetensors' 'Error while deserializing header'."""
    shutil.copytree(tiny_model_factory(arch), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TunelabError, match=r"pretrained_model_name_or_path: model\.safetensors in .* is damaged or "
                                           r"incomplete .* Download or copy it again"):
        _train(tmp_path / "m")
    with pytest.raises(TunelabError, match=r"MODEL: model\.safetensors in .* is damaged"):
        load_model_for_inference(str(tmp_path / "m"), device="cpu")


def test_a_safetensors_error_with_every_file_whole_is_not_called_damage(tiny_llama_dir, monkeypatch):
    """Only a file that does not open is named damaged: another error of the library is raised as it is."""
    from safetensors import SafetensorError

    from tunelab.model import load

    def fails(*args, **kwargs):
        raise SafetensorError("File does not contain tensor model.norm.weight")

    monkeypatch.setattr(load, "_from_pretrained", fails)
    with pytest.raises(SafetensorError, match="does not contain tensor"):
        load_model_for_inference(str(tiny_llama_dir), device="cpu")
