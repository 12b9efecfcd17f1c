"""A longer context than the model was pretrained on: RoPE scaling (the `rope_scaling` setting).

A model's positions end at its config.json's `max_position_embeddings`; past them attention sees rotation angles it
never saw. `rope_scaling = 'linear'` (position interpolation: every angle divided by the factor), 'yarn' (NTK-by-parts
with an attention temperature: what Qwen and DeepSeek publish for long contexts) or 'llama3' (Llama 3.1's per-frequency
scaling) stretches them over `max_length`, by the factor max_length / max_position_embeddings rounded up (as
LLaMA-Factory does), and the model is fine-tuned to the stretched positions. transformers computes the rotation
(`rope_parameters` of the model's config); this module decides the parameters, once, when training loads the base.

The trained model keeps them: a full run's config.json carries them, a LoRA run records them in tunelab.json
(`training_meta`), and chat, merge and GGUF export put them on the base before the adapter goes on
(`load_causal_lm(rope=...)`), so a merged model's config.json carries them too.
"""

from __future__ import annotations

import logging
import math

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

KINDS = ("linear", "yarn", "llama3")
# Llama 3.1's published band: frequencies with wavelengths under old_context / 4 kept, over old_context scaled fully
LLAMA3_BAND = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def base_rope_type(config: dict) -> str:
    """The RoPE type a config.json (transformers 4 or 5 layout, or InternLM2's) already uses; 'per-layer' for a model
    whose layer types have their own (Gemma 3)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        return "per-layer"
    scaling = config.get("rope_scaling") or params or {}
    return scaling.get("rope_type") or scaling.get("type") or "default"


def scaling_for(kind: str | None, max_length: int, config: dict, model_name: str) -> dict | None:
    """The change `rope_scaling = kind` makes to the base's config (`rope` below), or None when there is nothing
    to scale. `config`: the base's config.json as read."""
    if kind is None:
        return None
    if kind not in KINDS:  # the config check names the choices; this is for settings built in Python
        raise TunelabError(f"rope_scaling = {kind!r}: use one of {', '.join(map(repr, KINDS))}, or None.")
    context = config.get("max_position_embeddings")
    if not isinstance(context, int) or context <= 0:
        raise TunelabError(f"rope_scaling = {kind!r}: {model_name}'s config.json has no max_position_embeddings, so "
                           f"there is no context length to scale from. Set rope_scaling = None.")
    already = base_rope_type(config)
    if already != "default":
        raise TunelabError(f"rope_scaling = {kind!r}: {model_name} scales RoPE already ({already!r} in its "
                           f"config.json; its context is {context} tokens, max_position_embeddings). Set "
                           f"rope_scaling = None, and max_length up to {context}.")
    if config.get("model_type") == "internlm2" and kind != "linear":
        raise TunelabError(f"rope_scaling = {kind!r}: InternLM2's own code (which loads the exported model) knows "
                           f"'linear' and 'dynamic' only. Use rope_scaling = 'linear'.")
    if max_length <= context:
        log.warning("rope_scaling = %r not applied: max_length = %d fits %s's context of %d tokens "
                    "(max_position_embeddings). Set rope_scaling = None, or raise max_length past %d.",
                    kind, max_length, model_name, context, context)
        return None
    factor = float(math.ceil(max_length / context))
    params = {"rope_type": kind, "factor": factor}
    if kind in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = context
    if kind == "llama3":
        params.update(LLAMA3_BAND)
    return {"rope_parameters": params, "max_position_embeddings": int(context * factor)}


def apply(config, rope: dict) -> None:
    """Put `rope` (from `scaling_for`, or a run's tunelab.json) on a transformers config before the model is built:
    the base's RoPE parameters (its rope_theta, ...) with the scaling's on top."""
    base = getattr(config, "rope_parameters", None)
    if not isinstance(base, dict):
        raise TunelabError(f"rope_scaling: {type(config).__name__} has no rope_parameters to scale (a model whose "
                           f"code runs with trust_remote_code defines RoPE itself). Set rope_scaling = None.")
    config.rope_parameters = {**base, **rope["rope_parameters"]}
    config.max_position_embeddings = int(rope["max_position_embeddings"])


def recorded(config) -> dict:
    """What tunelab.json records of a run that scaled RoPE: the trained model's own parameters."""
    return {"rope_parameters": dict(config.rope_parameters), "max_position_embeddings": config.max_position_embeddings}
