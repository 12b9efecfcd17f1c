"""Where the parts of a causal LM are: the decoder, its layers, lm_head. The one place that knows the anatomy.

Every family tunelab supports is a transformers causal LM: `model.<base_model_prefix>` is the decoder, its `layers`
the repeated blocks, `get_output_embeddings()` lm_head. The fast path, the loss and FSDP find them here, through a
peft wrapper if there is one. A model with more in front of its language model (a vision tower) answers with its
language model's parts, so the text fast path applies to that.
"""

from __future__ import annotations

import torch


def base_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def split_model(model):
    """(decoder, lm_head, logit_softcap) of a causal LM, through a peft wrapper if there is one."""
    base = base_model(model)
    decoder = getattr(base, base.base_model_prefix, None) or base.model
    decoder = getattr(decoder, "language_model", decoder)  # a LLaVA model: its language model's decoder
    lm_head = base.get_output_embeddings()
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    softcap = getattr(config, "final_logit_softcapping", None)
    return decoder, lm_head, softcap


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder's repeated blocks (`decoder.layers`), [] for a model that keeps them elsewhere."""
    layers = getattr(split_model(model)[0], "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []
