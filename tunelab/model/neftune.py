"""NEFTune (`neftune_noise_alpha`): noise on the input embeddings while training, which the NEFTune paper (Jain et al.,
2023) found to make instruction-tuned models answer better. The noise is uniform in [-m, m] with
m = alpha / sqrt(row length x hidden size), as transformers' Trainer and TRL add it (`transformers.integrations.neftune`);
a packed row's length is the row's, as there. Only in training mode: evaluation questions, chat and export see the
embeddings as they are, and nothing is saved with the model.
"""

from __future__ import annotations

import math

import torch


def add_embedding_noise(model, alpha: float, *, sequence_parallel_size: int = 1):
    """Hook NEFTune's noise onto `model`'s input embedding; returns the hook's handle. Under sequence parallelism a
    rank's embeddings are a 1/N shard of the row: alpha / sqrt(N) gives the whole row's magnitude. The ranks draw
    from the same random stream (as transformers' Trainer has them), so a row's shards get the same noise pattern,
    as they get the same LoRA dropout masks."""
    alpha = alpha / math.sqrt(sequence_parallel_size)

    def noise(module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        bound = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.zeros_like(output).uniform_(-bound, bound)

    return model.get_input_embeddings().register_forward_hook(noise)
