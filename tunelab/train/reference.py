"""Reference log-probabilities computed once before training (`reference = 'precomputed'`).

DPO and KTO compare the policy with the model it started from. Instead of a second forward pass every step (LoRA
with its adapters off) or a frozen copy of the weights (full fine-tuning), the starting model scores every sequence
of the training rows once, before the first step; the rows then carry the values (`reference_logps`) into each
batch. That costs one pass over the data without gradients, and nothing per step.

The values are saved in the work dir (`layout.REFERENCE_LOGPS`, with a fingerprint of the rows), because a resumed
run no longer has the starting model: it reads them back, and refuses rows that changed since. A fresh run scores
its own starting model, whatever an earlier run left there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from tunelab.data.collate import collate
from tunelab.errors import TunelabError
from tunelab.train import layout
from tunelab.train.distributed import all_reduce_sum


class RowsWithReference:
    """Rows (tunelab.data.packing.TokenRows or a list) with each row's reference log-probabilities added."""

    def __init__(self, rows, values: np.ndarray, offsets: np.ndarray):
        self.rows, self.values, self.offsets = rows, values, offsets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {**row, "reference_logps": self.values[self.offsets[i]:self.offsets[i + 1]].tolist()}


def sequence_offsets(rows) -> np.ndarray:
    """Where each row's sequences start in a flat list of all of them."""
    if getattr(rows, "kinds", None) is not None:  # TokenRows keep them: no row is decoded
        return rows.kinds[1]
    counts = [len(rows[i]["sequence_kind"]) for i in range(len(rows))]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _row_arrays(rows, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids int32, labels int32, sequence_kind int8) of row i; slices of TokenRows' flat arrays."""
    if getattr(rows, "kinds", None) is not None:
        a, b = int(rows.offsets[i]), int(rows.offsets[i + 1])
        kinds, kind_offsets = rows.kinds
        return (rows.arrays["input_ids"][a:b], rows.arrays["labels"][a:b],
                kinds[int(kind_offsets[i]):int(kind_offsets[i + 1])])
    row = rows[i]
    return (np.asarray(row["input_ids"], dtype=np.int32), np.asarray(row["labels"], dtype=np.int32),
            np.asarray(row["sequence_kind"], dtype=np.int8))


def fingerprint(rows) -> str:
    """A digest of the rows' tokens and sequence kinds: the values belong to exactly these rows."""
    digest = hashlib.blake2b(digest_size=16)
    for i in range(len(rows)):
        for values in _row_arrays(rows, i):
            digest.update(values.tobytes())
    return digest.hexdigest()


@torch.no_grad()
def compute_reference_logps(model, rows, offsets: np.ndarray, score, *, pad_token_id: int, batch_size: int, device,
                            autocast, env) -> np.ndarray:
    """Every sequence's reference log-probability (fp32, in row order; `offsets` from sequence_offsets), this rank
    scoring every world_size-th row and the ranks adding their parts. score(model, batch) -> per-sequence
    log-probabilities (the objective's)."""
    values = torch.zeros(int(offsets[-1]), dtype=torch.float64, device=device)
    mine = list(range(env.rank, len(rows), env.world_size))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(mine), batch_size):
            indices = mine[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in indices], pad_token_id).items()}
            with autocast(device):
                logps = score(model, batch).double()
            at = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices]).to(device)
            values.index_copy_(0, at, logps)
    finally:
        model.train(was_training)
    return all_reduce_sum(values, env).float().cpu().numpy()


def reference_rows(rows, work_dir: Path, compute, *, split: str = "train", resuming: bool, write: bool = True,
                   log=print) -> RowsWithReference:
    """The rows with their reference log-probabilities: a resumed run reads them from the work dir (they must be of
    these rows); a fresh run computes them (`compute(rows, offsets) -> values`) and saves them there (by the process
    that `write`s: every rank computes the same values). A fresh run never reads them: values an earlier run left
    (its checkpoints deleted by --overwrite, or stopped before its first) may be another starting model's, of the
    same rows (a retrained SFT model with the same tokenizer), and nothing in them tells."""
    path = Path(work_dir) / layout.REFERENCE_LOGPS.format(split=split)
    key = fingerprint(rows)
    offsets = sequence_offsets(rows)
    if resuming and path.is_file():
        stored = np.load(path)
        if str(stored["fingerprint"]) == key:
            log(f"reference log-probabilities read from {path}")
            return RowsWithReference(rows, stored["values"], offsets)
        raise TunelabError(f"{path} holds reference log-probabilities of other training rows (the data, the "
                           f"template or max_length changed since the run started), and the starting model is "
                           f"gone: resume with the settings the run started with, or start a fresh run.")
    if resuming:
        raise TunelabError(f"reference = 'precomputed', but {path} is missing, so the starting model's "
                           f"log-probabilities are lost: start a fresh run (or use reference = 'copy').")
    values = compute(rows, offsets)
    if write:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, values=values, fingerprint=np.array(key))
        tmp.replace(path)
    log(f"reference log-probabilities of {len(values)} sequences computed and saved to {path}")
    return RowsWithReference(rows, values, offsets)


def with_reference(model, objective, train_rows, eval_rows, cfg, *, work_dir: Path, resuming: bool, precision,
                   pad_token_id: int, env, log=print):
    """(train rows, eval rows) carrying the reference log-probabilities of `model` as loaded, before training: read
    from the work dir, or computed with the objective's log-probabilities (tunelab.model.logprobs) and saved."""
    from tunelab.model.logprobs import sequence_logprobs

    def score(m, batch):
        return sequence_logprobs(m, batch, **objective.logprob_options)

    def compute(rows, offsets):
        log(f"scoring the {len(rows)} rows' sequences with the starting model, the reference (reference = "
            f"'precomputed'): once, before training")
        return compute_reference_logps(model, rows, offsets, score, pad_token_id=pad_token_id, batch_size=cfg.batch_size,
                                       device=env.device, autocast=precision.autocast, env=env)

    common = dict(resuming=resuming, write=env.is_main, log=log)
    train_rows = reference_rows(train_rows, work_dir, compute, split="train", **common)
    if eval_rows is not None and len(eval_rows):
        eval_rows = reference_rows(eval_rows, work_dir, compute, split="eval", **common)
    return train_rows, eval_rows
