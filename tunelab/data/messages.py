"""One message of any source format -> the canonical Message (docs/DATA.md, "What a message may carry"; the
Messages the templates take: docs/DESIGN.md, "Contracts between the steps").

    {"role": "system"|"user"|"assistant"|"tool", "content": str,
     "tool_calls": [...], "reasoning_content": str, "name": str, "tool_call_id": str, "train": False}
     (the last five optional)

What each source says, and where it lands:

* content given as parts (OpenAI ``{"type": "text", "text"}``, LLaMA-Factory ``{"type": "text", "value"}``) is
  joined into text; ``reasoning`` parts become ``reasoning_content`` and ``tool_call`` parts ``tool_calls``; image
  parts become an ``<image>`` placeholder plus a reference when the caller collects images, an error otherwise.
* per-message training switches become ``train: False``: XTuner ``loss: false``, LLaMA-Factory ``loss_weight: 0``,
  OpenAI ``weight: 0``. A weight our loss cannot honour (0.5) is an error, never ignored.
* tool calls (OpenAI ``tool_calls``, legacy ``function_call``, LLaMA-Factory / glaive ``{"name", "arguments"}``)
  become ``{"type": "function", "function": {"name", "arguments": dict}}``; tool definitions the OpenAI
  ``{"type": "function", "function": {...}}`` shape. OpenAI's free-form (custom) tools and calls, whose input is
  text (InternLM2's code interpreter), keep their ``{"type": "custom", "custom": {...}}`` shape.
* agents' calls written as markup in the text (MS-Agent, InternLM2's own format) become tool calls and tool results
  in tunelab.data.agent_markup.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from tunelab.data.files import NUMBER_FIX, InvalidRecord, number_too_long

IMAGE_PLACEHOLDER = "<image>"
MULTIMODAL_FIX = ("Train it with multimodal training (LLaVA configs: `tunelab list-cfg -p llava`, docs/MULTIMODAL.md), "
                  "or remove the images and their <image> placeholders from the data of this text-only run.")
TOOL_ROLES = ("tool", "function", "observation", "ipython", "environment")
"""Roles of a tool / function result in the source formats; each becomes role 'tool'."""
_TEXT_PARTS = ("text", "input_text", "output_text", "refusal")
IMAGE_PARTS = ("image_url", "image", "input_image")
"""Content part types that carry a picture."""
_OTHER_MEDIA_PARTS = ("video_url", "video", "audio_url", "audio", "input_audio", "file")


def with_default_system(turns: Optional[list], system: str) -> None:
    """Put the default system prompt first in `turns` (a sample's messages or prompt), unless it has one already."""
    if system and turns is not None and (not turns or turns[0].get("role") != "system"):
        turns.insert(0, {"role": "system", "content": system})


def fail(where: str, problem: str, fix: str) -> InvalidRecord:
    return InvalidRecord(f"{where}: {problem}. {fix}")


# --- content --------------------------------------------------------------------------------------

def read_content(value: Any, *, role: str, where: str, field: str, images: Optional[list],
                 fixes: Optional[dict] = None) -> dict:
    """A message's content -> {"content": str, "reasoning_content"?: str, "tool_calls"?: [...]}.

    images: a list to collect image references into (their place in the text becomes <image>), or None in a
    text-only run, where an image is an error.
    fixes: the advice of the errors that differ for another caller than a data file (a chat request): "media" (a
    video / audio / file part), "type" (an unknown part type).
    """
    fixes = fixes or {}
    if value is None:
        return {"content": ""}
    if isinstance(value, str):
        return {"content": value}
    if isinstance(value, dict) and "type" not in value and not {"text", "value"} & set(value):
        # not a part but data: most often a tool result given as a JSON object, which templates take as text
        shown = json.dumps(json.dumps(value, ensure_ascii=False), ensure_ascii=False)
        raise fail(where, f"{field} is a JSON object, not text or a content part",
                   f"Write it as a string, e.g. {shown[:120]}.")
    if isinstance(value, dict):  # a single part
        value = [value]
    if not isinstance(value, list):
        raise fail(where, f"{field} should be text or a list of content parts, found {type(value).__name__}",
                   f"Make {field} a string.")
    text, reasoning, calls = [], [], []
    for i, part in enumerate(value):
        at = f"{field}[{i}]"
        if isinstance(part, str):
            text.append(part)
            continue
        if not isinstance(part, dict):
            raise fail(where, f"{at} should be a content part {{\"type\": \"text\", \"text\": ...}}, found "
                              f"{type(part).__name__}", f"Fix {at}.")
        kind = part.get("type", "text" if "text" in part else None)
        if kind in _TEXT_PARTS:
            text.append(_part_value(part, tuple(dict.fromkeys((kind, "text", "value"))), where, at))
        elif kind in ("reasoning", "thinking"):
            if role != "assistant":
                raise fail(where, f"{at} is a {kind!r} part in a {role!r} message", "Only assistant replies carry "
                           "reasoning; move it into the assistant reply or make it a text part.")
            reasoning.append(_part_value(part, (kind, "value", "text"), where, at))
        elif kind == "tool_call":
            if role != "assistant":
                raise fail(where, f"{at} is a 'tool_call' part in a {role!r} message",
                           "Only assistant replies call tools.")
            raw = part.get("value", part.get("tool_call", part.get("function")))
            found = parse_json_value(raw, where, f"{at}.value") if isinstance(raw, str) else raw
            calls += [tool_call(c, where, f"{at}.value") for c in (found if isinstance(found, list) else [found])]
        elif kind in IMAGE_PARTS:
            if images is None:
                raise fail(where, f"{at} is an image ({kind!r} part)", MULTIMODAL_FIX)
            images.append(image_reference(part, kind, where, at))
            text.append(IMAGE_PLACEHOLDER)
        elif kind in _OTHER_MEDIA_PARTS:
            raise fail(where, f"{at} is a {kind!r} part", fixes.get("media", "tunelab trains on text and images "
                       "only: remove video, audio and file parts (and their placeholders) from the data."))
        else:
            raise fail(where, f"{at} has type {kind!r}", fixes.get("type", "Content parts are 'text', 'reasoning', "
                       "'tool_call' or 'image_url'; fix the type or convert the record with dataset_map_fn."))
    out = {"content": "".join(text)}
    if reasoning:
        out["reasoning_content"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out


def _part_value(part: dict, keys: tuple, where: str, at: str) -> str:
    for key in keys:
        if isinstance(part.get(key), str):
            return part[key]
    raise fail(where, f"{at} has no text (looked for {', '.join(map(repr, keys))})",
               "Write it as {\"type\": \"text\", \"text\": \"...\"}.")


def image_reference(part: dict, kind: str, where: str, at: str) -> Any:
    """What an image part points at: a path / URL string (OpenAI image_url.url, LLaMA-Factory value), or the
    part's own value as given (e.g. bytes of a parquet image). None for a bare {"type": "image"} whose picture is
    in the record's `images` list."""
    value = part.get(kind, part.get("value", part.get("url", part.get("path", part.get("image")))))
    if isinstance(value, dict):
        value = value.get("url", value.get("path", value))
    return value


CALL_EXAMPLE = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TOOLS_EXAMPLE = ('[{"type": "function", "function": {"name": "get_weather", "description": "...", '
                 '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]')


def parse_json_value(text: str, where: str, field: str, example: str = CALL_EXAMPLE) -> Any:
    """A field that holds JSON as text (tool calls, tool definitions): `example` shows the fix."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise fail(where, f"{field} is not valid JSON ({getattr(exc, 'msg', 'nested too deeply')}): {text[:80]!r}",
                   f"Write {field} as JSON, e.g. {example}.") from None
    except ValueError as exc:  # json lets Python's limit on a number's digits out as a plain ValueError
        too_long = number_too_long(exc)
        if too_long is None:
            raise
        raise fail(where, f"{field}: {too_long}", NUMBER_FIX) from None


# --- tools ----------------------------------------------------------------------------------------

def call_name(call: dict) -> str:
    """The name of the tool a canonical call calls, a function or a free-form (custom) tool."""
    return call["custom"]["name"] if call.get("type") == "custom" else call["function"]["name"]


def tool_call(call: Any, where: str, field: str) -> dict:
    """Any spelling of one tool call -> {"type": "function", "function": {"name": str, "arguments": dict}}, or
    OpenAI's free-form call {"type": "custom", "custom": {"name": str, "input": str}} (a code cell: text, not JSON
    arguments; which templates write it: tunelab.data.template_fit)."""
    if not isinstance(call, dict):
        raise fail(where, f"{field} should be a tool call object, found {type(call).__name__}",
                   "Write it as {\"name\": ..., \"arguments\": {...}}.")
    if call.get("type") == "custom":
        return _custom_call(call, where, field)
    if call.get("type") not in (None, "function"):
        raise fail(where, f"{field} is a tool call of type {call['type']!r}", "Tool calls are of type \"function\" "
                   "(a name and JSON arguments) or \"custom\" (a name and free-form text input).")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise fail(where, f"{field} has no function name", "Give each tool call a \"name\".")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        args = parse_json_value(args, where, f"{field} arguments") if args.strip() else {}
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise fail(where, f"{field} arguments should be a JSON object, found {type(args).__name__}",
                   "Write the arguments as {\"parameter\": value, ...}.")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]  # lets tool results be matched to their call
    return out


def _custom_call(call: dict, where: str, field: str) -> dict:
    custom = call.get("custom")
    if not isinstance(custom, dict) or not isinstance(custom.get("name"), str) or not custom["name"]:
        raise fail(where, f"{field} is a custom call without a \"custom\": {{\"name\": ...}}",
                   "Write it as {\"type\": \"custom\", \"custom\": {\"name\": ..., \"input\": \"...\"}}.")
    if not isinstance(custom.get("input", ""), str):
        raise fail(where, f"{field}.custom.input should be text, found {type(custom['input']).__name__}",
                   "A custom (free-form) call's input is a string, e.g. the code to run.")
    out = {"type": "custom", "custom": {"name": custom["name"], "input": custom.get("input", "")}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def tool_calls(value: Any, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        value = parse_json_value(value, where, field)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise fail(where, f"{field} should be a list of tool calls, found {type(value).__name__}", f"Fix {field}.")
    return [tool_call(c, where, f"{field}[{i}]") for i, c in enumerate(value)]


def tools(value: Any, where: str, field: str = "tools") -> list[dict]:
    """Tool definitions (a list, or a JSON string of one, as LLaMA-Factory stores them) -> OpenAI-shaped tools."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        value = parse_json_value(value, where, field, TOOLS_EXAMPLE)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise fail(where, f"{field} should be a list of tool definitions, found {type(value).__name__}",
                   f"Fix {field}.")
    out = []
    for i, tool in enumerate(value):
        if isinstance(tool, dict) and tool.get("type") == "custom":  # a free-form tool, e.g. InternLM2's interpreter
            if not isinstance(tool.get("custom"), dict) or not isinstance(tool["custom"].get("name"), str):
                raise fail(where, f"{field}[{i}] is a custom tool without a \"custom\": {{\"name\": ...}}",
                           "Write it as {\"type\": \"custom\", \"custom\": {\"name\": ..., \"description\": ...}}.")
            out.append({"type": "custom", "custom": tool["custom"]})
            continue
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise fail(where, f"{field}[{i}] is not a tool definition with a name",
                       "Write tools as [{\"type\": \"function\", \"function\": {\"name\": ..., \"description\": ..., "
                       "\"parameters\": {...}}}].")
        out.append({"type": "function", "function": fn})
    return out


def name_tool_results(messages: list[dict], where: str = "the record") -> None:
    """Give each tool result the name of the function it answers (by tool_call_id, else by position), and the id of
    that call where it has one: templates that write ids (Mistral) pair each result with its call by it.

    A reply with tool calls followed by more results than it made calls is an error: the results past them answer
    no call (a result repeated, or a call missing), and the templates would show them as answers all the same
    (Mistral's numbered as calls that were never made). Results after a reply without structured calls are read as
    written: its text may hold the call (ReAct's 'Action: ...')."""
    calls: list[dict] = []
    position = 0
    for m in messages:
        if m["role"] == "assistant":
            calls, position = m.get("tool_calls", []), 0
        elif m["role"] != "tool":  # results after a user turn are out of order (check_role_order says so)
            calls = []
        elif calls and position == len(calls):
            raise _extra_result(messages, m, calls, where)
        else:
            call_id = m.get("tool_call_id")
            match = next((c for c in calls if call_id and c.get("id") == call_id), None)
            ids = [c["id"] for c in calls if c.get("id")]
            if call_id and match is None and ids:  # the result of another call, or an id mistyped
                raise fail(where, f"a tool result's tool_call_id {call_id!r} answers none of the calls before it "
                                  f"({', '.join(map(repr, ids))})", "Give each result the id of the call it answers.")
            if match is None and position < len(calls):
                match = calls[position]
            if match is not None and "name" not in m:
                m["name"] = call_name(match)
            if match is not None and not call_id and match.get("id"):
                m["tool_call_id"] = match["id"]
            position += 1


def _extra_result(messages: list[dict], result: dict, calls: list[dict], where: str) -> InvalidRecord:
    """The error for a tool result past the calls of the reply before it, with the counts and how it starts."""
    at = next(i for i, m in enumerate(messages) if m is result)
    following = at
    while following + 1 < len(messages) and messages[following + 1]["role"] == "tool":
        following += 1
    results = len(calls) + following - at + 1
    names = ", ".join(dict.fromkeys(map(call_name, calls)))
    text = " ".join(str(result.get("content") or "").split())
    shown = repr(text[:40] + ("..." if len(text) > 40 else ""))
    return fail(where, f"an assistant reply makes {len(calls)} tool call{'' if len(calls) == 1 else 's'} ({names}) "
                       f"and {results} tool results follow it: result {len(calls) + 1} ({shown}) answers no call",
                "Give each call one result: remove the extra result, or add the call it answers to the reply.")


# --- training switches ----------------------------------------------------------------------------

def trained(raw: dict, role: str, where: str, field: str) -> bool:
    """Whether this message is trained on: False where the source marks an assistant reply as context only."""
    verdict = True
    for key in ("loss", "loss_weight", "weight"):
        if key not in raw or raw[key] is None:
            continue
        value = raw[key]
        at = f"{field}.{key}"
        if key == "loss":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if value not in (True, False, 0, 1):  # True == 1, False == 0
                raise fail(where, f"{at} is {raw[key]!r}", "Use true (train on this reply) or false (context only).")
            on = bool(value)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
                raise fail(where, f"{at} is {value!r}: tunelab's loss weighs every trained token the same, so it "
                                  f"cannot train a reply at weight {value!r}",
                           f"Use {key} 1 (trained) or 0 (context only), or repeat a sample to weigh it more.")
            on = value == 1
        if role != "assistant":
            if on:
                raise fail(where, f"{at} asks to train on a {role!r} message", "tunelab trains on assistant "
                           "replies only: remove it or set it to 0 / false (train_on = 'all' trains every token).")
            continue
        verdict = verdict and on
    return verdict


REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
"""The names a reply's reasoning comes under in source data (DeepSeek's, some exports', newer vLLM's): read on an
assistant message, refused on any other."""


def message(raw: dict, role: str, where: str, field: str, *, images: Optional[list], content_key: str = "content"
            ) -> dict:
    """One source message (already given its canonical role) -> the canonical Message."""
    content = raw.get(content_key)
    if content is None and role == "assistant" and isinstance(raw.get("refusal"), str):
        content = raw["refusal"]  # OpenAI: a refusal is the reply
    out = {"role": role, **read_content(content, role=role, where=where, field=f"{field}.{content_key}",
                                        images=images)}
    if role == "assistant":
        calls = out.pop("tool_calls", [])
        for key in ("tool_calls", "function_call"):  # function_call: OpenAI's legacy single call
            if raw.get(key):
                calls += tool_calls(raw[key], where, f"{field}.{key}")
        if calls:
            out["tool_calls"] = calls
        # the same text under two names (a reply logged from `tunelab serve`, or vLLM for a while) is one reasoning
        for text in dict.fromkeys(raw[key] for key in REASONING_KEYS if isinstance(raw.get(key), str) and raw[key]):
            out["reasoning_content"] = out.get("reasoning_content", "") + text
        if not trained(raw, role, where, field):
            out["train"] = False
    else:
        trained(raw, role, where, field)  # raises on a switch that asks to train a non-reply
        for key in (*REASONING_KEYS, "tool_calls", "function_call"):
            if raw.get(key):
                raise fail(where, f"{field}.{key} on a {role!r} message", f"Only assistant replies carry {key}.")
    if role == "tool":
        if isinstance(raw.get("name"), str) and raw["name"]:
            out["name"] = raw["name"]
        if isinstance(raw.get("tool_call_id"), str):
            out["tool_call_id"] = raw["tool_call_id"]
    return out


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def refuse_lone_surrogates(sample: dict, where: str) -> None:
    """A sample (supervised, a pair or a KTO sample) with half of a UTF-16 surrogate pair in a text ("\\ud83d": an emoji
    cut in two) is refused naming that text: it is valid in a JSON string but is no character, and the tokenizer's
    own error names no record."""
    if "text" in sample:
        places = [("'text'", sample)]
    elif "messages" in sample:
        places = [(f"messages[{i}] ({m.get('role')})", m) for i, m in enumerate(sample["messages"])]
    else:
        places = [(f"prompt[{i}] ({m.get('role')})", m) for i, m in enumerate(sample["prompt"])]
        places += [(repr(k), sample[k]) for k in ("chosen", "rejected", "completion") if k in sample]
    for name, holder in places:
        for key in ("text", "content", "reasoning_content"):
            found = LONE_SURROGATE.search(holder.get(key) or "")
            if found:
                raise fail(where, f"{name} holds half of a UTF-16 surrogate pair ({found.group()!r} at character "
                           f"{found.start()} of its {key}), which is not a character: the tokenizer cannot read it",
                           "Remove it, or repair the text that was cut (e.g. an emoji split in two).")
