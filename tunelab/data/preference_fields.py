"""What the shape of a preference pair or KTO sample reads, and the fields of a record it does not (reported by the
data step, as `tunelab.data.formats.unused_fields` reports a supervised record's): an 'id', a field of another shape
beside the one read ('prompt' beside alpaca's 'instruction'), a message's training switch."""

from __future__ import annotations

from typing import Any

from tunelab.data.formats import MEDIA_FIELDS, MESSAGE_FIELDS, detect_format, unused_fields, unused_item_fields
from tunelab.data.preference import record_kind


def unused_preference_fields(record: Any, read: set[str] | None = None) -> list[str]:
    """Fields of a preference or KTO record that the shape it is read as does not read: 'id', but also a field of
    another shape beside it ('prompt' beside alpaca's 'instruction', 'messages' beside TRL's 'prompt', 'kto_tag'
    beside 'label'), and its messages' fields ('prompt[].name'). `read`: `fields_read(record)`, where the caller has
    it."""
    if not isinstance(record, dict):
        return []
    read = fields_read(record) if read is None else read
    out = [k for k in record if k not in read and k not in MEDIA_FIELDS]
    for key in sorted(read & set(record) & _MESSAGE_LISTS):
        out += unused_item_fields(record[key], key, _MESSAGE_FIELDS)
    return out


_MESSAGE_LISTS = frozenset(("prompt", "chosen", "rejected", "completion", "messages", "conversations",
                            "chosen_messages", "rejected_messages", "preferred_output", "non_preferred_output"))
_SWITCHES = ("loss", "loss_weight", "weight")
_MESSAGE_FIELDS = MESSAGE_FIELDS - set(_SWITCHES)
SWITCH_HINTS = dict.fromkeys(_SWITCHES, "a training switch: a preference objective trains the final reply of each "
                             "sequence (chosen, rejected, a KTO sample's reply) whatever it says, and never the "
                             "prompt's replies: drop it")
"""Why a message's training switch is not read in a pair or KTO sample."""


def fields_read(record: dict) -> set[str]:
    """The top-level fields the shape of a pair or KTO sample reads (as `preference._pair_records` and
    `preference.normalise_kto` read them)."""
    kind = record_kind(record)
    if kind == "kto":
        label = "label" if "label" in record else "kto_tag"
        if "completion" in record:
            return {label, "completion", "prompt", "system", "tools"}
        rest = {k: v for k, v in record.items() if k not in ("label", "kto_tag")}
        fmt = detect_format(rest)
        return {label} | {k for k in rest if fmt not in (None, "text") and k not in unused_fields(rest, fmt)}
    if kind != "preference":
        return set()
    if "preferred_output" in record:  # OpenAI: the prompt and its tools are in 'input'
        return {"input", "preferred_output", "non_preferred_output"}
    if "chosen_messages" in record:  # LLaMA-Factory v1: two whole conversations
        return {"chosen_messages", "rejected_messages", "tools"}
    if "conversations" in record:
        return {"chosen", "rejected", "tools", "conversations", "system"}
    if "instruction" in record or ("input" in record and "prompt" not in record):
        return {"chosen", "rejected", "tools", "instruction", "input", "system", "history"}
    if "prompt" in record or "messages" in record:
        return {"chosen", "rejected", "tools", "prompt" if "prompt" in record else "messages", "system"}
    return {"chosen", "rejected", "tools"}  # TRL's implicit prompt: the whole conversations
