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
divergence between the policy and the reference (`with_kl_completions` chooses the reply; `kl_partner_problem`
says why data with a single reply, which would be its own partner, is refused).

``max_length`` applies to each sequence (prompt + reply, as in TRL and LLaMA-Factory); a sequence longer is cut at
the end, and a unit with a sequence left with nothing to train on is dropped (counted by the caller), as is a pair
whose two sequences the cut leaves the same tokens. Rows of preference units are packed up to two sequences' worth,
``2 * max_length`` tokens (`row_capacity`).
"""

from __future__ import annotations

import json
from typing import Optional

from tunelab.data.encode import Encoded, encode_segments

CHOSEN, REJECTED, DESIRABLE, UNDESIRABLE, KL = 0, 1, 2, 3, 4
"""The kinds of sequence in a preference row."""


def row_capacity(max_length: int) -> int:
    """Tokens a packed row of preference units holds: one unit of two max_length sequences."""
    return 2 * max_length


def conversation_pieces(template, prompt: list[dict], reply: dict, tools: Optional[list] = None
                        ) -> list[tuple[str, bool]]:
    """The template's pieces for prompt + reply, only the reply trained."""
    messages = [{**m, "train": False} if m.get("role") == "assistant" else m for m in prompt]
    messages.append({**{k: v for k, v in reply.items() if k != "train"}})
    return template.segments(messages, tools=tools)


def join_sequences(parts: list[Encoded], kinds: list[int]) -> Encoded:
    """Sequences encoded one by one -> one unit (None when any of them has nothing left to train on). Its
    full_length is its longest sequence's: max_length applies to each sequence, so that is what gets cut."""
    full, total = max(e.full_length for e in parts), sum(e.full_length for e in parts)
    if any(e.row is None for e in parts):
        return Encoded(None, full, total)
    row = {k: [v for e in parts for v in e.row[k]] for k in ("input_ids", "labels", "position_ids")}
    row["sequence_kind"] = list(kinds)
    return Encoded(row, full, total)


def encode_pairs(template, tokenizer, samples: list[dict], max_length: int) -> list[Encoded]:
    """Preference samples ({"prompt", "chosen", "rejected", "tools"?}) -> one Encoded unit each."""
    conversations = []
    for s in samples:
        tools = s.get("tools")
        conversations += [conversation_pieces(template, s["prompt"], s["chosen"], tools),
                          conversation_pieces(template, s["prompt"], s["rejected"], tools)]
    encoded = encode_segments(tokenizer, conversations, max_length, "assistant",
                              apart=template.pieces_apart)
    return [_unless_same(join_sequences(encoded[2 * i:2 * i + 2], [CHOSEN, REJECTED])) for i in range(len(samples))]


def _sequences(row: dict) -> tuple[list, list]:
    """The token ids of a unit's two sequences (chosen and rejected, or a KTO reply and its KL partner)."""
    split = row["position_ids"].index(0, 1)
    return row["input_ids"][:split], row["input_ids"][split:]


def _dropped(unit: Encoded) -> Encoded:
    return Encoded(None, unit.full_length, unit.all_tokens)


def _unless_same(unit: Encoded) -> Encoded:
    """A pair unit, dropped (row None) when its two sequences are the same tokens: cut at max_length before the
    replies differ, there is nothing left to prefer (every pair loss is flat at a tie and its accuracy counts it as
    wrong), as for a pair of the same reply, which is left out when read."""
    if unit.row is not None and len(set(map(tuple, _sequences(unit.row)))) == 1:
        return _dropped(unit)
    return unit


def _reply(sample: dict) -> dict:
    return sample["completion"] if "completion" in sample else sample["chosen"]


def kl_partner_problem(samples: list[dict]) -> str:
    """Why KTO cannot train these samples ('' when it can): its KL estimate pairs each prompt with another sample's
    reply, and with a single sample (or one reply for every sample) that reply is its own, and the estimate is the
    reward itself. Training refuses such data, as TRL refuses a batch of one; check-dataset says so as its verdict."""
    replies = {json.dumps(_reply(s), sort_keys=True, default=str) for s in samples}
    if not samples or len(replies) >= 2:
        return ""
    n = len(samples)
    return (f"objective = 'kto' needs at least 2 samples with different replies, and the data has "
            f"{n} sample{'' if n == 1 else 's'}{' all with the same reply' if n > 1 else ''}: KTO estimates its KL "
            f"term from each prompt paired with another sample's reply, and here the only reply is its own (the "
            f"estimate would be the reward itself). Add samples: replies to other prompts, desirable or not.")


def with_kl_completions(samples: list[dict]) -> list[dict]:
    """KTO samples, each given as "kl_completion" the reply of the next sample that answers another prompt (the
    first ones' after the last): a reply that does not answer its prompt, for the KL estimate. TRL takes the
    previous sample's reply within each batch, the same kind of estimate, and a neighbour asking the same question
    (data that lists a prompt's good and bad replies together) would give it a matching reply instead. A pair read
    for KTO, `unpaired`, gets one reply for both of its halves."""
    n = len(samples)
    prompts = [json.dumps(s["prompt"], sort_keys=True, default=str) for s in samples]
    partner, following = [0] * n, None  # following: the next index (over the list twice) with another prompt
    for i in reversed(range(2 * n)):
        if i + 1 < 2 * n and prompts[(i + 1) % n] != prompts[i % n]:
            following = i + 1
        if i < n:  # one prompt for every sample: the next sample's reply (kl_partner_problem has checked replies)
            partner[i] = following % n if following is not None and following - i < n else (i + 1) % n
    return [{**s, "kl_completion": _reply(samples[partner[i]])} for i, s in enumerate(samples)]


def encode_kto(template, tokenizer, samples: list[dict], max_length: int) -> list[list[Encoded]]:
    """KTO samples ({"prompt", "completion", "label", "kl_completion", "tools"?}, or a pair marked `unpaired`) ->
    per sample its Encoded units (one; two for a pair: the chosen reply desirable, the rejected one not)."""
    if samples and "kl_completion" not in samples[0]:
        samples = with_kl_completions(samples)
    conversations, kinds, owners = [], [], []
    for k, s in enumerate(samples):
        tools = s.get("tools")
        halves = [(s["chosen"], True), (s["rejected"], False)] if s.get("unpaired") else [(s["completion"],
                                                                                           s["label"])]
        for reply, good in halves:
            conversations += [conversation_pieces(template, s["prompt"], reply, tools),
                              conversation_pieces(template, s["prompt"], s["kl_completion"], tools)]
            kinds.append([DESIRABLE if good else UNDESIRABLE, KL])
            owners.append(k)
    encoded = encode_segments(tokenizer, conversations, max_length, "assistant",
                              apart=template.pieces_apart)
    out: list[list[Encoded]] = [[] for _ in samples]
    for i, (owner, unit_kinds) in enumerate(zip(owners, kinds)):
        out[owner].append(join_sequences(encoded[2 * i:2 * i + 2], unit_kinds))
    return [_unless_halves_same(units) for units in out]


def _unless_halves_same(units: list[Encoded]) -> list[Encoded]:
    """A pair read for KTO, both halves dropped when the cut at max_length leaves its chosen and rejected sequences
    the same tokens: the one sequence would train as desirable and as undesirable at once (as `_unless_same`)."""
    if len(units) == 2 and all(u.row is not None for u in units):
        if _sequences(units[0].row)[0] == _sequences(units[1].row)[0]:
            return [_dropped(u) for u in units]
    return units


def unpaired(sample: dict) -> dict:
    """A preference pair to be trained by KTO: its chosen reply a desirable sample, its rejected reply an undesirable
    one (TRL's unpair_preference_dataset); `encode_kto` makes the two units."""
    return {**sample, "unpaired": True}
