"""Preference pairs and KTO samples: recognise them, and read any of their shapes into one.

    record_kind(record)                      # "preference", "kto", or None for supervised data
    normalise_preference(record, where)      # {"prompt": [Message, ...], "chosen": Message, "rejected": Message,
                                             #  "tools"?: [Tool, ...]}
    normalise_kto(record, where)             # {"prompt": [Message, ...], "completion": Message, "label": bool,
                                             #  "tools"?: [Tool, ...]}

Messages are the canonical ones of `tunelab.data.formats.normalise` (content parts joined, tool calls parsed), the
prompt ends with a user (or tool) turn, chosen / rejected / completion are assistant replies.

Shapes read (each as its source means it):

* preference: LLaMA-Factory alpaca (``instruction``, ``input``, ``chosen``, ``rejected`` strings) and sharegpt
  (``conversations`` + ``chosen`` / ``rejected`` turns); LLaMA-Factory v1 (``chosen_messages`` /
  ``rejected_messages``); TRL (``prompt`` + ``chosen`` + ``rejected``, strings or message lists, or ``chosen`` /
  ``rejected`` whole conversations sharing their prompt); OpenAI (``input.messages`` + ``preferred_output`` /
  ``non_preferred_output``).
* KTO (``label``: true marks a desirable reply, false an undesirable one; LLaMA-Factory's ``kto_tag``): TRL
  (``prompt`` + ``completion``), LLaMA-Factory (``messages`` / ``conversations`` ending with the reply), alpaca.

A supervised run refuses both (`not_supervised_error`): training on every reply of a pair, or on the replies KTO
marks undesirable, teaches the model what the data says to avoid. A preference run (`objective`, see
`read_for_objective`) reads pairs; KTO reads KTO samples, and pairs as a desirable and an undesirable reply.
"""

from __future__ import annotations

from typing import Any, Optional

from tunelab.data.files import InvalidRecord
from tunelab.data.formats import detect_format, normalise
from tunelab.data.messages import fail

_PAIRS = (("chosen", "rejected"), ("chosen_messages", "rejected_messages"),
          ("preferred_output", "non_preferred_output"))
_KTO_REPLIES = frozenset(("completion", "output", "messages", "conversations"))
_READ = frozenset(("prompt", "chosen", "rejected", "chosen_messages", "rejected_messages", "preferred_output",
                   "non_preferred_output", "input", "instruction", "output", "system", "history", "conversations",
                   "messages", "tools", "completion", "label", "kto_tag"))


def record_kind(record: Any) -> Optional[str]:
    """'preference' for a chosen / rejected pair, 'kto' for a reply labelled good or bad, None otherwise."""
    if not isinstance(record, dict):
        return None
    for a, b in _PAIRS:
        if a in record and b in record:
            return "preference"
    if "kto_tag" in record or (kto_label(record.get("label")) is not None and not _KTO_REPLIES.isdisjoint(record)):
        return "kto"
    return None


def kto_label(value: Any) -> Optional[bool]:
    """A KTO label as a bool: true / false, or their text in any case ("true", "False": a CSV cell is text); None for
    anything else."""
    if isinstance(value, str):
        value = {"true": True, "false": False}.get(value.strip().lower(), value)
    return value if isinstance(value, bool) else None


def _bad_label(record: Any) -> Optional[str]:
    """The label of a record that would be a KTO sample but for its label's value (1, "yes", ...), else None."""
    if not isinstance(record, dict) or _KTO_REPLIES.isdisjoint(record):
        return None
    for key in ("label", "kto_tag"):
        if key in record and kto_label(record[key]) is None:
            return key
    return None


def not_supervised_error(kind: str, where: str, record: Any = None) -> InvalidRecord:
    """The error a supervised run gives for preference or KTO data (`record` names the fields found)."""
    if kind == "preference":
        found = next((f"{a!r} and {b!r}" for a, b in _PAIRS if isinstance(record, dict) and a in record
                      and b in record), "'chosen' and 'rejected'")
        return fail(where, f"this is preference data ({found}: a preferred and a rejected reply): supervised "
                           f"fine-tuning would learn the rejected reply as well as the preferred one",
                    "Train it with objective = 'dpo' (or 'orpo', 'simpo', 'reward'; see docs/PREFERENCE.md), and "
                    "give supervised runs data with one reply per question.")
    return fail(where, "this is KTO data (a reply with a true / false label): supervised fine-tuning would learn the "
                       "replies labelled false (undesirable) as if they were good",
                "Train it with objective = 'kto' (see docs/PREFERENCE.md), or keep only the records labelled true, "
                "without the label, for this supervised run.")


def read_for_objective(record: Any, objective: str, where: str) -> dict:
    """A record as the sample a preference objective trains on: a pair (`normalise_preference`), a KTO sample
    (`normalise_kto`), or for KTO a pair marked "unpaired" (its chosen reply desirable, its rejected one not)."""
    kind = record_kind(record)
    if objective == "kto":
        if kind == "kto":
            return normalise_kto(record, where)
        if kind == "preference":
            return {**normalise_preference(record, where), "unpaired": True}
        bad = _bad_label(record)
        if bad:
            raise fail(where, f"{bad!r} is {record[bad]!r}", "Use true (a desirable reply) or false (an undesirable "
                       "one).")
        raise fail(where, "objective = 'kto' needs a reply labelled desirable or not ('label' / 'kto_tag': true or "
                          "false), or a pair of a chosen and a rejected reply", "Give each record a prompt, a "
                   "'completion' and a 'label' (docs/DATA.md, \"Preference and KTO data\").")
    if kind == "preference":
        return normalise_preference(record, where)
    if kind == "kto":
        raise fail(where, f"this is KTO data (one reply with a true / false label), but objective = '{objective}' "
                          f"trains on pairs of a chosen and a rejected reply", "Set objective = 'kto', or give "
                   "pairs ('prompt', 'chosen', 'rejected').")
    raise fail(where, f"objective = '{objective}' trains on pairs of a chosen and a rejected reply, and this record "
                      f"has none", "Give each record a prompt, a 'chosen' and a 'rejected' reply (docs/DATA.md, "
               "\"Preference and KTO data\"), or train supervised data with objective = 'sft'.")


def unused_preference_fields(record: Any) -> list[str]:
    """Fields of a preference or KTO record that no shape reads."""
    return [k for k in record if k not in _READ] if isinstance(record, dict) else []


def sample_messages(sample: dict) -> list[dict]:
    """Every message of a pair or KTO sample (the same dicts: changing one changes the sample)."""
    replies = [sample[k] for k in ("chosen", "rejected", "completion") if k in sample]
    return list(sample["prompt"]) + replies


# --- preference pairs -----------------------------------------------------------------------------

def normalise_preference(record: Any, where: str = "record") -> dict:
    """Any preference shape -> {"prompt": [...], "chosen": Message, "rejected": Message, "tools"?: [...]}."""
    if record_kind(record) != "preference":
        raise fail(where, "not a preference pair (no 'chosen' and 'rejected', 'chosen_messages' and "
                          "'rejected_messages', or 'preferred_output' and 'non_preferred_output')",
                   "Give each record a prompt, a chosen reply and a rejected reply.")
    (chosen, chosen_fmt), (rejected, rejected_fmt) = _pair_records(record, where)
    good = normalise(chosen, chosen_fmt, where)
    bad = normalise(rejected, rejected_fmt, where)
    if _strip(good["messages"][:-1]) != _strip(bad["messages"][:-1]):
        raise fail(where, "the chosen and the rejected conversation differ before their last reply",
                   "A pair answers the same prompt: make everything before the two replies identical.")
    out = {"prompt": good["messages"][:-1], "chosen": good["messages"][-1], "rejected": bad["messages"][-1]}
    if good.get("tools"):
        out["tools"] = good["tools"]
    return out


def _pair_records(record: dict, where: str) -> tuple[tuple[dict, str], tuple[dict, str]]:
    """The chosen and the rejected side, each as a whole conversation record of a known format."""
    tools = {"tools": record["tools"]} if record.get("tools") else {}
    if "preferred_output" in record:  # OpenAI
        given = record.get("input") or {}
        if not isinstance(given, dict) or not isinstance(given.get("messages"), list):
            raise fail(where, "'input' should be {\"messages\": [...]}", "Put the prompt messages in input.messages.")
        tools = {"tools": given["tools"]} if given.get("tools") else {}
        return tuple(({"messages": given["messages"] + _as_list(record[key], where, key), **tools}, "messages")
                     for key in ("preferred_output", "non_preferred_output"))
    if "chosen_messages" in record:  # LLaMA-Factory v1: two whole conversations
        return tuple(({"messages": _as_list(record[key], where, key), **tools}, "messages")
                     for key in ("chosen_messages", "rejected_messages"))
    sides = []
    for key in ("chosen", "rejected"):
        reply = record[key]
        if "conversations" in record:  # LLaMA-Factory sharegpt: the reply is one more turn
            turn = reply if isinstance(reply, dict) else {"from": "gpt", "value": reply}
            sides.append(({"conversations": list(record["conversations"]) + [turn],
                           **_keep(record, "system"), **tools}, "sharegpt"))
        elif "instruction" in record or ("input" in record and "prompt" not in record):  # LLaMA-Factory alpaca
            if not isinstance(reply, str):
                raise fail(where, f"'{key}' should be the reply text", f"Make '{key}' a string.")
            sides.append(({**_keep(record, "instruction", "input", "system", "history"), "output": reply, **tools},
                          "alpaca"))
        elif "prompt" in record or "messages" in record:  # TRL (prompt), or messages + reply
            prompt = record.get("prompt", record.get("messages"))
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _as_list(prompt, where,
                                                                                                    "prompt")
            sides.append(({"messages": prompt + _as_list(reply, where, key), **_keep(record, "system"), **tools},
                          "messages"))
        elif isinstance(reply, list):  # TRL implicit prompt: two whole conversations sharing their start
            sides.append(({"messages": reply, **tools}, "messages"))
        else:
            raise fail(where, f"no prompt for the '{key}' reply", "Give the question as 'prompt' (or 'instruction', "
                       "'messages', 'conversations'), or make 'chosen' and 'rejected' whole conversations.")
    return sides[0], sides[1]


def _as_list(value: Any, where: str, key: str) -> list:
    """A reply given as text, one message or a list of messages -> a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        if "from" in value:  # a sharegpt turn
            value = {"role": "assistant" if value["from"] in ("gpt", "assistant") else value["from"],
                     "content": value.get("value")}
        return [value]
    if isinstance(value, list):
        return value
    raise fail(where, f"'{key}' should be text, a message or a list of messages, found {type(value).__name__}",
               f"Fix '{key}'.")


def _keep(record: dict, *keys: str) -> dict:
    return {k: record[k] for k in keys if k in record}


def _strip(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "train"} for m in messages]


# --- KTO ------------------------------------------------------------------------------------------

def normalise_kto(record: Any, where: str = "record") -> dict:
    """Any KTO shape -> {"prompt": [...], "completion": Message, "label": bool, "tools"?: [...]}."""
    if not isinstance(record, dict) or ("label" not in record and "kto_tag" not in record):
        raise fail(where, "not a KTO sample (no 'label')", "Give each record a reply and a true / false 'label'.")
    key = "label" if "label" in record else "kto_tag"
    label = kto_label(record[key])
    if label is None:
        raise fail(where, f"{key!r} is {record[key]!r}", "Use true (a desirable reply) or false (an undesirable one).")
    rest = {k: v for k, v in record.items() if k not in ("label", "kto_tag")}
    if "completion" in rest:  # TRL: prompt + completion, text or message lists
        prompt = rest.get("prompt", [])
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _as_list(prompt, where,
                                                                                                "prompt")
        rest = {"messages": prompt + _as_list(rest["completion"], where, "completion"), **_keep(rest, "tools",
                                                                                                "system")}
        fmt = "messages"
    else:
        fmt = detect_format(rest)
        if fmt is None or fmt == "text":
            raise fail(where, "a KTO record without a prompt and a reply", "Give it 'prompt' and 'completion', or "
                       "'messages' ending with the assistant reply.")
    sample = normalise(rest, fmt, where)
    out = {"prompt": sample["messages"][:-1], "completion": sample["messages"][-1], "label": label}
    if sample.get("tools"):
        out["tools"] = sample["tools"]
    return out
