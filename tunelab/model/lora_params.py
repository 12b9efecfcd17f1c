"""How many parameters a LoRA run trains, from the model's shape and the LoRA settings, counted as peft counts them
(`get_nb_trainable_parameters`): `tunelab plan` sizes the adapters, their gradients and AdamW states from it; and
what DoRA's forward adds to the activations (`dora_bytes`)."""

from __future__ import annotations

import re

from tunelab.model.shapes import ModelShape

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EMBEDDING, HEAD = "embed_tokens", "lm_head"

# DoRA (use_dora) runs peft's own forward on every device (the lean LoRA forward leaves its layers alone). What it adds
# to plain LoRA's peak, measured on the CPU under bf16 autocast as a GPU run computes, eagerly (the peak of the tensors
# alive at once, tests/peak_bytes.py; tests/test_memory.py checks a fitted and two held-out configs): per token and per
# output unit of each adapted linear, the base result and the adapter's result that the magnitude's gradient needs,
# and the fp32 sums peft makes of them, about 4 bytes...
DORA_BYTES_PER_OUTPUT = 4.0
# ...with lora_dropout, the base linear run again on the dropped input (peft casts the input to the adapter's fp32 and
# DoRA the weight with it; autocast casts that back to bf16): each adapted weight's bf16 copy kept for backward (on a
# 4-bit base, of the dequantised weight)...
DORA_DROPOUT_WEIGHT_BYTES = 2
# ...and, one linear at a time, the weight norm: torch.eye(in) in fp32 pushed through the adapter, and the weight, the
# adapter's product and their sum in fp32, freed before the next linear (Llama-7B's down_proj: 1 GiB).
DORA_NORM_BYTES = 4


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


def dora_bytes(shape: ModelShape, cfg, tokens: int) -> tuple[float, float]:
    """(what DoRA adds to what one decoder layer keeps for backward, what one linear's weight norm holds for a
    moment) over `tokens` tokens; (0, 0) without DoRA."""
    if not cfg.use_dora or cfg.method == "full" or cfg.freeze_llm:
        return 0.0, 0.0
    adapted = adapted_linears(shape, cfg)
    kept = tokens * DORA_BYTES_PER_OUTPUT * sum(out for _, out in adapted)
    if cfg.lora_dropout:
        kept += sum(i * o for i, o in adapted) * DORA_DROPOUT_WEIGHT_BYTES
    norm = max((i * i + 3 * i * o) * DORA_NORM_BYTES for i, o in adapted) if adapted else 0
    return kept, norm


def adapted_linears(shape: ModelShape, cfg) -> list[tuple[int, int]]:
    """(in, out) of each linear of one decoder layer that carries an adapter."""
    linears = shape.linear_shapes()
    return [linears[name] for name in _targets(shape, cfg.lora_target_modules)[0]]


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
