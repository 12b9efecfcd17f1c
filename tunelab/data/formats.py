"""Detect each record's format and turn it into the canonical sample (docs/DATA.md, "Formats").

A sample is ``{"messages": [Message, ...], "tools"?: [Tool, ...]}`` or ``{"text": "..."}`` (continued
pretraining). Everything after this module sees only these two. How one message is read (content parts, tool calls,
training switches) is `tunelab.data.messages`.

Formats (``data_format``; 'auto' detects per record):

* ``alpaca``        {"instruction", "input"?, "output", "system"?, "history"?, "tools"?}
* ``messages``      {"messages": [{"role", "content", ...}, ...], "tools"?} (OpenAI; XTuner calls it ``openai``),
                    or a bare list of messages (a JSONL line ``[{"role": ...}, ...]``, as XTuner reads it)
* ``sharegpt``      {"conversations": [{"from", "value"}, ...], "system"?, "tools"?}; ``function_call`` and
                    ``observation`` turns are tool calls and results
* ``conversation``  {"conversation": [{"system"?, "input", "output", "output_with_loss"?}, ...]} (XTuner); one
                    turn with an empty input and no system is pretraining text, as in XTuner. Turns written as
                    messages ({"role", "content", "loss"?}, InternLM's Agent-FLAN) are read as ``messages``
* ``text``          {"text"} or .txt files (one sample per non-empty line)
* ``agent``         tool-use dialogues in the ``messages`` or ``sharegpt`` shape (MS-Agent replies and InternLM2's
                    own markup included: tunelab.data.agent_markup); 'auto' names records with tool turns so

Every mistake raises `InvalidRecord` (a `TunelabError`) naming the file, the line or record, and the field. Fields a
format does not read are listed by `unused_fields`, so the caller can report them instead of dropping them silently.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional

from tunelab.data import agent_markup
from tunelab.data import messages as msg
from tunelab.data.messages import MULTIMODAL_FIX, fail
from tunelab.errors import TunelabError

FORMATS = ("alpaca", "messages", "openai", "sharegpt", "conversation", "text", "agent")
ALIASES = {"openai": "messages"}  # XTuner's name for the OpenAI messages format

# The field that gives each format away, in the order we test them.
_SIGNATURE_FIELDS = [("messages", "messages"), ("conversations", "sharegpt"), ("conversation", "conversation"),
                     ("instruction", "alpaca"), ("text", "text")]
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   "system": "system", "function_call": "assistant", **dict.fromkeys(msg.TOOL_ROLES, "tool")}
_MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
                  "assistant": "assistant", **dict.fromkeys(msg.TOOL_ROLES, "tool")}
MEDIA_FIELDS = ("images", "image", "videos", "video", "audios", "audio")
_MEDIA = frozenset(MEDIA_FIELDS)

# Fields each format reads: the rest are reported by unused_fields. "[]" marks the fields of each list item.
_READ = {
    "alpaca": {"instruction", "prompt", "input", "output", "system", "history", "tools"},
    "messages": {"messages", "tools", "functions", "system"},
    "sharegpt": {"conversations", "system", "tools"},
    "conversation": {"conversation"},
    "text": {"text"},
}
_READ_ITEM = {
    "messages": {"role", "content", "tool_calls", "function_call", "tool_call_id", *msg.REASONING_KEYS, "loss",
                 "loss_weight", "weight", "refusal"},
    "conversations": {"from", "value", "role", "content", "tool_calls", "function_call", "tool_call_id",
                      *msg.REASONING_KEYS, "loss", "loss_weight", "weight", "refusal"},
    "conversation": {"system", "input", "output", "output_with_loss"},
}
# Why some common fields are not read, and what to do: shown next to the count in check-dataset.
UNUSED_HINTS = {
    "id": "an identifier, not trained on",
    "parallel_tool_calls": "an OpenAI API option: the calls are trained as written",
    "need_eos_token": "XTuner's end-token switch: tunelab's template decides the end of each reply",
    "sep": "XTuner's separator: tunelab's template decides separators",
    "name": "a participant name: the chat templates do not show it",
}


# --- detecting ------------------------------------------------------------------------------------

def canonical_format(fmt: str) -> str:
    return ALIASES.get(fmt, fmt)


def detect_format(record: Any) -> Optional[str]:
    if _is_message_list(record):
        return "agent" if _looks_like_agent(record) else "messages"
    if not isinstance(record, dict):
        return None
    for key, fmt in _SIGNATURE_FIELDS:
        if key in record:
            if fmt in ("messages", "sharegpt") and _looks_like_agent(record[key]):
                return "agent"
            return fmt
    if "output" in record and ("input" in record or "prompt" in record):
        return "alpaca"
    return None


def _is_message_list(record: Any) -> bool:
    return isinstance(record, list) and bool(record) and all(isinstance(m, dict) and "role" in m for m in record)


def _looks_like_agent(turns) -> bool:
    if not isinstance(turns, list):
        return False
    if agent_markup.is_internlm2(turns):
        return True
    for t in turns:
        if isinstance(t, dict):
            role = t.get("role", t.get("from"))
            if role in msg.TOOL_ROLES or role == "function_call" or t.get("tool_calls") \
                    or t.get("function_call"):
                return True
            if agent_markup.is_ms_agent(t.get("value")):
                return True
    return False


def _need(record: dict, key: str, where: str, fmt: str, kind=str):
    if key not in record:
        close = difflib.get_close_matches(key, [str(k) for k in record], n=1, cutoff=0.6)
        hint = f" Did you mean to call {close[0]!r} {key!r}?" if close else ""
        other = detect_format(record)
        if other and other != fmt:
            hint += (f" This record looks like the {other!r} format: a file holds one format (data_format says which, "
                     f"or with 'auto' the file's first record); move the record to a file of its own, or set "
                     f"data_format={other!r} if the whole file is in it.")
        raise fail(where, f"missing field {key!r} for the {fmt!r} format (found: {', '.join(map(repr, record))})",
                   hint.strip() or f"Add {key!r} to the record.")
    value = record[key]
    if not isinstance(value, kind):
        raise fail(where, f"field {key!r} should be {'text' if kind is str else 'a list'}, "
                          f"found {type(value).__name__}", f"Fix the value of {key!r}.")
    return value


def _text(value, where: str, field: str) -> str:
    return msg.read_content(value, role="user", where=where, field=field, images=None)["content"]


# --- one converter per format ---------------------------------------------------------------------

def _from_alpaca(r: dict, where: str, images, reply_needed: bool = True) -> list[dict]:
    if "instruction" in r or "prompt" in r or "input" not in r:
        instruction = _need(r, "prompt" if "prompt" in r and "instruction" not in r else "instruction", where,
                            "alpaca")
    else:  # {"input", "output"} (XTuner's default_map_fn shape): the input is the whole question
        instruction = ""
    output = _need(r, "output", where, "alpaca") if reply_needed or "output" in r else None  # a prompt alone
    extra = r.get("input") or ""
    if not isinstance(extra, str):
        raise fail(where, f"field 'input' should be text, found {type(extra).__name__}", "Fix the value of 'input'.")
    messages = [{"role": "system", "content": _text(r["system"], where, "system")}] if r.get("system") else []
    history = r.get("history") or []  # empty or null: no earlier turns
    if not isinstance(history, (list, tuple)):  # a number or a dict would be iterated (or fail to be) as pairs
        raise fail(where, f"'history' should be a list of [question, answer] pairs, found {type(history).__name__}",
                   "Fix 'history'.")
    for pair in history:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise fail(where, "'history' should be a list of [question, answer] pairs", "Fix 'history'.")
        messages += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
    user = "\n".join(part for part in (instruction, extra) if part)
    messages.append({"role": "user", "content": user})
    return messages + ([{"role": "assistant", "content": output}] if output is not None else [])


def _message_list_key(record: dict, fmt: str) -> Optional[str]:
    """The field holding the record's {"role", "content"} messages: 'messages' (OpenAI), or 'conversation' /
    'conversations' where every turn is such a message (InternLM's Agent-FLAN; role tags in ShareGPT's field) rather
    than XTuner's {"input", "output"} / ShareGPT's {"from", "value"} turns; None otherwise."""
    if fmt == "messages" or (fmt == "agent" and "messages" in record):
        return "messages"
    for key, shape, theirs in [("conversation", "conversation", ("input", "output")),
                               ("conversations", "sharegpt", ("from",))]:
        turns = record.get(key)
        if fmt in (shape, "agent") and _is_message_list(turns) and not any(k in t for t in turns for k in theirs):
            return key
    return None


def _from_messages(turns: list, where: str, images, key: str) -> list[dict]:
    return [_message(t, f"{key}[{i}]", where, images) for i, t in enumerate(turns) if t is not None]


def message_role(role) -> Optional[str]:
    """The canonical role (system, user, assistant, tool) of a message's `role`, None for one that is not read.
    OpenAI's `developer` is the system prompt of its newer models: a system message here, and in `tunelab serve`."""
    return _MESSAGE_ROLES.get(str(role).lower())


def _message(t: Any, at: str, where: str, images) -> dict:
    if not isinstance(t, dict) or "role" not in t:
        raise fail(where, f"{at} needs 'role' and 'content'", "Write it as {\"role\": ..., \"content\": ...}.")
    role = message_role(t["role"])
    if role is None:
        raise fail(where, f"{at} has role {t['role']!r}", "Use system, user, assistant or tool.")
    return msg.message(t, role, where, at, images=images)


def _one_system(record: dict, turns: list, where: str, field: str) -> None:
    """A top-level 'system' and a system message are two system prompts: which one the sample means is the user's
    call, so neither is dropped in silence."""
    if not record.get("system"):
        return
    for i, t in enumerate(turns):
        role = str(t.get("role", t.get("from", ""))).lower() if isinstance(t, dict) else ""
        if message_role(role) == "system":
            raise fail(where, f"two system prompts: the top-level 'system' and the system message {field}[{i}]",
                       "Keep one: delete the top-level 'system', or the system message.")


def _from_sharegpt(r: dict, where: str, images) -> list[dict]:
    turns = _need(r, "conversations", where, "sharegpt", list)
    _one_system(r, turns, where, "conversations")
    messages = [{"role": "system", "content": _text(r["system"], where, "system")}] if r.get("system") else []
    for i, t in enumerate(turns):
        at = f"conversations[{i}]"
        if isinstance(t, dict) and "from" not in t and "role" in t:  # role/content inside 'conversations'
            messages.append(_message(t, at, where, images))
            continue
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise fail(where, f"{at} needs 'from' and 'value'",
                       "Write each turn as {\"from\": \"human\"|\"gpt\", \"value\": ...}.")
        speaker = str(t["from"]).lower()
        role = _SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise fail(where, f"{at}.from is {t['from']!r}", f"Use one of {', '.join(sorted(_SHAREGPT_ROLES))}.")
        if speaker == "function_call":
            calls = msg.tool_calls(t["value"], where, f"{at}.value")
            reply = {"role": "assistant", "content": "", "tool_calls": calls}
            if not msg.trained(t, "assistant", where, at):
                reply["train"] = False
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "assistant" and not previous.get("tool_calls"):
                previous["tool_calls"] = calls  # "gpt" text then its "function_call": one reply
            else:
                messages.append(reply)
        elif role == "assistant" and agent_markup.is_ms_agent(t["value"]):
            messages += agent_markup.split_ms_agent(t["value"], where, at, msg.trained(t, role, where, at))
        else:
            messages.append(msg.message(t, role, where, at, images=images, content_key="value"))
    return messages


def _from_conversation(r: dict, where: str, images) -> list[dict] | str:
    turns = _need(r, "conversation", where, "conversation", list)
    is_message = [isinstance(t, dict) and "role" in t for t in turns]
    if any(is_message) and not all(is_message):  # (turns all messages are read as messages: _message_list_key)
        raise fail(where, f"conversation[{is_message.index(True)}] is a message ({{role, content}}) and "
                          f"conversation[{is_message.index(False)}] is not",
                   "Write the turns of 'conversation' in one shape: {\"role\", \"content\", \"loss\"?} messages "
                   "(Agent-FLAN), or {\"input\", \"output\"} turns (XTuner).")
    if len(turns) == 1 and isinstance(turns[0], dict) and not turns[0].get("input") and not turns[0].get("system"):
        return _text(_need(turns[0], "output", f"{where} turn 0", "conversation"), where, "output")  # pretraining
    messages = []
    for i, t in enumerate(turns):
        at = f"conversation[{i}]"
        if not isinstance(t, dict):
            raise fail(where, f"{at} is not an object", "Write turns as {\"input\": ..., \"output\": ...}.")
        if t.get("system"):
            if i > 0:
                raise fail(where, f"{at} has a 'system' after the first turn",
                           "Put the system prompt in the first turn only.")
            messages.append({"role": "system", "content": _text(t["system"], where, f"{at}.system")})
        user = msg.read_content(_need(t, "input", f"{where} turn {i}", "conversation"), role="user", where=where,
                                field=f"{at}.input", images=images)
        reply = {"role": "assistant", "content": _text(_need(t, "output", f"{where} turn {i}", "conversation"),
                                                        where, f"{at}.output")}
        if t.get("output_with_loss") is not None and not msg.trained({"loss": t["output_with_loss"]}, "assistant",
                                                                     where, f"{at}.output_with_loss"):
            reply["train"] = False
        messages += [{"role": "user", "content": user["content"]}, reply]
    return messages


def check_role_order(messages: list[dict], where: str, *, reply_needed: bool = True) -> None:
    """system? then user+, assistant, (tool+, assistant)*, user+, ... ending with an assistant reply (or, not
    `reply_needed`, with the turn a reply would answer: a prompt to predict from).

    Several user messages in a row are allowed (OpenAI's data has them, e.g. a question, then its image)."""
    allowed_after = {None: {"system", "user"}, "system": {"user"}, "user": {"user", "assistant"},
                     "assistant": {"user", "tool"}, "tool": {"tool", "assistant"}}
    previous = None
    for i, m in enumerate(messages):
        if m["role"] not in allowed_after[previous]:
            expected = " or ".join(sorted(allowed_after[previous]))
            raise fail(where, f"message {i} is {m['role']!r} but {expected} should come "
                              f"{'first' if previous is None else 'after ' + repr(previous)}",
                       "Order turns as system?, user, assistant, user, assistant, ... (tool results follow an "
                       "assistant tool call and precede the next assistant reply).")
        previous = m["role"]
    if previous != "assistant" and (reply_needed or previous in (None, "system")):
        raise fail(where, "the conversation does not end with an assistant reply" if previous else "no messages",
                   "Each sample needs at least one user question and an assistant answer after it (preference "
                   "pairs with 'chosen' / 'rejected' are for preference training, not this run).")


def normalise(record: Any, fmt: str, where: str, *, images: Optional[list] = None, reply_needed: bool = True) -> dict:
    """One raw record in format `fmt` -> {"messages": [...], "tools"?: [...]} or {"text": ...}.

    images: None in a text-only run (any image is an error pointing at multimodal training); a list to collect the
    record's image references into, in the order of their <image> placeholders (see tunelab.data.multimodal).
    reply_needed: False reads a conversation that ends before its reply too (`tunelab predict`'s prompts).
    Raises InvalidRecord.
    """
    fmt = canonical_format(fmt)
    markup_tools: list[dict] = []
    if _is_message_list(record) and fmt in ("messages", "agent"):
        record = {"messages": record}
    if not isinstance(record, dict):
        hint = " A list of messages is the 'messages' format: set data_format='messages' (or 'auto')." \
            if _is_message_list(record) else ""
        raise fail(where, f"a record should be a JSON object, found {type(record).__name__}",
                   f"Fix the record.{hint}")
    if images is None and not _MEDIA.isdisjoint(record):
        media = [k for k in MEDIA_FIELDS if record.get(k)]
        if media:
            raise fail(where, f"the record has {' and '.join(map(repr, media))} (a multimodal sample)",
                       MULTIMODAL_FIX)
    if fmt == "text":
        return {"text": _need(record, "text", where, "text")}
    if fmt == "alpaca":
        messages = _from_alpaca(record, where, images, reply_needed)
    elif key := _message_list_key(record, fmt):
        turns = _need(record, key, where, fmt, list)
        if agent_markup.is_internlm2(turns):
            turns, markup_tools = agent_markup.read_internlm2(turns, where, key)
        _one_system(record, turns, where, key)
        messages = _from_messages(turns, where, images, key)
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _text(record["system"], where, "system")})
    elif fmt in ("sharegpt", "agent"):
        messages = _from_sharegpt(record, where, images)
    elif fmt == "conversation":
        messages = _from_conversation(record, where, images)
        if isinstance(messages, str):
            return {"text": messages}
    else:
        raise TunelabError(f"unknown data_format {fmt!r}; use 'auto' or one of {', '.join(FORMATS)}")
    if any(m["role"] == "tool" for m in messages):
        msg.name_tool_results(messages, where)
    check_role_order(messages, where, reply_needed=reply_needed)
    sample = {"messages": messages}
    found = msg.tools(record.get("tools"), where) + msg.tools(record.get("functions"), where, "functions")
    if markup_tools and found:
        raise fail(where, "tool definitions twice: in 'tools' and in a system message named 'plugin' or "
                          "'interpreter'", "Keep one of the two.")
    if found or markup_tools:
        sample["tools"] = found or markup_tools
    return sample


def unused_fields(record: Any, fmt: str) -> list[str]:
    """Fields of `record` that format `fmt` does not read, e.g. ['id', 'messages[].name']."""
    fmt = canonical_format(fmt)
    if _is_message_list(record):
        record = {"messages": record}
    if not isinstance(record, dict):
        return []
    key = _message_list_key(record, fmt)
    if key:  # 'messages', or 'conversation' holding messages
        read = _READ["messages"] - {"messages"} | {key}
        items = {key: _READ_ITEM["messages"]}
    else:
        read = _READ.get("sharegpt" if fmt == "agent" else fmt, set())
        items = {k: _READ_ITEM[k] for k in read.intersection(_READ_ITEM)}
    out = [k for k in record if k not in read and k not in MEDIA_FIELDS]
    for k, known in items.items():
        out += unused_item_fields(record.get(k), k, known)
    return out


MESSAGE_FIELDS = frozenset(_READ_ITEM["conversations"])
"""The fields of a message (OpenAI's or ShareGPT's) that are read."""


def unused_item_fields(items: Any, key: str, known: frozenset = MESSAGE_FIELDS) -> list[str]:
    """Fields of the messages in `items` (the list in field `key`) that are not read, e.g. ['prompt[].name'] (a
    tool result's name is read, and the names of InternLM2's channels, 'plugin' and 'interpreter')."""
    if not isinstance(items, list):
        return []
    extra = set()
    for item in items:
        if isinstance(item, dict) and not known.issuperset(item):
            name_read = item.get("role", item.get("from")) in msg.TOOL_ROLES \
                or item.get("name") in agent_markup.CHANNEL_NAMES
            extra |= {k for k in item if k not in known and not (k == "name" and name_read)}
    return [f"{key}[].{k}" for k in sorted(extra)]
