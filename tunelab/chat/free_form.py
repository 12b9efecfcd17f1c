"""Free-form (OpenAI "custom") tools in a served conversation: InternLM2's code interpreter.

A free-form tool's call carries text, not JSON arguments: internlm2_chat writes a call to its code interpreter as
`<|action_start|><|interpreter|>`, the code, `<|action_end|>` (tunelab.data.templates.chatml). Rendering a probe call
tells how a template writes one (`free_form_calls`), and a reply's calls written so come back as OpenAI's
`{"type": "custom", "custom": {"name", "input"}}` calls (`split_free_form`); a request offering such a tool, or sending
back a call to one, where the template writes none is a 400 (`refuse_free_form`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.chat.requests import RequestError
from tunelab.data.templates import (FREE_FORM_TOOLS, PROBE_CODE, ToolSupport, probe_free_form_reply,
                                    templates_writing_free_form)


@dataclass(frozen=True)
class FreeFormCall:
    """How a template writes a call to the free-form tool `name`: `opener`, the input as it is, `closer` (InternLM2's
    interpreter: '<|action_start|><|interpreter|>\\n', the code, '<|action_end|>')."""

    name: str
    opener: str
    closer: str


def free_form_calls(template) -> tuple[FreeFormCall, ...]:
    """How `template` writes a call to each of `FREE_FORM_TOOLS` it writes, learnt by rendering one: the text before
    the probe input, and after it up to the end of the turn (the first of the template's stop words)."""
    found = []
    for name in FREE_FORM_TOOLS:
        reply = probe_free_form_reply(template, name) or ""
        at = reply.find(PROBE_CODE)
        closer = reply[at + len(PROBE_CODE):] if at > 0 else ""
        for word in filter(None, template.stop_words):
            closer = closer.split(word)[0]
        if reply[:at].strip() and closer.strip():
            found.append(FreeFormCall(name, reply[:at], closer.strip()))
    return tuple(found)


def function_tools(tools: list[dict] | None) -> list[dict] | None:
    """The function tools of `tools` (those a call can be started as, and held to by a grammar)."""
    return [tool for tool in tools if tool.get("type") != "custom"] if tools else tools


def refuse_free_form(messages: list[dict], tools: list[dict] | None, support: ToolSupport) -> None:
    """A 400 for a free-form (custom) tool offered, or an earlier call to one, that the template does not write: it
    would fail to render it, or show the model a conversation without it."""
    which = (f"which the chat template {support.template!r} does not write: serve with a template that writes it "
             f"({', '.join(templates_writing_free_form())}), or make it a function tool")
    for k, tool in enumerate(tools or []):
        if tool.get("type") == "custom" and tool["custom"]["name"] not in support.free_form:
            raise RequestError(f"tools[{k}] is a free-form (custom) tool {tool['custom']['name']!r}, {which}.", "tools")
    for i, message in enumerate(messages):
        for k, call in enumerate(message.get("tool_calls") or []):
            if call.get("type") == "custom" and call["custom"]["name"] not in support.free_form:
                raise RequestError(f"messages[{i}].tool_calls[{k}] is a free-form (custom) tool "
                                   f"{call['custom']['name']!r}, {which}.", "messages")


def split_free_form(text: str, formats: tuple[FreeFormCall, ...], new_id) -> tuple[str, list[dict]]:
    """(the reply without its calls to free-form tools written as `formats`, those calls in OpenAI's response shape,
    each with the id `new_id()` makes). Read before the function calls, so that code quoting a function call's marker
    is not read as one. A call cut before its closer (max_tokens) stays text."""
    calls = []
    for fmt in formats:
        opener = fmt.opener.rstrip()  # the newline after <|interpreter|> is the template's, not the input's
        kept, at = [], 0
        while (start := text.find(opener, at)) >= 0:
            begin = start + len(opener)
            if text.startswith(fmt.opener[len(opener):], begin):
                begin += len(fmt.opener) - len(opener)
            end = text.find(fmt.closer, begin)
            if end < 0:
                break
            kept.append(text[at:start])
            calls.append({"id": new_id(), "type": "custom",
                          "custom": {"name": fmt.name, "input": text[begin:end]}})
            at = end + len(fmt.closer)
        text = "".join(kept) + text[at:]
    return text, calls
