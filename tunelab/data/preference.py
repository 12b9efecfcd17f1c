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

An error about one side of a pair names it as the record has it ('rejected' is an empty list, prompt[1] has role
'bot', conversations[2] ...), not as the joined conversation read for that side.

A supervised run refuses both (`not_supervised_error`): training on every reply of a pair, or on the replies KTO
marks undesirable, teaches the model what the data says to avoid. A preference run (`objective`, see
`read_for_objective`) reads pairs; KTO reads KTO samples, and pairs as a desirable and an undesirable reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from tunelab.data.files import InvalidRecord
from tunelab.data.formats import MEDIA_FIELDS, detect_format, normalise
from tunelab.data.messages import MULTIMODAL_FIX, fail

_PAIRS = (("chosen", "rejected"), ("chosen_messages", "rejected_messages"),
          ("preferred_output", "non_preferred_output"))
_KTO_REPLIES = frozenset(("completion", "output", "messages", "conversations"))
IMAGES_FIX = ("tunelab trains preference and KTO objectives on text only (a run with a vision tower trains "
              "supervised data): remove the images and their <image> placeholders from these records to train their "
              "text")
"""The fix for pictures in preference and KTO data."""


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


_VISION_SFT_ONLY = "A run with a vision tower trains supervised data only (objective = 'sft'): "


def not_supervised_error(kind: str, where: str, record: Any = None, multimodal: bool = False) -> InvalidRecord:
    """The error a supervised run gives for preference or KTO data (`record` names the fields found). multimodal: the
    run has a vision tower, which trains supervised data only, so the fix is not another objective for this run."""
    if kind == "preference":
        found = next((f"{a!r} and {b!r}" for a, b in _PAIRS if isinstance(record, dict) and a in record
                      and b in record), "'chosen' and 'rejected'")
        problem = (f"this is preference data ({found}: a preferred and a rejected reply): supervised fine-tuning "
                   f"would learn the rejected reply as well as the preferred one")
        fix = (_VISION_SFT_ONLY + "give it one reply per question (e.g. only the chosen replies), and train the pairs "
               "on a text-only model with objective = 'dpo' (docs/PREFERENCE.md)." if multimodal else
               "Train it with objective = 'dpo' (or 'orpo', 'simpo', 'reward'; see docs/PREFERENCE.md), and give "
               "supervised runs data with one reply per question.")
        return fail(where, problem, fix)
    problem = ("this is KTO data (a reply with a true / false label): supervised fine-tuning would learn the replies "
               "labelled false (undesirable) as if they were good")
    fix = (_VISION_SFT_ONLY + "keep only the records labelled true, without the label, for it, and train KTO data on a "
           "text-only model with objective = 'kto' (docs/PREFERENCE.md)." if multimodal else
           "Train it with objective = 'kto' (see docs/PREFERENCE.md), or keep only the records labelled true, without "
           "the label, for this supervised run.")
    return fail(where, problem, fix)


def read_for_objective(record: Any, objective: str, where: str) -> dict:
    """A record as the sample a preference objective trains on: a pair (`normalise_preference`), a KTO sample
    (`normalise_kto`), or for KTO a pair marked "unpaired" (its chosen reply desirable, its rejected one not).
    Pictures are refused, as a text-only supervised run refuses them: the preference objectives train text only."""
    kind = record_kind(record)
    media = [k for k in MEDIA_FIELDS if isinstance(record, dict) and record.get(k)]
    if media and kind:
        raise fail(where, f"the record has {' and '.join(map(repr, media))} (a multimodal sample)", IMAGES_FIX + ".")
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
    chosen, rejected = _pair_records(record, where)
    good = _normalise_side(chosen, where)
    bad = _normalise_side(rejected, where)
    if _strip(good["messages"][:-1]) != _strip(bad["messages"][:-1]):
        raise fail(where, "the chosen and the rejected conversation differ before their last reply",
                   "A pair answers the same prompt: make everything before the two replies identical.")
    out = {"prompt": good["messages"][:-1], "chosen": good["messages"][-1], "rejected": bad["messages"][-1]}
    if good.get("tools"):
        out["tools"] = good["tools"]
    return out


@dataclass
class _Side:
    """One reply of a record with its prompt, as a whole conversation record of a known format, and where its parts
    are in the user's record (so that an error names the field the record has, not the joined conversation's)."""
    key: str
    """The record's field holding the reply ('chosen', 'non_preferred_output', 'completion', ...)."""
    reply: Any
    record: dict
    fmt: str
    paths: list = field(default_factory=list)
    """Per item of the joined conversation's message list, its place in the record ('prompt[0]', 'rejected')."""
    prompt_items: int = 0
    """How many of them are the prompt's."""
    prompt: Optional[dict] = None
    """The same record with a stand-in reply (the prompt alone, to tell its errors from the reply's), or None where the
    reply is a whole conversation."""


_STAND_IN = "(reply)"
_LIST_ITEM = re.compile(r"\b(messages|conversations)\[(\d+)\]")
_ORDER = re.compile(r"^message (\d+) is (?:'\w+' but .* should come (?:first|after '(\w+)'))?")
_NO_END = "does not end with an assistant reply"


def _pair_records(record: dict, where: str) -> tuple[_Side, _Side]:
    """The chosen and the rejected side, each as a whole conversation record of a known format."""
    tools = {"tools": record["tools"]} if record.get("tools") else {}
    if "preferred_output" in record:  # OpenAI
        given = record.get("input") or {}
        if not isinstance(given, dict) or not isinstance(given.get("messages"), list):
            raise fail(where, "'input' should be {\"messages\": [...]}", "Put the prompt messages in input.messages.")
        tools = {"tools": given["tools"]} if given.get("tools") else {}
        return tuple(_reply_side(key, record[key], given["messages"], "input.messages", {**tools}, where)
                     for key in ("preferred_output", "non_preferred_output"))
    if "chosen_messages" in record:  # LLaMA-Factory v1: two whole conversations
        return tuple(_whole_side(key, record[key], tools, where) for key in ("chosen_messages", "rejected_messages"))
    sides = []
    for key in ("chosen", "rejected"):
        reply = record[key]
        if "conversations" in record:  # LLaMA-Factory sharegpt: the reply is one more turn (or, as a list, more)
            replies = reply if isinstance(reply, list) else [reply if isinstance(reply, dict) else
                                                             {"from": "gpt", "value": reply}]
            turns = record["conversations"]
            if not isinstance(turns, list):
                raise fail(where, f"'conversations' should be a list of turns, found {type(turns).__name__}",
                           "Write it as [{\"from\": \"human\", \"value\": ...}, ...].")
            rest = {**_keep(record, "system"), **tools}
            paths = [f"{key}[{j}]" for j in range(len(replies))] if isinstance(reply, list) else [key]
            sides.append(_Side(key, reply, {"conversations": turns + replies, **rest}, "sharegpt",
                               [f"conversations[{i}]" for i in range(len(turns))] + paths, len(turns),
                               {"conversations": turns + [{"from": "gpt", "value": _STAND_IN}], **rest}))
        elif "instruction" in record or ("input" in record and "prompt" not in record):  # LLaMA-Factory alpaca
            if not isinstance(reply, str):
                raise fail(where, f"'{key}' should be the reply text, found {type(reply).__name__}",
                           f"Make '{key}' a string.")
            rest = {**_keep(record, "instruction", "input", "system", "history"), **tools}
            sides.append(_Side(key, reply, {**rest, "output": reply}, "alpaca", [], 0,
                               {**rest, "output": _STAND_IN}))
        elif "prompt" in record or "messages" in record:  # TRL (prompt), or messages + reply
            name = "prompt" if "prompt" in record else "messages"
            sides.append(_reply_side(key, reply, record[name], name, {**_keep(record, "system"), **tools}, where))
        elif isinstance(reply, list):  # TRL implicit prompt: two whole conversations sharing their start
            sides.append(_whole_side(key, reply, tools, where))
        else:
            raise fail(where, f"no prompt for the '{key}' reply", "Give the question as 'prompt' (or 'instruction', "
                       "'messages', 'conversations'), or make 'chosen' and 'rejected' whole conversations.")
    return sides[0], sides[1]


def _reply_side(key: str, reply: Any, prompt: Any, prompt_key: str, rest: dict, where: str) -> _Side:
    """A reply (text, a message or messages) after a prompt (text or messages) -> its side, a 'messages' record."""
    if isinstance(prompt, str):
        prompt, prompt_paths = [{"role": "user", "content": prompt}], [prompt_key]
    else:
        given, prompt = prompt, _as_list(prompt, where, prompt_key)
        prompt_paths = [prompt_key] if isinstance(given, dict) else [f"{prompt_key}[{i}]" for i in range(len(prompt))]
    replies = _as_list(reply, where, key)
    paths = prompt_paths + ([f"{key}[{j}]" for j in range(len(replies))] if isinstance(reply, list) else [key])
    return _Side(key, reply, {"messages": prompt + replies, **rest}, "messages", paths, len(prompt_paths),
                 {"messages": prompt + [{"role": "assistant", "content": _STAND_IN}], **rest})


def _whole_side(key: str, value: Any, tools: dict, where: str) -> _Side:
    """A side given as a whole conversation (LLaMA-Factory v1, TRL's implicit prompt)."""
    turns = _as_list(value, where, key)
    return _Side(key, value, {"messages": turns, **tools}, "messages", [f"{key}[{i}]" for i in range(len(turns))])


def _normalise_side(side: _Side, where: str) -> dict:
    """`normalise` of one side; its errors name the side ('prompt', 'rejected', ...) and the record's own fields."""
    try:
        return normalise(side.record, side.fmt, where)
    except InvalidRecord as exc:
        error = exc
    if side.prompt is not None:
        try:
            normalise(side.prompt, side.fmt, where)
        except InvalidRecord as exc:  # the prompt alone fails: the error is the prompt's
            raise _reworded(exc, where, side, "prompt")
    raise _reworded(error, where, side, side.key)


def _reworded(exc: InvalidRecord, where: str, side: _Side, blame: str) -> InvalidRecord:
    """An error of `normalise` on a side's joined conversation, about `blame` (the prompt, or the side's reply), in
    the record's terms: its list items named as the record has them, the part at fault first."""
    text = str(exc)
    body = text[len(where) + 2:] if text.startswith(f"{where}: ") else text
    body = body.replace(MULTIMODAL_FIX, IMAGES_FIX + ".")
    if _NO_END in body or body.startswith("no messages."):
        whole = side.prompt is None
        empty = "an empty list" if side.reply == [] else "empty" if side.reply in ({}, None) else None
        problem = f"{side.key!r} is {empty}" if empty else f"{side.key!r} {_NO_END}"
        fix = (f"Make {side.key!r} the whole conversation, ending with its assistant reply." if whole else
               f"Give {side.key!r} as the reply's text, one assistant message, or a list of messages ending with "
               f"the assistant's.")
        return fail(where, problem, fix)
    paths = side.paths

    def item(m: re.Match) -> str:
        i = int(m.group(2))
        return paths[i] if i < len(paths) else m.group(0)

    body = _LIST_ITEM.sub(item, body)
    order = _ORDER.match(body)
    if order:  # a message's place in the whole conversation (after a top-level system prompt)
        i = int(order.group(1)) - (1 if side.record.get("system") else 0)
        if blame == "prompt" and i == side.prompt_items:  # the stand-in reply: the prompt's end is wrong
            before = order.group(2)
            return fail(where, "the prompt is empty" if i <= 0 or before is None else
                        f"the prompt ends with a{'n' if before[0] in 'aeiou' else ''} {before} turn "
                        f"({paths[i - 1]})", "A prompt ends with the user's question (or a tool's result); "
                        + next((f"the replies go in {a!r} and {b!r}." for a, b in _PAIRS if side.key in (a, b)),
                               f"the reply goes in {side.key!r}."))
        if 0 <= i < len(paths):
            body = f"{paths[i]} is " + body[len(f"message {order.group(1)} is "):]
    if not any(body.startswith(p) for p in (blame, f"'{blame}'", *paths[:side.prompt_items] * (blame == "prompt"))):
        body = f"{blame}: {body}"
    return InvalidRecord(f"{where}: {body}")


def _as_list(value: Any, where: str, key: str) -> list:
    """A reply given as text, one message or a list of messages -> a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        if "from" in value:  # a sharegpt turn
            if "value" not in value:
                raise fail(where, f"{key!r} has 'from' but no 'value' (a ShareGPT turn needs both)",
                           "Write the turn as {\"from\": \"gpt\", \"value\": ...}.")
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
        side = _reply_side("completion", rest["completion"], rest.get("prompt", []), "prompt",
                           _keep(rest, "tools", "system"), where)
        sample = _normalise_side(side, where)
    else:
        fmt = detect_format(rest)
        if fmt is None or fmt == "text":
            raise fail(where, "a KTO record without a prompt and a reply", "Give it 'prompt' and 'completion', or "
                       "'messages' ending with the assistant reply.")
        try:
            sample = normalise(rest, fmt, where)
        except InvalidRecord as exc:  # worded for a KTO run, not a supervised one
            if _NO_END in str(exc):
                key = next((k for k in ("messages", "conversations") if k in rest), "output")
                raise fail(where, f"{key!r} {_NO_END}", f"A KTO sample's last message is the reply its label "
                           f"marks: end {key!r} with that assistant reply.")
            raise InvalidRecord(str(exc).replace(MULTIMODAL_FIX, IMAGES_FIX + "."))
    out = {"prompt": sample["messages"][:-1], "completion": sample["messages"][-1], "label": label}
    if sample.get("tools"):
        out["tools"] = sample["tools"]
    return out
