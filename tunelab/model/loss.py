"""Causal-LM loss over the trained tokens only, without building full-vocabulary logits.

A 7B model with a 128k vocabulary makes fp32 logits of 2 GB for one 4k-token row; in supervised fine-tuning most
positions are prompt tokens whose logits are thrown away. So: run the decoder for hidden states, keep the positions
whose next token is trained, and project those through `lm_head` in chunks, each chunk's logits freed (and recomputed
in backward) before the next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
MAX_CHUNK_LOGITS = 2**25  # logits elements per chunk: 128 MiB in fp32, whatever the vocabulary


def loss_chunk_rows(chunk_size: int, vocab_size: int) -> int:
    """Rows projected to logits at a time: `chunk_size`, fewer for large vocabularies (a chunk's fp32 logits, their
    bf16 source and their gradient exist at once)."""
    return max(1, min(chunk_size, MAX_CHUNK_LOGITS // vocab_size))


def split_model(model):
    """(decoder, lm_head, logit_softcap) of a causal LM, through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, base.base_model_prefix, None) or base.model
    lm_head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return decoder, lm_head, softcap


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias, softcap) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss(model, batch: dict, *, chunk_size: int = 4096, chunked: bool = True):
    """Sum of token losses and the number of trained tokens for one batch (see docs/DESIGN.md, Loss)."""
    labels = batch["labels"]
    # Next-token targets: position t predicts labels[t+1].
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    n_tokens = int((targets != IGNORE_INDEX).sum())
    if not chunked:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, n_tokens

    decoder, lm_head, softcap = split_model(model)
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    weight, bias = lm_head.weight, lm_head.bias
    chunk_size = loss_chunk_rows(chunk_size, weight.shape[0])
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, t, weight, bias, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, t, weight, bias, softcap)
    return total, n_tokens
