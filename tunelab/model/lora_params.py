"""How many parameters a LoRA run trains, from the model's shape and the LoRA settings, counted as peft counts them
(`get_nb_trainable_parameters`): `tunelab plan` sizes the adapters, their gradients and AdamW states from it."""

from __future__ import annotations

import re

from tunelab.model.shapes import ModelShape

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EMBEDDING, HEAD = "embed_tokens", "lm_head"


def lora_params(shape: ModelShape, cfg) -> int:
    """LoRA's A and B (r * (in + out) a layer), DoRA's magnitude vector (out), the biases lora_bias trains, LoRA on
    the embedding or lm_head, and the full copies lora_modules_to_save trains."""
    layer_targets, outer_targets = _targets(shape, cfg.lora_target_modules)
    linears = shape.linear_shapes()
    per_layer = sum(cfg.lora_r * (linears[n][0] + linears[n][1]) + (linears[n][1] if cfg.use_dora else 0)
                    for n in layer_targets)
    biased = layer_targets if cfg.lora_bias == "lora_only" else linears if cfg.lora_bias == "all" else ()
    per_layer += sum(linears[n][1] for n in biased if n in shape.biased)
    total = shape.num_hidden_layers * per_layer
    for name in outer_targets:  # an Embedding's magnitude has no DoRA form in peft; lm_head's is vocab long
        total += cfg.lora_r * (shape.vocab_size + shape.hidden_size)
        total += shape.vocab_size if cfg.use_dora and name == HEAD else 0
    for name in cfg.lora_modules_to_save or ():  # a whole trained copy of the module
        if name.rsplit(".", 1)[-1] in (EMBEDDING, HEAD):
            total += shape.vocab_size * shape.hidden_size
    return total


def _targets(shape: ModelShape, targets) -> tuple[list[str], list[str]]:
    """(the decoder layers' linears, the embedding / lm_head) that lora_target_modules adapts, by their Llama names."""
    layer_names = list(shape.linear_shapes())
    if targets == "all-linear":  # peft's all-linear leaves the output layer out
        return layer_names, []
    if isinstance(targets, str):  # a regular expression over the full module names, as peft reads it
        full = {f"model.layers.0.{'self_attn' if n in ATTENTION else 'mlp'}.{n}": n for n in layer_names}
        full.update({f"model.{EMBEDDING}": EMBEDDING, HEAD: HEAD})
        try:
            chosen = [n for path, n in full.items() if re.fullmatch(targets, path)]
        except re.error:
            chosen = []
    else:
        chosen = [n for n in (t.rsplit(".", 1)[-1] for t in targets) if n in layer_names or n in (EMBEDDING, HEAD)]
    if not chosen:  # InternLM2 / custom names: assume every linear is targeted (an upper bound)
        return layer_names, []
    return [n for n in layer_names if n in chosen], [n for n in (EMBEDDING, HEAD) if n in chosen]
