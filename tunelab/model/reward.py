"""Reward models: a transformers sequence-classification model (one label) scoring the last token of a sequence.

A reward model is trained and saved as `AutoModelForSequenceClassification` with ``num_labels = 1``: the decoder of
the causal LM and a linear head (`score`) without bias, read at the last token of each sequence that is not the pad
token. Training reads the head at that token of every sequence of a packed row (`sequence_last`, listed by
`tunelab.data.collate`), the token transformers itself reads, so a saved model gives the scores it was trained on:
where pad = EOS (tunelab's choice for a tokenizer without a pad token) and the template ends a sequence with EOS
(mistral, llama2_chat), both read the token before that EOS.
"""

from __future__ import annotations

import torch

from tunelab.model.parts import base_model, split_model


def reward_head(model) -> torch.nn.Module:
    """The linear head of a sequence-classification model (peft's trained copy when it wraps one)."""
    base = base_model(model)
    head = getattr(base, "score", None)
    if head is None:
        raise ValueError(f"{type(base).__name__} has no 'score' head: not a sequence-classification model")
    return head


def sequence_scores(model, batch: dict) -> torch.Tensor:
    """The score of each sequence of a batch of preference rows: fp32 [num_sequences]."""
    decoder, _, _ = split_model(model)
    # no KV cache: with one, transformers would not read the sequence boundaries from position_ids
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
                     ).last_hidden_state
    last = hidden.flatten(0, 1).index_select(0, batch["sequence_last"])
    head = reward_head(model)
    return head(last.to(head.weight.dtype) if not torch.is_autocast_enabled(last.device.type) else last
                ).float().squeeze(-1)
