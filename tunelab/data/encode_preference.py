"""Preference pairs and KTO samples -> token rows of several sequences (docs/DESIGN.md, Rows).

A pair becomes one unit of two sequences, prompt + chosen then prompt + rejected, each tokenised as the whole text
of its conversation (the ids are exactly ``tokenizer(text)``'s, as for supervised data), each with its own
position ids restarting at 0. Attention never crosses a restart (the varlen path, or the block-diagonal mask
transformers builds from position_ids), so the two replies never see each other, and packing moves the unit as a
whole: a pair is never split across rows or micro-batches. Only the last reply of each sequence is trained (labels);
earlier turns of a multi-turn prompt are context. The unit lists the kind of each sequence (``sequence_kind``):
``[CHOSEN, REJECTED]``.

Sharing one copy of the prompt between the two replies would need attention that lets the rejected reply see the
prompt but not the chosen reply, which varlen attention over position ids cannot express; the prompt is therefore
run twice (as TRL and LLaMA-Factory do), rendered once by the template for both replies.

A KTO sample becomes a unit of its own sequence (``DESIRABLE`` or ``UNDESIRABLE``, from its label) and a ``KL``
sequence: its prompt with another sample's reply, which the KTO loss uses (without gradient) to estimate the KL
divergence between the policy and the reference (`with_kl_completions` chooses the reply).

``max_length`` applies to each sequence (prompt + reply, as in TRL and LLaMA-Factory); a sequence longer is cut at
the end, and a unit with a sequence left with nothing to train on is dropped (counted by the caller). Rows of
preference units are packed up to two sequences' worth, ``2 * max_length`` tokens (`row_capacity`).
"""

from __future__ import annotations

from typing import Optional

from tunelab.data.encode import Encoded, encode_segments

CHOSEN, REJECTED, DESIRABLE, UNDESIRABLE, KL = 0, 1, 2, 3, 4
"""The kinds of sequence in a preference row."""


def row_capacity(max_length: int) -> int:
    """Tokens a packed row of preference units holds: one unit of two max_length sequences."""
    return 2 * max_length


def _conversation(template, prompt: list[dict], reply: dict, tools: Optional[list]) -> list[tuple[str, bool]]:
    """The template's pieces for prompt + reply, only the reply trained."""
    messages = [{**m, "train": False} if m.get("role") == "assistant" else m for m in prompt]
    messages.append({**{k: v for k, v in reply.items() if k != "train"}})
    return template.segments(messages, tools=tools)


def _unit(parts: list[Encoded], kinds: list[int]) -> Encoded:
    """Sequences encoded one by one -> one unit (None when any of them has nothing left to train on)."""
    full = sum(e.full_length for e in parts)
    if any(e.row is None for e in parts):
        return Encoded(None, full)
    row = {k: [v for e in parts for v in e.row[k]] for k in ("input_ids", "labels", "position_ids")}
    row["sequence_kind"] = list(kinds)
    return Encoded(row, full)


def encode_pairs(template, tokenizer, samples: list[dict], max_length: int) -> list[Encoded]:
    """Preference samples ({"prompt", "chosen", "rejected", "tools"?}) -> one Encoded unit each."""
    conversations = []
    for s in samples:
        tools = s.get("tools")
        conversations += [_conversation(template, s["prompt"], s["chosen"], tools),
                          _conversation(template, s["prompt"], s["rejected"], tools)]
    encoded = encode_segments(tokenizer, conversations, max_length, "assistant")
    return [_unit(encoded[2 * i:2 * i + 2], [CHOSEN, REJECTED]) for i in range(len(samples))]


def with_kl_completions(samples: list[dict]) -> list[dict]:
    """KTO samples, each given the reply of the next sample (the last one the first's) as "kl_completion": a reply
    that does not answer its prompt, as TRL pairs them for the KL estimate."""
    n = len(samples)
    return [{**s, "kl_completion": samples[(i + 1) % n]["completion"]} for i, s in enumerate(samples)]


def encode_kto(template, tokenizer, samples: list[dict], max_length: int) -> list[Encoded]:
    """KTO samples ({"prompt", "completion", "label", "kl_completion", "tools"?}) -> one Encoded unit each."""
    conversations = []
    for s in samples:
        tools = s.get("tools")
        conversations += [_conversation(template, s["prompt"], s["completion"], tools),
                          _conversation(template, s["prompt"], s["kl_completion"], tools)]
    encoded = encode_segments(tokenizer, conversations, max_length, "assistant")
    return [_unit(encoded[2 * i:2 * i + 2], [DESIRABLE if s["label"] else UNDESIRABLE, KL])
            for i, s in enumerate(samples)]


def unpair(samples: list[dict]) -> list[dict]:
    """Preference pairs as KTO samples: the chosen reply desirable, the rejected one undesirable (TRL's
    unpair_preference_dataset), so KTO trains on pair data too."""
    out = []
    for s in samples:
        extra = {"tools": s["tools"]} if s.get("tools") else {}
        out.append({"prompt": s["prompt"], "completion": s["chosen"], "label": True, **extra})
        out.append({"prompt": s["prompt"], "completion": s["rejected"], "label": False, **extra})
    return out
