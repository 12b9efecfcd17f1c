"""The shape of a model (layer sizes, heads, vocabulary) without loading it: from its config.json, the HF cache, or a
table of the hub models tunelab ships configs for, so that `tunelab plan` and the benchmarks work offline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

# Shapes of the hub models we ship configs for, so `plan` works offline. Keys: config.json field names. Releases that
# changed only their weights share a shape.
_INTERNLM2_7B = dict(vocab_size=92544, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8)
_LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8)
KNOWN_SHAPES = {
    "internlm/internlm2-chat-1_8b": dict(vocab_size=92544, hidden_size=2048, intermediate_size=8192,
                                         num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8),
    "internlm/internlm2-chat-7b": _INTERNLM2_7B,
    "internlm/internlm2_5-7b-chat": _INTERNLM2_7B,
    "internlm/internlm2-chat-20b": dict(vocab_size=92544, hidden_size=6144, intermediate_size=16384,
                                        num_hidden_layers=48, num_attention_heads=48, num_key_value_heads=8),
    "meta-llama/Llama-2-7b-chat-hf": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA3_8B,
    "Qwen/Qwen2.5-0.5B-Instruct": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       tie_word_embeddings=True, model_type="qwen2"),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                       tie_word_embeddings=True, model_type="qwen2"),
    "Qwen/Qwen2.5-7B-Instruct": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                     model_type="qwen2"),
    "mistralai/Mistral-7B-Instruct-v0.2": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}

# Vision towers of the LLaVA configs (tunelab.config.registry.VISION_TOWERS), for a plan made before the download.
KNOWN_VISION = {
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              patch_size=14, image_size=336),
    "google/siglip-so400m-patch14-384": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                             patch_size=14, image_size=384),
}


@dataclass
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    biased: tuple = ()
    """The linear layers (Llama names) that have a bias, which lora_bias trains: Qwen2's q, k, v; attention_bias
    and mlp_bias of Llama-style configs."""

    @classmethod
    def from_config(cls, c: dict) -> "ModelShape":
        heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)), biased=_biased_linears(c),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer, by its Llama module name."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_attention_heads * self.head_dim, \
            self.num_key_value_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def total_params(self) -> int:
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        return self.num_hidden_layers * self.layer_linear_params() + self.embedding_params() + norms


def _biased_linears(c: dict) -> tuple:
    """The linear layers of config `c` with a bias (ModelShape.biased)."""
    biased = ("q_proj", "k_proj", "v_proj") if c.get("model_type") == "qwen2" else ()
    if c.get("attention_bias"):
        biased = ("q_proj", "k_proj", "v_proj", "o_proj")
    return biased + (("gate_proj", "up_proj", "down_proj") if c.get("mlp_bias") else ())


def local_config_file(name_or_path: str) -> Path | None:
    """A model's config.json without downloading anything: in its local directory, or in the HF cache for a hub id
    downloaded before; None when neither has it."""
    config_file = Path(name_or_path) / "config.json"
    if config_file.is_file():
        return config_file
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # not a hub id (or no huggingface_hub)
        return None
    return Path(cached) if isinstance(cached, str) else None


def model_shape(name_or_path: str) -> ModelShape:
    """Shape from the config.json of a local directory or the local HF cache, else the table of known hub ids."""
    config_file = local_config_file(name_or_path)
    if config_file is not None:
        return _shape_from_file(config_file)
    if name_or_path in KNOWN_SHAPES:
        return ModelShape.from_config(KNOWN_SHAPES[name_or_path])
    from tunelab.model.model_dir import download_command

    raise TunelabError(
        f"pretrained_model_name_or_path = {name_or_path!r}: cannot find its config.json to estimate memory. "
        f"Point it at a local model directory, or download the model first ({download_command(name_or_path)})."
    )


def _shape_from_file(config_file: Path) -> ModelShape:
    try:
        return ModelShape.from_config(_text_config(json.loads(config_file.read_text(encoding="utf-8"))))
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{config_file}: not valid JSON (line {exc.lineno}): {exc.msg}. Fix or re-download it.") from None
    except KeyError as exc:  # e.g. ChatGLM's own names (num_layers, ffn_hidden_size)
        raise TunelabError(f"{config_file}: no {exc.args[0]!r}, so `plan` cannot tell the model's shape. It reads "
                           "Llama-style fields (hidden_size, intermediate_size, num_hidden_layers, "
                           "num_attention_heads, vocab_size).") from None


def _text_config(c: dict) -> dict:
    # Multimodal configs nest the language model's settings.
    return c.get("text_config", c) if "hidden_size" not in c else c


def vision_shape(path: str) -> dict:
    """A vision tower's config (hidden_size, intermediate_size, num_hidden_layers, patch_size, image_size) from its
    config.json (a local directory or the local HF cache) or the table of the towers the LLaVA configs name."""
    config_file = local_config_file(path)
    if config_file is not None:
        return _vision_shape_from_file(path, config_file)
    if path in KNOWN_VISION:
        return KNOWN_VISION[path]
    from tunelab.model.model_dir import download_command

    raise TunelabError(f"visual_encoder_name_or_path = {path!r}: cannot find its config.json to estimate memory. "
                       f"Point it at a local folder, or download it first ({download_command(path)}).")


def _vision_shape_from_file(path: str, config_file: Path) -> dict:
    """The shape from a tower's (or a whole CLIP / SigLIP model's) config.json, with what the file leaves out as its
    config class's defaults, as transformers reads it (the config training loads: `vision_config`)."""
    from tunelab.data.multimodal import vision_config

    config = vision_config(config_file.parent)
    return {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size",
                                            "image_size")}
