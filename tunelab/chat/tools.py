"""Tool calls in a served conversation: the request's tools and past calls into the template, the reply's calls out.

The model was trained to write a tool call the way its chat template renders one, so that rendering is also how a
reply is read back: `call_format(template)` renders one probe call and keeps the marker written before its JSON
(`<tool_call>` for Qwen2.5 / Qwen3, `[TOOL_CALLS]` for Mistral, `<|tool_call|>` for Phi-4-mini, `<|plugin|>` for
InternLM2, nothing for Llama 3.1, whose call is the bare JSON), and the text after it (`</tool_call>`).
`split_calls(text, fmt)` then finds each marker + JSON in a reply, and each call to a free-form tool the request
offers (InternLM2's code interpreter: tunelab.chat.free_form). GLM-4 writes the function's name on a line of its
own and its arguments below it (`name_line`); a family whose template writes calls in yet another way has no format:
its replies come back as text, calls included. A call read back gets OpenAI's `call_...` id, or where the template
writes ids (Mistral: 9 letters and digits, numbering calls with any other id) an id of that shape, which it then keeps.

The same rendering tells how a call starts (`CallFormat.reply_start`): `tool_choice` "required" or a named function
(`choose`) starts the reply with that text in the prompt, and the model writes the rest of the call. It also tells
what follows a call's arguments up to the end of the turn (`after_arguments`) and what lies between two calls
(`between_calls`), from which `tunelab.chat.grammar` builds the grammar that holds the rest to the tools' schemas.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import string
import uuid
from dataclasses import dataclass

from tunelab.chat.free_form import FreeFormCall, free_form_calls, split_free_form
from tunelab.chat.reasoning import REASONING, WIRE_NAMES
from tunelab.chat.requests import RequestError, shown
from tunelab.data import messages as canonical
from tunelab.data.templates import (PROBE_ARGUMENTS, PROBE_SECOND_TOOL, PROBE_TOOL, probe_call_reply,
                                    templates_writing_tool_calls)

_ID_CHARACTERS = string.ascii_letters + string.digits
ID_SLOT = "\x00"
"""Where `CallFormat.after_arguments` and `between_calls` hold a call's id (Mistral's): any `id_length` letters and
digits go there (a NUL, which no template writes)."""


@dataclass(frozen=True)
class CallFormat:
    marker: str
    """Written right before each call's JSON ('' where the JSON stands alone)."""
    closer: str
    """Written after the JSON, up to the end of the turn ('' where nothing is)."""
    name_line: bool = False
    """The reply is the function's name, a newline and its arguments as JSON (GLM-4), one call a reply."""
    id_length: int = 0
    """The template writes each call's id, of this many letters and digits (Mistral v0.3 / Nemo: 9; it numbers a
    call given another id, OpenAI's `call_...`): the reply's calls get ids of that shape, so that the calls and
    results a client sends back keep their ids in the prompt. 0: it writes no id (ids are OpenAI's `call_...`)."""
    before_name: str = ""
    """The reply's text before the function's name, as the template writes a call (Qwen2.5: '<tool_call>\\n{"name": "',
    Llama 3.1: '{"name": "', GLM-4: '')."""
    after_name: str = ""
    """The text between the name and the arguments (Qwen2.5: '", "arguments": ', GLM-4: '\\n'); '' where the
    arguments do not follow the name (no reply can be started as a call)."""
    after_arguments: str = ""
    """The text after a call's arguments up to the end of the turn, its end-of-turn marker (a stop word) left out
    (Qwen2.5: '}\\n</tool_call>', Llama 3.1: '}', Mistral: ', "id": "' ID_SLOT '"}]', GLM-4: '')."""
    between_calls: str = ""
    """The text from a call's arguments to the next call's name, in a reply of several (Qwen2.5:
    '}\\n</tool_call>\\n<tool_call>\\n{"name": "'); '' where the template writes one call a reply."""
    free_form: tuple[FreeFormCall, ...] = ()
    """How the template writes calls to free-form tools (`offered_format` keeps those a request offers)."""

    def reply_start(self, name: str | None = None) -> str:
        """The text that starts a reply as a call, for the model to go on with: up to the function's name (the model
        picks one), or with `name` up to its arguments. '' where a call cannot be started so (GLM-4's starts with
        the name itself: only a named one can be)."""
        if not self.after_name:
            return ""
        if name is None:
            return self.before_name
        return self.before_name + (name if self.name_line else json.dumps(name, ensure_ascii=False)[1:-1]) + \
            self.after_name


def call_format(template) -> CallFormat | None:
    """How `template` writes an assistant tool call, learnt by rendering one; None where it is not marker + JSON."""
    fmt = _function_call_format(template)
    if fmt is None:
        return None
    return dataclasses.replace(fmt, free_form=free_form_calls(template))


def offered_format(fmt: CallFormat | None, tools: list[dict] | None) -> CallFormat | None:
    """`fmt` reading free-form calls to the free-form tools in `tools` alone (OpenAI answers no call to a tool not
    offered: the text stays text)."""
    names = {tool["custom"]["name"] for tool in tools or [] if tool.get("type") == "custom"}
    if fmt is None:
        return None
    return dataclasses.replace(fmt, free_form=tuple(f for f in fmt.free_form if f.name in names))


def _function_call_format(template) -> CallFormat | None:
    reply = probe_call_reply(template)
    if reply is None:  # a template that cannot write calls at all
        return None
    for start, value, end in _json_values(reply):
        if not _calls_in(value):
            continue
        words = reply[:start].split()
        marker = words[-1] if words else ""  # the text right before the JSON, e.g. <tool_call>
        closer = reply[end:].strip()
        quoted = reply.find(f'"{PROBE_TOOL}"', start)  # the call's name, as the JSON writes it
        fmt = CallFormat(marker=marker, closer=closer, id_length=_written_id_length(value),
                         **(_around_the_name(reply, quoted + 1, template.stop_words) if quoted >= 0 else {}))
        return dataclasses.replace(fmt, between_calls=_between_calls(template, fmt)) if fmt.after_name else fmt
    if reply.startswith(PROBE_TOOL + "\n"):
        try:
            args, end = json.JSONDecoder().raw_decode(reply, len(PROBE_TOOL) + 1)
        except ValueError:
            return None
        if args == PROBE_ARGUMENTS:
            return CallFormat(marker="", closer=reply[end:].strip(), name_line=True, after_name="\n",
                              after_arguments=_up_to_the_end_of_turn(reply[end:], template.stop_words))
    return None


def _json_values(text: str, start: int = 0):
    """(where, value, end) of each JSON object or array that starts at or after `start` in `text`."""
    decoder = json.JSONDecoder()
    for at in range(start, len(text)):
        if text[at] in "{[":
            try:
                value, end = decoder.raw_decode(text, at)
            except ValueError:
                continue
            yield at, value, end


def _around_the_name(reply: str, name_at: int, stop_words) -> dict:
    """`CallFormat.before_name`, `after_name` and `after_arguments` of the probe `reply` whose function's name is at
    `name_at`: the text before it, the text from it to the probe arguments' JSON where that comes next (else
    nothing), and the text after those arguments up to the end of the turn."""
    after = name_at + len(PROBE_TOOL)
    found = _probe_arguments(reply, after)
    if found is None:
        return {}
    at, end = found
    return {"before_name": reply[:name_at], "after_name": reply[after:at],
            "after_arguments": _with_id_slots(_up_to_the_end_of_turn(reply[end:], stop_words), reply)}


def _probe_arguments(text: str, start: int) -> tuple[int, int] | None:
    """(where, end) of the first JSON value after `start` in `text` that is the probe's arguments."""
    return next(((at, end) for at, value, end in _json_values(text, start) if value == PROBE_ARGUMENTS), None)


def _up_to_the_end_of_turn(text: str, stop_words) -> str:
    """`text` before the first of the template's stop words in it (the end-of-turn marker a reply stops at)."""
    ends = [text.find(word) for word in stop_words if word and word in text]
    return text[:min(ends)] if ends else text


def _with_id_slots(text: str, reply: str) -> str:
    """`text` with each call id the template wrote into the probe `reply` (Mistral's) as `ID_SLOT`."""
    for _, value, _ in _json_values(reply):
        for item in value if isinstance(value, list) else [value]:
            written = item.get("id") if isinstance(item, dict) else None
            if isinstance(written, str) and written:
                text = text.replace(json.dumps(written), f'"{ID_SLOT}"')
    return text


def _between_calls(template, fmt: CallFormat) -> str:
    """`CallFormat.between_calls`: in the template's reply of two probe calls, the text from the first one's arguments
    to the second one's name, where that reply is the first call as a reply of one writes it, then the second; ''
    where the template writes one call a reply (Llama 3.1, GLM-4) or the two calls otherwise."""
    two = probe_call_reply(template, (PROBE_TOOL, PROBE_SECOND_TOOL))
    if not two or not two.startswith(fmt.before_name + PROBE_TOOL + fmt.after_name):
        return ""
    first = _probe_arguments(two, len(fmt.before_name + PROBE_TOOL))
    second = two.find(PROBE_SECOND_TOOL + fmt.after_name, first[1]) if first else -1
    if second < 0 or _probe_arguments(two, second) is None:
        return ""
    return _with_id_slots(two[first[1]:second], two)


def _written_id_length(value) -> int:
    """The length of the id the template wrote into the probe call (given none), where it is letters and digits."""
    item = value[0] if isinstance(value, list) and value else value
    written = item.get("id") if isinstance(item, dict) else None
    return len(written) if isinstance(written, str) and written.isascii() and written.isalnum() else 0


def _calls_in(value) -> list[dict]:
    """The calls a parsed JSON value holds: one {"name", "arguments"|"parameters"} object or a list of them."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
            return []
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return []
        if not isinstance(args, dict):
            return []
        calls.append({"name": item["name"], "arguments": args})
    return calls


def split_calls(text: str, fmt: CallFormat) -> tuple[str, list[dict]]:
    """(the reply's text without its calls, the calls in OpenAI's response shape: arguments as a JSON string, a
    free-form call's input as the text written).
    A control character written raw inside a string is taken (xgrammar 0.2.9 lets one into a string with a maxLength);
    the arguments sent on are JSON written anew, the character escaped."""
    text, free = split_free_form(text, fmt.free_form, lambda: call_id(fmt))
    text, calls = _split_function_calls(text, fmt)
    return (text.strip() if free else text), free + calls


def _split_function_calls(text: str, fmt: CallFormat) -> tuple[str, list[dict]]:
    decoder = json.JSONDecoder(strict=False)
    if fmt.name_line:
        return _split_name_line(text, fmt, decoder)
    if not fmt.marker:
        return _split_bare(text, fmt, decoder)
    kept, calls, at = [], [], 0
    while at < len(text):
        start = text.find(fmt.marker, at)
        if start < 0:
            break
        json_at = start + len(fmt.marker)
        while json_at < len(text) and text[json_at].isspace():
            json_at += 1
        try:
            value, end = decoder.raw_decode(text, json_at)
        except ValueError:
            value, end = None, json_at
        found = _calls_in(value) if value is not None else []
        if not found:
            kept.append(text[at:json_at])
            at = json_at
            continue
        kept.append(text[at:start])
        end = _skip_closer(text, end, fmt.closer)
        calls += [_response_call(c["name"], c["arguments"], fmt) for c in found]
        at = end
    kept.append(text[at:])
    return "".join(kept).strip() if calls else text, calls


def _split_bare(text: str, fmt: CallFormat, decoder) -> tuple[str, list[dict]]:
    """Llama 3.1 writes a call as bare JSON, alone in its reply: a reply that is anything more stays text."""
    body = text.strip()
    try:
        value, end = decoder.raw_decode(body)
    except ValueError:
        return text, []
    found = _calls_in(value)
    if not found or body[_skip_closer(body, end, fmt.closer):].strip():
        return text, []
    return "", [_response_call(c["name"], c["arguments"], fmt) for c in found]


def _split_name_line(text: str, fmt: CallFormat, decoder) -> tuple[str, list[dict]]:
    name, newline, rest = text.strip().partition("\n")
    if not newline or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        return text, []
    try:
        args, end = decoder.raw_decode(rest.lstrip())
    except ValueError:
        return text, []
    tail = rest.lstrip()[_skip_closer(rest.lstrip(), end, fmt.closer):].strip()
    if not isinstance(args, dict) or tail:  # the call must be the whole reply
        return text, []
    return "", [_response_call(name, args, fmt)]


def _response_call(name: str, args: dict, fmt: CallFormat) -> dict:
    return {"id": call_id(fmt), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def call_id(fmt: CallFormat) -> str:
    """A new id for a call the model wrote: letters and digits of the length the template writes (Mistral's 9, as
    mistral-common makes them), else OpenAI's `call_` + hex."""
    if fmt.id_length:
        return "".join(secrets.choice(_ID_CHARACTERS) for _ in range(fmt.id_length))
    return f"call_{uuid.uuid4().hex[:24]}"


def _skip_closer(text: str, end: int, closer: str) -> int:
    """Past the longest start of `closer` found after the JSON (the reply stops before the end-of-turn token)."""
    at = end
    while at < len(text) and text[at].isspace():
        at += 1
    for size in range(len(closer), 0, -1):
        if text.startswith(closer[:size], at):
            return at + size
    return end


@dataclass(frozen=True)
class ToolChoice:
    """What a request asks of its reply's calls (`tool_choice`, `parallel_tool_calls`), made by `choose`."""

    start: str = ""
    """The text the reply is started with in the prompt, so that the model goes on with a call (`tool_choice`
    "required" or a named function); '' where the model chooses ("auto")."""
    name: str | None = None
    """The function `tool_choice` names: the reply's calls to it alone are kept."""
    parallel: bool = True
    """False: the reply's first call alone is kept (`parallel_tool_calls: false`)."""

    def keep(self, calls: list[dict]) -> list[dict]:
        """The reply's calls this choice lets through."""
        if self.name is not None:
            calls = [c for c in calls if canonical.call_name(c) == self.name]
        return calls if self.parallel else calls[:1]

    def missed(self, reply) -> RequestError:
        """The error a reply (a `Reply`) started as a call gets when it is no call after all: cut by max_tokens, a 400
        that says to raise it (as vLLM answers a "required" reply cut short); else a 500 quoting what the model
        wrote (it went astray). Never a reply without the call asked for."""
        what = f"a call to {self.name!r}" if self.name else "a tool call (tool_choice 'required')"
        if reply.finish_reason == "length":
            return RequestError(f"the reply reached max_tokens ({reply.completion_tokens} tokens) before {what} was "
                                f"complete: raise max_tokens.", "max_tokens")
        return RequestError(f"the model was started on {what} and did not write one: its reply was "
                            f"{shown(self.start + reply.text, 300)}", status=500)


def choose(tool_choice, tools: list[dict] | None, fmt: CallFormat | None, template: str, *,
           parallel: bool) -> ToolChoice:
    """The request's `tool_choice` over its `tools` (after "none" took them out) for a template writing calls as `fmt`
    (None: not in a form this server reads): a 400 naming the reason where a reply cannot be started as the call
    asked for."""
    if tool_choice in (None, "auto", "none"):
        return ToolChoice(parallel=parallel)
    name = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
    asked = f"tool_choice {shown(tool_choice)}"
    if not tools:
        raise RequestError(f"{asked}: the request has no tools to call: send them in tools (functions: a free-form "
                           f"tool is called at the model's own choice, 'auto'), or leave tool_choice out.",
                           "tool_choice")
    names = [tool["function"]["name"] for tool in tools]
    if name is not None and name not in names:
        raise RequestError(f"{asked}: {name!r} is not among the tools ({', '.join(map(repr, names))}).",
                           "tool_choice")
    if fmt is None:
        raise RequestError(f"{asked}: the chat template {template!r} writes no tool call in a form this server reads, "
                           f"so a reply cannot be started as one: send tool_choice 'auto', or serve with a template "
                           f"that writes calls ({', '.join(templates_writing_tool_calls())}).", "tool_choice")
    start = fmt.reply_start(name)
    if not start:
        raise RequestError(f"{asked}: the chat template {template!r} starts a call with the function's name, so only a "
                           f"call to a named function can be started: name one, "
                           f'{{"type": "function", "function": {{"name": {json.dumps(names[0])}}}}}, or send '
                           f"tool_choice 'auto'.", "tool_choice")
    return ToolChoice(start=start, name=name, parallel=parallel)


def request_messages(raw_messages: list[dict]) -> list[dict]:
    """OpenAI request messages -> canonical ones: assistant `tool_calls` with their arguments parsed, their reasoning
    (under either of `WIRE_NAMES`, or both with the same text) kept as `reasoning_content`, tool results named after
    the call they answer. Content (text or parts) is left to the engine."""
    out = []
    for i, raw in enumerate(raw_messages):
        message = {"role": raw["role"], "content": raw.get("content") or ""}
        where, field = "the request", f"messages[{i}]"
        if raw.get("tool_calls"):
            if raw["role"] != "assistant":
                raise canonical.fail(where, f"{field}.tool_calls on a {raw['role']!r} message",
                                     "Only assistant messages carry tool_calls.")
            message["tool_calls"] = canonical.tool_calls(raw["tool_calls"], where, f"{field}.tool_calls")
        # one text under either name, or both (as this server sends it)
        named = {name: raw[name] for name in WIRE_NAMES if raw.get(name)}
        if named and raw["role"] != "assistant":
            raise canonical.fail(where, f"{field}.{next(iter(named))} on a {raw['role']!r} message",
                                 "Only assistant messages carry reasoning.")
        if len(set(named.values())) > 1:
            raise canonical.fail(where, " and ".join(f"{field}.{name}" for name in named) + " hold different texts",
                                 "They are two names of one field (DeepSeek's and newer vLLM's): send the reasoning "
                                 "under one of them, or the same text under both.")
        if named:
            message[REASONING] = next(iter(named.values()))
        if raw["role"] == "tool":
            for key in ("name", "tool_call_id"):
                if isinstance(raw.get(key), str) and raw[key]:
                    message[key] = raw[key]
        out.append(message)
    canonical.name_tool_results(out, "the request")
    return out


def request_tools(tools) -> list[dict] | None:
    return canonical.tools(tools, "the request") or None
