"""Which template a model was published with, from its config.json (and its tokenizer's chat_template)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

# Substrings of a model's name, most specific first (names carry the version that model_type does not).
_BY_NAME = [
    ("qwen3", "qwen3_chat"), ("qwq", "qwen3_chat"), ("qwen2.5", "qwen2_5_chat"), ("qwen2_5", "qwen2_5_chat"),
    ("qwen2", "qwen2_chat"), ("qwen1.5", "qwen2_chat"), ("qwen1_5", "qwen2_chat"),
    ("llama-3.2", "llama3_2_chat"), ("llama3.2", "llama3_2_chat"), ("llama-3.1", "llama3_1_chat"),
    ("llama3.1", "llama3_1_chat"), ("llama-3.3", "llama3_1_chat"), ("llama-3", "llama3_chat"),
    ("mistral-nemo", "mistral_tekken"), ("nemo-instruct", "mistral_tekken"), ("v0.3", "mistral_v3"),
    ("mixtral", "mistral"), ("phi-4-mini", "phi4_mini"), ("phi-3", "phi3_chat"), ("phi-3.5", "phi3_chat"),
    ("glm-4", "glm4_chat"), ("glm4", "glm4_chat"), ("chatglm3", "chatglm3"), ("chatglm", "chatglm3"),
    ("deepseek-r1", "deepseek_r1"), ("deepseek-v3", "deepseek_v3"), ("deepseek-v2", "deepseek_v2"),
    ("vicuna", "vicuna"), ("zephyr", "zephyr"), ("yi-", "yi_chat"), ("yi_", "yi_chat"),
    ("internlm3", "internlm2_chat"), ("internlm2", "internlm2_chat"),
]
_BY_TYPE = {"internlm": "internlm_chat", "internlm2": "internlm2_chat", "internlm3": "internlm2_chat",
            "qwen2": "qwen2_chat", "qwen2_moe": "qwen2_chat", "qwen3": "qwen3_chat", "qwen3_moe": "qwen3_chat",
            "mistral": "mistral", "mixtral": "mistral", "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma",
            "gemma3_text": "gemma", "phi3": "phi3_chat", "chatglm": "chatglm3", "glm": "glm4_chat",
            "glm4": "glm4_chat", "baichuan": "baichuan2_chat", "deepseek_v2": "deepseek_v2",
            "deepseek_v3": "deepseek_v3"}
# model_types whose versions share one model_type and differ in format: only a name tells them apart, so with
# no name in hand the tokenizer's own chat_template ('hf') is a better guess than one of them.
_AMBIGUOUS = {"qwen2", "mistral", "phi3", "llama"}


def _read(model_config_or_dir) -> tuple[str, dict, Optional[Path]]:
    name, config, folder = "", {}, None
    if isinstance(model_config_or_dir, (str, Path)):
        path = Path(model_config_or_dir)
        # Only the model's own folder names count (e.g. "Yi-6B/merged"), not where the user keeps experiments.
        name = "/".join(path.resolve().parts[-2:]) if path.exists() else str(model_config_or_dir)
        folder = path if path.is_dir() else path.parent
        path = path / "config.json" if path.is_dir() else path
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
    elif isinstance(model_config_or_dir, dict):
        config = model_config_or_dir
    else:
        config = model_config_or_dir.to_dict()
    return (name + " " + str(config.get("_name_or_path", ""))).lower(), config, folder


def _has_chat_template(folder: Optional[Path]) -> bool:
    if folder is None:
        return False
    if (folder / "chat_template.jinja").is_file():
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def guess_template(model_config_or_dir) -> Optional[str]:
    """A template name for a model (a directory, a config.json path, a config dict or a transformers config).

    A built-in template when the model's name or type says exactly which format it was published with; 'hf' (the
    tokenizer's own chat_template) when the folder ships one and the config alone cannot tell the version."""
    name, config, folder = _read(model_config_or_dir)
    for needle, template in _BY_NAME:
        if needle in name:
            return template
    model_type = str(config.get("model_type", "")).lower()
    architectures = " ".join(config.get("architectures") or []).lower()
    if model_type in _AMBIGUOUS and _has_chat_template(folder):
        return "hf"
    if model_type == "llama" or (not model_type and "llama" in architectures):
        return "llama3_chat" if int(config.get("vocab_size") or 0) >= 128000 else "llama2_chat"
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    for needle, template in sorted(_BY_TYPE.items(), key=lambda kv: -len(kv[0])):
        if needle in architectures:
            return template
    return "hf" if _has_chat_template(folder) else None
