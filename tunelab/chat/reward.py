"""`tunelab reward MODEL --data FILE`: score replies with a reward model, as it was trained to score them.

MODEL is what reward training leaves (tunelab.model.reward): a merged or full sequence-classification model, a
checkpoint (iter_N or WORK_DIR), or the base model with `--adapter`. Every record of FILE is read as the data step
reads it: a preference pair gets a score for its chosen and its rejected reply (and counts towards the pairwise
accuracy), a KTO sample or a conversation a score for its last reply. Each sequence is the template's rendering of
prompt + reply, tokenised and cut at max_length exactly as in training, and scored at its last token that is not
the pad token (`tunelab.model.reward`).

A pair whose two sequences are the same tokens (the same reply, or both cut at max_length before their replies differ,
e.g. by a long prompt) gets the same score twice: it is scored but left out of the accuracy, with the reason in its
record ("skipped"), and `Scores.skipped` counts them by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tunelab.errors import TunelabError


@dataclass
class RewardModel:
    model: object
    tokenizer: object
    template: object
    system: str = ""
    max_length: int = 2048


@dataclass
class Scores:
    records: list[dict] = field(default_factory=list)
    """Per record: {"record", "chosen", "rejected", "correct"} for a pair (with "skipped": why, and "correct" None, for
    a pair whose sequences are the same tokens), {"record", "score"} otherwise."""

    @property
    def pairs(self) -> list[dict]:
        """The pairs the accuracy counts (not the skipped ones)."""
        return [r for r in self.records if "chosen" in r and "skipped" not in r]

    @property
    def skipped(self) -> Counter:
        """Pairs left out of the accuracy, by reason."""
        return Counter(r["skipped"] for r in self.records if "skipped" in r)

    @property
    def accuracy(self) -> float | None:
        pairs = self.pairs
        return sum(r["correct"] for r in pairs) / len(pairs) if pairs else None


def load_reward_model(model_path: str, *, adapter: str | None = None, prompt_template: str | None = None,
                      system: str | None = None, max_length: int | None = None, device: str = "auto",
                      dtype: str = "auto", bits: int | None = None, trust_remote_code: bool = False) -> RewardModel:
    if max_length is not None and max_length < 1:
        raise TunelabError(f"max_length must be 1 or more, got {max_length}")
    from tunelab.data.templates import choose_template
    from tunelab.export.adapters import apply_adapter, check_adapter_runs_on, model_to_load
    from tunelab.model.load import load_causal_lm, pick_device, resolve_dtype
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.model.model_dir import resolve_model_dir

    to_load = model_to_load(model_path, adapter)
    base, adapter_dir, meta = to_load.base, to_load.adapter_dir, to_load.meta
    base = str(resolve_model_dir(base, key="MODEL"))  # a path that is not there is named as such
    config_file = Path(base) / "config.json"
    architectures = json.loads(config_file.read_text()).get("architectures") or [] if config_file.is_file() else []
    if meta.get("objective") != "reward" and not any(a.endswith("ForSequenceClassification") for a in architectures):
        says = (f"its tunelab.json says objective = {meta['objective']!r}" if meta.get("objective") else
                f"its config.json names {', '.join(architectures) or 'no architecture'} (a chat or base model) and "
                f"no tunelab.json says objective = 'reward'")
        raise TunelabError(f"{adapter or model_path} is not a reward model: {says}. Score with a model trained with "
                           f"objective = 'reward' (its work dir, checkpoint, merged model, or base with --adapter).")
    dev = pick_device(device)
    check_adapter_runs_on(adapter_dir, bits, dev)
    tokenizer = load_tokenizer(str(adapter_dir) if adapter_dir and (adapter_dir / "tokenizer_config.json").is_file()
                               else base, trust_remote_code=trust_remote_code)
    model = load_causal_lm(base, dtype=resolve_dtype(dtype, dev), device=dev, bits=bits,
                           trust_remote_code=trust_remote_code, key="MODEL", reward_head=True,
                           pad_token_id=tokenizer.pad_token_id, rope=meta.get("rope_scaling"))
    if adapter_dir is not None:
        model = apply_adapter(model, adapter_dir, base, meta=meta)
    model.eval()
    template, _ = choose_template(prompt_template, meta, base, tokenizer)
    return RewardModel(model, tokenizer, template, meta.get("system", "") if system is None else system,
                       max_length or int(meta.get("max_length") or 2048))


def read_scored(path: str | Path, limit: int | None = None, dataset: str | None = None,
                warn: Callable[[str], None] | None = None) -> list[dict]:
    """The records of the data at `path`, or of the datasets `dataset` names in a dataset_info.json (the first
    `limit`), as pairs or as {"prompt", "completion"} (the last reply scored); read before the model loads, so that a
    bad record stops the command at once. Read as training reads them (`tunelab.data.eval_data.read_samples`: a
    registry entry's columns, tags and num_samples); warn(line) is told the fields not read."""
    from tunelab.data.eval_data import read_samples

    return read_samples(path, lambda data, fmt, where, report: _scored_sample(data, fmt, where), limit=limit,
                        dataset=dataset, warn=warn, verb="score")


def _scored_sample(data, fmt: str, where: str) -> dict:
    """A record in the fields its source reads, as a pair or as {"prompt", "completion"} (the last reply scored)."""
    from tunelab.data.formats import detect_format
    from tunelab.data.messages import refuse_lone_surrogates
    from tunelab.data.preference import normalise_kto, normalise_preference, record_kind

    kind = record_kind(data)
    if kind == "preference":
        sample = normalise_preference(data, where)
    elif kind == "kto":
        sample = normalise_kto(data, where)
    else:
        fmt = detect_format(data) if fmt == "auto" else fmt
        if fmt is None or fmt == "text":
            raise TunelabError(f"{where}: not a conversation or a preference pair; `tunelab reward` scores replies.")
        messages = _conversation(data, fmt, where)
        sample = {"prompt": messages[:-1], "completion": messages[-1]}
    refuse_lone_surrogates(sample, where)
    return sample


def _conversation(record: dict, fmt: str, where: str) -> list[dict]:
    """A conversation's messages, its last reply the one scored (the supervised reader's error about a missing reply
    worded for scoring: it points supervised data at preference training)."""
    from tunelab.data.files import InvalidRecord
    from tunelab.data.formats import normalise

    try:
        return normalise(record, fmt, where)["messages"]
    except InvalidRecord as exc:
        if "does not end with an assistant reply" not in str(exc):
            raise
    raise TunelabError(f"{where}: the conversation does not end with an assistant reply. `tunelab reward` scores "
                       f"a conversation's last reply: end it with the assistant reply to score, or give a pair "
                       f"('prompt', 'chosen', 'rejected').")


def _rows(rm: RewardModel, samples: list[dict]) -> tuple[list[dict], list[bool]]:
    """Each sample's sequences as one row (the chosen then the rejected reply of a pair; one reply otherwise), cut at
    max_length as in training; the samples tokenised together. And per sample whether its sequences are the same
    tokens (a pair the model cannot tell apart)."""
    from tunelab.data.encode import encode_segments
    from tunelab.data.encode_preference import conversation_pieces, join_sequences

    replies = [[s["chosen"], s["rejected"]] if "chosen" in s else [s["completion"]] for s in samples]
    pieces = [conversation_pieces(rm.template, s["prompt"], reply, s.get("tools"))
              for s, theirs in zip(samples, replies) for reply in theirs]
    # every token labelled, so no sequence is dropped: only the ids and where each sequence ends matter here
    encoded = encode_segments(rm.tokenizer, pieces, rm.max_length, "all", apart=rm.template.pieces_apart)
    rows, same, at = [], [], 0
    for theirs in replies:
        parts = encoded[at:at + len(theirs)]
        rows.append(join_sequences(parts, list(range(len(theirs)))).row)
        same.append(len(parts) == 2 and parts[0].row["input_ids"] == parts[1].row["input_ids"])
        at += len(theirs)
    return rows, same


def _why_same(pair: dict, max_length: int) -> str:
    strip = [{k: v for k, v in pair[side].items() if k != "train"} for side in ("chosen", "rejected")]
    if strip[0] == strip[1]:
        return "with the same chosen and rejected reply"
    return f"cut at max_length={max_length} before their replies differ (a long prompt)"


@torch.no_grad()
def score_file(rm: RewardModel, path: str | Path, *, limit: int | None = None, batch_size: int = 8,
               on_record: Callable[[dict], None] | None = None, samples: list[dict] | None = None) -> Scores:
    """Score every record of the file (the first `limit`); `samples`: its records as `read_scored` read them (a
    dataset_info.json's datasets: `read_scored(path, limit, dataset)`)."""
    from tunelab.data.collate import collate
    from tunelab.data.messages import with_default_system
    from tunelab.model.reward import sequence_scores

    if batch_size < 1 or (limit is not None and limit < 1):
        raise TunelabError(f"batch_size and limit must be 1 or more, got {batch_size} and {limit}")
    samples = read_scored(path, limit) if samples is None else samples
    for sample in samples:
        with_default_system(sample["prompt"], rm.system)
    device = next(rm.model.parameters()).device
    scores = Scores()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        rows, same = _rows(rm, chunk)
        batch = {k: v.to(device) for k, v in collate(rows, rm.tokenizer.pad_token_id).items()}
        values = sequence_scores(rm.model, batch).tolist()
        at = 0
        for i, sample in enumerate(chunk, start):
            if "chosen" in sample:
                result = {"record": i, "chosen": values[at], "rejected": values[at + 1],
                          "correct": values[at] > values[at + 1]}
                if same[i - start]:  # one sequence scored twice: neither right nor wrong
                    result.update(correct=None, skipped=_why_same(sample, rm.max_length))
                at += 2
            else:
                result = {"record": i, "score": values[at]}
                at += 1
            scores.records.append(result)
            if on_record is not None:
                on_record(result)
    return scores
