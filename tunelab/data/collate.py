"""Rows → a padded batch of tensors. There is never an attention mask: see docs/DESIGN.md, Batches.

In a multimodal run the batch also holds ``pixel_values``: the rows' images, row by row in order, which is the order
of their image tokens in the flattened batch (`tunelab.model.llava.image_embeddings` fills them in that order)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def collate(rows: list[dict], pad_token_id: int, multiple_of: int = 1, images=None) -> dict[str, torch.Tensor]:
    """multiple_of: pad the width up to a multiple of this, so batches come in fewer shapes (CUDA graphs record
    one graph per shape). images: a `tunelab.data.images.ImageLoader` in a multimodal run, loading the rows'
    images into ``pixel_values``."""
    width = -(-max(len(r["input_ids"]) for r in rows) // multiple_of) * multiple_of
    input_ids, labels, position_ids = [], [], []
    for r in rows:
        pad = width - len(r["input_ids"])
        input_ids.append(list(r["input_ids"]) + [pad_token_id] * pad)
        labels.append(list(r["labels"]) + [IGNORE_INDEX] * pad)
        # Padding forms its own segment (positions restart at 0), so real tokens never attend to it.
        position_ids.append(list(r["position_ids"]) + list(range(pad)))
    labels = torch.tensor(labels, dtype=torch.long)
    loss_index, targets = loss_targets(labels)
    extra = {} if images is None else {"pixel_values": images([ref for r in rows for ref in r.get("images", ())])}
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": labels,
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        # Known here on the CPU, so the loss never waits for the GPU to find them (tunelab.model.loss).
        "loss_index": loss_index,
        "loss_targets": targets,
        **extra,
    }


def loss_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions of a [batch, length] batch whose next token is trained, those next tokens)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    targets = targets.flatten()
    index = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    return index, targets[index]
