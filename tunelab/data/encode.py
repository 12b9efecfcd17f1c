"""Samples -> token rows ``{"input_ids", "labels", "position_ids"}`` (docs/DESIGN.md, Rows).

A conversation is rendered by its template into pieces flagged trainable or not; each piece is tokenised with
``add_special_tokens=False`` (templates spell out BOS) and labelled with its own ids or -100. The first token of every
sample is -100 so a packed sample never learns to predict from its neighbour. A sample cut at ``max_length`` that
keeps no trained token is dropped (returns None) and counted by the caller.

Plain text (pretraining) is BOS + text + EOS, every token trained; text longer than max_length becomes several
samples rather than being cut off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

IGNORE_INDEX = -100


@dataclass
class Encoded:
    row: Optional[dict]
    """The sample's row, or None when it was dropped (no trained token left after truncation)."""
    full_length: int
    """Tokens before truncation (for the length histogram)."""

    @property
    def truncated(self) -> bool:
        return self.row is not None and len(self.row["input_ids"]) < self.full_length


def _finish(ids: list[int], labels: list[int], max_length: int) -> Encoded:
    full = len(ids)
    ids, labels = ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE_INDEX
    if labels.count(IGNORE_INDEX) == len(labels):  # C-speed "no trained token"
        return Encoded(None, full)
    return Encoded({"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}, full)


def _join(pieces: list[tuple[list[int], bool]], train_on: str, max_length: int) -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    for piece_ids, trainable in pieces:
        ids += piece_ids
        labels += piece_ids if (trainable or train_on == "all") else [IGNORE_INDEX] * len(piece_ids)
    return _finish(ids, labels, max_length)


def encode_messages(template, tokenizer, messages: list[dict], max_length: int, train_on: str = "assistant"
                    ) -> Optional[dict]:
    """One conversation -> its row, or None when truncation left nothing to train on."""
    segments = template.segments(messages)
    token_lists = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"] if segments else []
    return _join(list(zip(token_lists, [t for _, t in segments])), train_on, max_length).row


def text_pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.bos_token or "", text, tokenizer.eos_token or ""]


def _split_text(ids: list[int], max_length: int) -> list[Encoded]:
    return [_finish(ids[i:i + max_length], list(ids[i:i + max_length]), max_length)
            for i in range(0, max(len(ids), 1), max_length)]


_PROBE = ["Hello  world!\n", " leading space", "<|im_start|>user\n你好<|im_end|>", "<s>", "a</s>", "\n\n", ""]


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added). Uses the Rust tokenizer directly when it gives the same
    ids as the transformers wrapper (checked once per tokenizer): about twice as fast on large datasets."""
    fast = getattr(tokenizer, "_tunelab_backend_ok", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if fast is None:
        fast = backend is not None and hasattr(backend, "encode_batch_fast") and \
            [e.ids for e in backend.encode_batch_fast(_PROBE, add_special_tokens=False)] == \
            tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
        try:
            tokenizer._tunelab_backend_ok = fast
        except AttributeError:  # some tokenizer classes refuse new attributes: just check again next time
            pass
    if fast:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_batch(template, tokenizer, samples: list[dict], max_length: int, train_on: str) -> list[list[Encoded]]:
    """Encode many samples with one tokenizer call (the fast tokenizer batches in Rust).

    Returns, per sample, a list of Encoded: one for a conversation, one or more for long plain text.
    """
    texts: list[str] = []
    spans: list[tuple[int, int, list[bool] | None]] = []
    for sample in samples:
        start = len(texts)
        if "text" in sample:
            texts += [t for t in text_pieces(tokenizer, sample["text"]) if t]
            spans.append((start, len(texts), None))
        else:
            segments = template.segments(sample["messages"])
            texts += [t for t, _ in segments]
            spans.append((start, len(texts), [flag for _, flag in segments]))
    token_lists = token_ids(tokenizer, texts) if texts else []
    out: list[list[Encoded]] = []
    for start, end, flags in spans:
        if flags is None:
            ids = [t for piece in token_lists[start:end] for t in piece]
            out.append(_split_text(ids, max_length))
        else:
            out.append([_join(list(zip(token_lists[start:end], flags)), train_on, max_length)])
    return out
