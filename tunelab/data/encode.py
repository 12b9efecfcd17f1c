"""Samples -> token rows ``{"input_ids", "labels", "position_ids"}`` (docs/DESIGN.md, Rows).

A conversation is rendered by its template into pieces flagged trainable or not. The whole text is tokenised once,
with ``add_special_tokens=False`` (templates spell out BOS), so the ids are exactly ``tokenizer(text)``'s: tokenising
pieces separately can change ids where they meet (a sentencepiece leading space, a BPE merge across the join). Each
token is labelled with its id when the character it ends on lies in a trained piece, else -100 (tokenizers without
offsets fall back to tokenising the pieces one by one, and so does a template whose pieces meet in plain text,
``pieces_apart``: fewshot, as LLaMA-Factory encodes each message). The first token of every
sample is -100 so a packed sample never learns to predict from its neighbour. A sample cut at ``max_length`` that
keeps no trained token is dropped (returns None) and counted by the caller.

Plain text (pretraining) is BOS + text + EOS, every token trained; text longer than max_length becomes several
samples rather than being cut off, each after the first starting with the token the one before ended on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from tunelab.errors import TunelabError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    row: Optional[dict]
    """The sample's row, or None when it was dropped (no trained token left after truncation)."""
    full_length: int
    """Tokens before truncation (for the length histogram); of a preference unit's longest sequence."""
    all_tokens: Optional[int] = None
    """Tokens of all the unit's sequences before truncation, where there are several (else full_length)."""

    @property
    def truncated(self) -> bool:
        # the longest sequence of the row (position ids restart at each one) against its length before the cut
        return self.row is not None and max(self.row["position_ids"], default=-1) + 1 < self.full_length


def finish_row(ids: list[int], labels: list[int], max_length: int, full_length: Optional[int] = None,
               **fields) -> Encoded:
    """A sample's tokens and labels -> its row cut at max_length, its first label IGNORE_INDEX; None (dropped) when
    no trained token is left. full_length: its tokens before the cut (default len(ids)); fields: more of the row."""
    full = len(ids) if full_length is None else full_length
    ids, labels = ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE_INDEX
    if labels.count(IGNORE_INDEX) == len(labels):  # C-speed "no trained token"
        return Encoded(None, full)
    return Encoded({"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids))), **fields}, full)


def _join(pieces: list[tuple[list[int], bool]], train_on: str, max_length: int) -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    for piece_ids, trainable in pieces:
        ids += piece_ids
        labels += piece_ids if (trainable or train_on == "all") else [IGNORE_INDEX] * len(piece_ids)
    return finish_row(ids, labels, max_length)


def encode_messages(template, tokenizer, messages: list[dict], max_length: int, train_on: str = "assistant",
                    tools: Optional[list] = None) -> Optional[dict]:
    """One conversation -> its row, or None when truncation left nothing to train on."""
    sample = {"messages": messages, **({"tools": tools} if tools else {})}
    return encode_batch(template, tokenizer, [sample], max_length, train_on)[0][0].row


def _piece_starts(encoding, segments: list[tuple[str, bool]]) -> list[int]:
    """Index of the first token of each piece: the first token whose last character lies in that piece or later.
    (A token that straddles a join belongs to the piece holding its last character.)"""
    starts, char, n = [], 0, len(encoding.ids)
    for text, _ in segments:
        token = None
        for c in range(char, char + len(text)):  # a character no token covers (trimmed offsets): try the next
            token = encoding.char_to_token(c)
            if token is not None:
                break
        starts.append(n if token is None else token)
        char += len(text)
    for k in range(len(starts) - 2, -1, -1):  # an empty piece starts where the next one does
        starts[k] = min(starts[k], starts[k + 1])
    return starts


def _labels(ids: list[int], starts: list[int], segments: list[tuple[str, bool]], train_on: str) -> list[int]:
    if train_on == "all":
        return list(ids)
    labels: list[int] = []
    ends = starts[1:] + [len(ids)]
    for (_, trained), a, b in zip(segments, starts, ends):
        labels += ids[a:b] if trained else [IGNORE_INDEX] * (b - a)
    return labels


def _labels_from_offsets(ids: list[int], offsets, segments: list[tuple[str, bool]], train_on: str) -> list[int]:
    """Label each token by the piece holding the last character it covers (trained piece -> its id, else -100)."""
    if train_on == "all":
        return list(ids)
    starts = np.cumsum([0] + [len(text) for text, _ in segments[:-1]])
    flags = np.array([trained for _, trained in segments], dtype=bool)
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    last_char = np.where(offs[:, 1] > offs[:, 0], offs[:, 1] - 1, offs[:, 0])
    trained = flags[np.searchsorted(starts, last_char, side="right") - 1]
    return np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()


def text_pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.bos_token or "", text, tokenizer.eos_token or ""]


def _split_text(ids: list[int], max_length: int) -> list[Encoded]:
    """Pieces of at most max_length; each after the first starts with the previous one's last token as context (a
    row's first label is IGNORE_INDEX), so every token after BOS is trained once and no piece is a lone token."""
    step = max(max_length - 1, 1)
    return [finish_row(ids[i:i + max_length], list(ids[i:i + max_length]), max_length)
            for i in range(0, max(len(ids) - 1, 1), step)]


_PROBE = ["Hello  world!\n", " leading space", "<|im_start|>user\n你好<|im_end|>", "<s>", "a</s>", "\n\n", ""]


def _backend(tokenizer):
    """The Rust tokenizer when it gives the same ids as the transformers wrapper (checked once per tokenizer), else
    None. It is about twice as fast on large datasets and gives character offsets."""
    ok = getattr(tokenizer, "_tunelab_backend_ok", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if ok is None:
        ok = backend is not None and hasattr(backend, "encode_batch_fast") and \
            [e.ids for e in backend.encode_batch_fast(_PROBE, add_special_tokens=False)] == \
            tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
        try:
            tokenizer._tunelab_backend_ok = ok
        except AttributeError:  # some tokenizer classes refuse new attributes: just check again next time
            pass
    return backend if ok else None


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added)."""
    backend = _backend(tokenizer)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _ids_and_offsets(tokenizer, texts: list[str]):
    """The Rust encodings of the texts (ids and character offsets), a list of (ids, offsets), or None when the
    tokenizer has no offsets (a slow tokenizer)."""
    backend = _backend(tokenizer)
    if backend is not None:
        return backend.encode_batch(texts, add_special_tokens=False)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))
    return None


def encode_batch(template, tokenizer, samples: list[dict], max_length: int, train_on: str) -> list[list[Encoded]]:
    """Encode many samples with one tokenizer call per kind (the fast tokenizer batches in Rust).

    Returns, per sample, a list of Encoded: one for a conversation, one or more for long plain text. Preference pairs
    and KTO samples (tunelab.data.preference) are encoded by tunelab.data.encode_preference: one unit each, two for a
    pair trained by KTO.
    """
    if any("prompt" in s for s in samples):
        return _encode_preference(template, tokenizer, samples, max_length, train_on)
    text_pieces_: list[str] = []
    text_spans: dict[int, tuple[int, int]] = {}
    conversations: dict[int, list[tuple[str, bool]]] = {}
    for k, sample in enumerate(samples):
        if "text" in sample:
            start = len(text_pieces_)
            text_pieces_ += [t for t in text_pieces(tokenizer, sample["text"]) if t]
            text_spans[k] = (start, len(text_pieces_))
        else:
            try:
                conversations[k] = template.segments(sample["messages"], tools=sample.get("tools"))
            except TunelabError as exc:  # the template cannot render this conversation: say which
                raise TunelabError(f"{sample.get('where') or _first_words(sample['messages'])}: {exc}") from None
    text_ids = token_ids(tokenizer, text_pieces_) if text_pieces_ else []
    encoded = encode_segments(tokenizer, list(conversations.values()), max_length, train_on,
                              apart=template is not None and template.pieces_apart)
    by_sample = dict(zip(conversations, encoded))
    out: list[list[Encoded]] = []
    for k in range(len(samples)):
        if k in text_spans:
            start, end = text_spans[k]
            out.append(_split_text([t for piece in text_ids[start:end] for t in piece], max_length))
        else:
            out.append([by_sample[k]])
    return out


def _first_words(messages: list[dict]) -> str:
    """A conversation named by how it starts (text samples carry no file and line: a search finds the record)."""
    content = messages[0].get("content") if messages else ""
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return f"the sample whose first message starts {str(content or '')[:60]!r}"


def _encode_preference(template, tokenizer, samples: list[dict], max_length: int, train_on: str):
    from tunelab.data.encode_preference import encode_kto, encode_pairs  # it builds on this module

    kto = [k for k, s in enumerate(samples) if "completion" in s or s.get("unpaired")]
    pairs = [k for k, s in enumerate(samples) if "chosen" in s and not s.get("unpaired")]
    other = [k for k, s in enumerate(samples) if "prompt" not in s]
    out: list = [None] * len(samples)
    for k, units in zip(kto, encode_kto(template, tokenizer, [samples[k] for k in kto], max_length)):
        out[k] = units
    for k, unit in zip(pairs, encode_pairs(template, tokenizer, [samples[k] for k in pairs], max_length)):
        out[k] = [unit]
    for k, per_sample in zip(other, encode_batch(template, tokenizer, [samples[k] for k in other], max_length,
                                                 train_on) if other else []):
        out[k] = per_sample
    return out


def encode_segments(tokenizer, conversations: list[list[tuple[str, bool]]], max_length: int,
                    train_on: str, *, apart: bool = False) -> list[Encoded]:
    """Each conversation's pieces (a template's segments) -> its Encoded, one tokenizer call for all of them.
    `apart`: the pieces are tokenised one by one (the template's `pieces_apart`: LLaMA-Factory's fewshot)."""
    if not conversations:
        return []
    tokenised = None if apart else _ids_and_offsets(tokenizer, ["".join(text for text, _ in segs)
                                                                for segs in conversations])
    if tokenised is None:  # no offsets, or kept apart: tokenise the pieces one by one
        flat = [text for segs in conversations for text, _ in segs]
        ids = iter(token_ids(tokenizer, flat) if flat else [])
        return [_join([(next(ids), trained) for _, trained in segs], train_on, max_length) for segs in conversations]
    out = []
    for segs, encoding in zip(conversations, tokenised):
        if isinstance(encoding, tuple):
            ids = list(encoding[0])
            labels = _labels_from_offsets(ids, encoding[1], segs, train_on) if ids else []
        else:
            ids = encoding.ids
            labels = _labels(ids, _piece_starts(encoding, segs), segs, train_on)
        out.append(finish_row(ids, labels, max_length))
    return out
