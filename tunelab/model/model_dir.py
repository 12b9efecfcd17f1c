"""What a model directory holds and whether tunelab can load it: the directory itself or a hub id's snapshot, its
config.json and weights checked, its architecture matched to how it loads (native transformers class, InternLM2
converted, or the repository's own code when the user asks). Every model load starts here (`tunelab.model.load`)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.model import internlm2
from tunelab.model import rope as rope_scaling

log = logging.getLogger(__name__)

# Families tested in CI on a tiny config of their architecture (tests/test_model_families.py): load, one LoRA and
# one QLoRA step, chat. Architecture -> family, as in docs/MODELS.md.
SUPPORTED_FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "Llama 2 / 3 / 3.1 / 3.2 (and Llama-layout models: Yi, DeepSeek-LLM, InternLM3 ...)",
    "Qwen2ForCausalLM": "Qwen2 / Qwen2.5",
    "Qwen3ForCausalLM": "Qwen3",
    "MistralForCausalLM": "Mistral",
    "Gemma2ForCausalLM": "Gemma 2",
    "Gemma3ForCausalLM": "Gemma 3 (text-only checkpoints: 1B, or the text part)",
    "Phi3ForCausalLM": "Phi-3 / Phi-3.5 / Phi-4-mini",
    "Glm4ForCausalLM": "GLM-4 (-0414 and later, transformers layout)",
    "InternLM2ForCausalLM": "InternLM2 / InternLM2.5 (loaded as a native Llama graph, no remote code)",
}
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def supported_architectures() -> list[str]:
    """The `architectures` values (config.json) tunelab tests; others transformers ships load with a warning."""
    return list(SUPPORTED_FAMILIES)


# --- where the files are -------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_dir(path: str | Path, *, key: str = "pretrained_model_name_or_path") -> Path:
    """A local directory holding the model: `path` itself, or the hub snapshot of a hub id (from the cache if offline).

    `key` names where the path came from (a config key or a command-line argument) for the error messages.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = str(path)
    if local.exists():
        raise TunelabError(f"{key} = {text!r} is a file; it must be a model directory (with config.json and weights).")
    if not _HUB_ID.match(text) or text.startswith((".", "~")) or Path(text).is_absolute():
        raise TunelabError(f"{key}: model directory {text!r} does not exist. Check the path "
                           "(a local directory with config.json, weights and tokenizer files).")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError

        return Path(snapshot_download(text, ignore_patterns=["*.pth", "*.pt", "*.h5", "*.msgpack", "*.onnx",
                                                             "*.gguf", "original/*"]))
    except RepositoryNotFoundError:
        raise TunelabError(f"{key} = {text!r}: no such local directory, and no such model on the hub. "
                           "Check the spelling, or pass a local model directory.") from None
    except Exception as exc:  # offline mode, no network, proxy, ...: the fix is the same
        raise TunelabError(
            f"{key} = {text!r} is not a local directory, and the model hub is unreachable "
            f"({type(exc).__name__}; offline or no network). Download the model where there is a network "
            f"(e.g. {download_command(text)}) and pass that local directory instead.") from None


def download_command(repo_id: str) -> str:
    """The command that puts hub model `repo_id` in a local folder (huggingface_hub's `hf`), quoted for a message."""
    return f"`hf download {repo_id} --local-dir ./{repo_id.split('/')[-1]}`"


def read_model_config(model_dir: Path, *, key: str = "pretrained_model_name_or_path") -> dict:
    """config.json of a model directory, after checking the directory holds a model at all."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise TunelabError(f"{key}: {model_dir} has no config.json, so it is not a model directory. "
                           "Point it at the directory that holds config.json and the weights.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{config_path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if not any(next(model_dir.glob(g), None) for g in _WEIGHT_GLOBS):
        raise TunelabError(f"{key}: {model_dir} has a config.json but no weights (*.safetensors or "
                           "pytorch_model*.bin); the download may be incomplete. Download the weights into it.")
    return config


def _loads_natively(config: dict) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _multimodal_advice(config: dict, model_dir: Path) -> str:
    """A LLaVA-style model given where a text model goes: trust_remote_code cannot help (there is no remote code), its
    parts can (tunelab's exports name them in tunelab.json)."""
    from tunelab.train.layout import read_meta

    meta = read_meta(model_dir) or {}
    llava = meta.get("llava") if isinstance(meta.get("llava"), dict) else {}
    llm, tower = meta.get("base_model"), llava.get("visual_encoder")
    llm = f" (it was built from pretrained_model_name_or_path = {llm!r})" if llm else ""
    tower = f" (it was built with visual_encoder_name_or_path = {tower!r})" if tower else ""
    return (f"{model_dir}: a {config.get('model_type')!r} model (a language model with a vision tower), not a text "
            f"model. A LLaVA run is built from a text model as pretrained_model_name_or_path{llm} and a CLIP or "
            f"SigLIP model as visual_encoder_name_or_path{tower}; pretrained_pth = {str(model_dir)!r} starts its "
            "projector from this folder (its language model's weights are not read from here). docs/MULTIMODAL.md")


def check_architecture(config: dict, model_dir: Path, *, trust_remote_code: bool) -> str:
    """'internlm2', 'native' or 'remote': how this model will load; a TunelabError when it cannot."""
    if internlm2.is_internlm2(config):
        return "internlm2"
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    if _loads_natively(config):
        # a reward model trained here is the family's sequence-classification class (tunelab.model.reward)
        family = arch.replace("ForSequenceClassification", "ForCausalLM")
        if family not in SUPPORTED_FAMILIES:
            log.warning("%s: architecture %s is in transformers but not tested by tunelab; it should work, "
                        "check the first steps.", model_dir, arch)
        return "native"
    if config.get("vision_config") and not config.get("auto_map"):  # no remote code that trust_remote_code could run
        raise TunelabError(_multimodal_advice(config, model_dir))
    if trust_remote_code:
        log.warning("%s: running the repository's own Python code for %s (trust_remote_code).", model_dir, arch)
        return "remote"
    needs = " It ships its own modelling code (auto_map in config.json)." if config.get("auto_map") else ""
    if config.get("model_type") == "internlm3":
        needs += " Newer transformers releases load InternLM3 natively: pip install -U transformers."
    raise TunelabError(
        f"{model_dir / 'config.json'}: architecture {arch!r} (model_type {config.get('model_type')!r}) is not one "
        f"tunelab or transformers can load natively.{needs} Supported: {', '.join(supported_architectures())}. "
        "To run the repository's own code at your own risk, set `trust_remote_code = True` in the config "
        "(or pass --trust-remote-code to chat / serve); only do so for a repository you trust.")


def check_token_ids_fit(cfg, tokenizer, rows) -> None:
    """The rows' token ids all have a row in the model's input embedding. A tokenizer given new tokens without the
    model being resized would stop the first step with torch's 'index out of range in self' (on a GPU a device-side
    assert that ends the process); checked after the data step, before the model loads. Only read when the
    tokenizer is longer than config.json's vocab_size, where ids past it can occur at all."""
    config = read_model_config(resolve_model_dir(cfg.pretrained_model_name_or_path))
    config = config.get("text_config", config) if "vocab_size" not in config else config
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or len(tokenizer) <= vocab:
        return
    arrays = getattr(rows, "arrays", None)
    ids = arrays["input_ids"] if arrays is not None else [i for row in rows for i in row["input_ids"]]
    largest = int(max(ids, default=0))
    if largest >= vocab:
        raise TunelabError(f"pretrained_model_name_or_path: the data holds token id {largest}, but "
                           f"{cfg.pretrained_model_name_or_path}'s embedding has {vocab} rows (its tokenizer has "
                           f"{len(tokenizer)} tokens: some were added without resizing the model). Resize it and "
                           f"save it first (model.resize_token_embeddings(len(tokenizer)); model.save_pretrained(DIR); "
                           f"tokenizer.save_pretrained(DIR)), then train DIR with lora_modules_to_save = "
                           f"['embed_tokens', 'lm_head'] so the new rows train.")


@contextlib.contextmanager
def reading_weights(directory: str | Path, key: str):
    """Loading the weights of `directory`: a damaged or incomplete safetensors file (a download or copy cut short, a
    full disk) is named, with the fix, instead of the safetensors library's 'Error while deserializing header'. An
    error of the library while every file opens whole is its own, raised as it is."""
    from safetensors import SafetensorError, safe_open

    try:
        yield
    except SafetensorError as exc:
        damaged = []
        for file in sorted(Path(directory).glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except SafetensorError:
                damaged.append(file.name)
        if not damaged:
            raise
        raise TunelabError(f"{key}: {', '.join(damaged)} in {directory} is damaged or incomplete ({exc}): its "
                           f"download or copy was probably cut short. Download or copy it again.") from None


# --- the classes a checkpoint is built as ---------------------------------------------------------------------------

def build_config(model_dir: Path, config: dict, how: str, *, rope: dict | None = None, **values):
    """The transformers config a checkpoint (`config`: its config.json, `how`: `check_architecture`'s answer) is
    built from: InternLM2's as its native Llama config, any other as AutoConfig reads it; with `values` set on it
    (a reward model's num_labels and pad_token_id) and RoPE scaled by `rope` (`tunelab.model.rope`)."""
    from transformers import AutoConfig

    if how == "internlm2":
        model_config = internlm2.native_config(config)
    else:
        model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=how == "remote")
    for key, value in values.items():
        setattr(model_config, key, value)
    if rope:
        rope_scaling.apply(model_config, rope)
    return model_config


def model_class(how: str, reward_head: bool = False):
    """The class that loads the checkpoint: a causal LM, or the sequence classifier of the same decoder (a reward
    model); InternLM2's are Llama's, its checkpoint converted on load."""
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    if how == "internlm2":
        return LlamaForSequenceClassification if reward_head else LlamaForCausalLM
    return AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM


def new_model(how: str, reward_head: bool, model_config):
    """A model of `model_class(how, reward_head)` built from `model_config` alone (on the meta device, under a
    `torch.device("meta")` block: `tunelab.model.targets`)."""
    cls = model_class(how, reward_head)
    if how == "internlm2":
        return cls(model_config)
    return cls.from_config(model_config, trust_remote_code=how == "remote")
