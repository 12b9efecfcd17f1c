"""Rows → a padded batch of tensors. There is never an attention mask: see docs/DESIGN.md, Batches.

In a multimodal run the batch also holds ``pixel_values``: the rows' images, row by row in order, which is the order
of their image tokens in the flattened batch (`tunelab.model.llava.image_embeddings` fills them in that order)."""

from __future__ import annotations

import numpy as np
import torch

from tunelab.data.encode import IGNORE_INDEX


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
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": labels,
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        # Known here on the CPU, so the loss never waits for the GPU to find them (tunelab.model.loss).
        "loss_index": loss_index,
        "loss_targets": targets,
        **extra,
    }
    if "sequence_kind" in rows[0]:
        batch.update(sequence_fields(rows, width, loss_index, pad_token_id))
    return batch


def sequence_fields(rows: list[dict], width: int, loss_index: torch.Tensor,
                    pad_token_id: int) -> dict[str, torch.Tensor]:
    """Per-sequence fields of preference rows (tunelab.data.encode_preference): a row lists the kind of each of its
    sequences in order, and each sequence starts where position_ids restart at 0 (the padding after them is one more
    segment, not listed). Returns `sequence_kind` [S], `loss_sequence` (the sequence of each trained position, in
    `loss_index` order), `sequence_last` (the flat position where a reward head reads each sequence: its last token
    that is not the pad token, the one transformers' sequence-classification models read, so an exported reward model
    scores as it was trained also where pad = EOS ends a sequence), `sequence_tokens` (trained tokens per sequence)
    and, when the rows carry them, `reference_logps` [S]."""
    owner = np.full(len(rows) * width, -1, dtype=np.int64)
    kinds, last = [], []
    for r, row in enumerate(rows):
        n = len(row["sequence_kind"])
        starts = np.flatnonzero(np.asarray(row["position_ids"]) == 0)[:n]
        ends = np.append(starts[1:], len(row["input_ids"]))
        not_pad = np.asarray(row["input_ids"]) != pad_token_id
        for start, end in zip(starts, ends):
            owner[r * width + start:r * width + end] = len(kinds)
            kinds.append(0)
            read = np.flatnonzero(not_pad[start:end])
            last.append(r * width + start + (read[-1] if len(read) else end - start - 1))
        kinds[len(kinds) - n:] = list(row["sequence_kind"])
    loss_sequence = torch.from_numpy(owner[loss_index.numpy()])
    fields = {"sequence_kind": torch.tensor(kinds, dtype=torch.long), "loss_sequence": loss_sequence,
              "sequence_last": torch.tensor(last, dtype=torch.long),
              "sequence_tokens": torch.bincount(loss_sequence, minlength=len(kinds))}
    if "reference_logps" in rows[0]:
        fields["reference_logps"] = torch.tensor([v for row in rows for v in row["reference_logps"]],
                                                 dtype=torch.float32)
    return fields


def loss_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions of a [batch, length] batch whose next token is trained, those next tokens)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    targets = targets.flatten()
    index = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    return index, targets[index]
