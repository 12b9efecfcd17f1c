"""Whether a sample fits its chat template: tool calls, tool definitions and reasoning that the template writes
wrong or nowhere (each template's abilities are probed once: `templates.tool_support`)."""

from __future__ import annotations

from tunelab.data.messages import call_name, fail
from tunelab.data.reports import count_unused
from tunelab.data.templates import (ToolSupport, templates_writing_free_form, templates_writing_reasoning,
                                    templates_writing_several_calls, templates_writing_text_with_calls,
                                    templates_writing_tool_calls)


def check_tools(sample: dict, tools: ToolSupport, report: dict, where: str) -> None:
    """What a sample's tool calls, tool definitions and reasoning need from the template it trains with: refused
    (InvalidRecord) where the template would train them wrong, reported as not used where it writes them nowhere."""
    turns = [*(sample.get("messages") or sample.get("prompt") or []),
             *(sample[k] for k in ("chosen", "rejected", "completion") if isinstance(sample.get(k), dict))]
    replies = [turn for turn in turns if turn.get("role", "assistant") == "assistant"]
    _refuse_free_form(replies, sample.get("tools") or [], tools, where)
    if not tools.calls and any(turn.get("tool_calls") for turn in turns):
        raise fail(where, f"the record has tool calls, which template {tools.template!r} does not write: they "
                          f"would be trained as empty replies", f"Use a template that writes them "
                          f"({', '.join(templates_writing_tool_calls())}), or leave the calls out of the data.")
    if not tools.several_calls:
        _refuse_several_calls(replies, tools.template, where)
    if not tools.text_with_calls and any(t.get("tool_calls") and t.get("content", "").strip() for t in replies):
        count_unused(report, "content beside tool_calls", where, f"template {tools.template!r} writes a reply that "
                     f"calls a tool as its calls alone, so that text trains nowhere: make it a reply of its own, or "
                     f"use a template that writes both ({', '.join(templates_writing_text_with_calls())})")
    if sample.get("tools") and not tools.definitions:
        count_unused(report, "tools", where, f"template {tools.template!r} has no place for tool definitions: use "
                     f"one that writes them ({', '.join(templates_writing_tool_calls())}), or drop them")
    if not tools.reasoning and any(turn.get("reasoning_content") for turn in turns):
        writers = ", ".join(templates_writing_reasoning())
        count_unused(report, "reasoning_content", where, f"template {tools.template!r} writes no reasoning, so the "
                     f"replies train without it: use one that writes it ({writers}), or drop it")


def _refuse_several_calls(replies: list[dict], template: str, where: str) -> None:
    """Llama 3.1's template refuses a reply with several calls (naming no record); GLM-4's writes the first alone."""
    for number, turn in enumerate(replies, 1):
        calls = turn.get("tool_calls") or []
        if len(calls) > 1:
            names = ", ".join(map(call_name, calls))
            raise fail(where, f"reply {number} holds {len(calls)} tool calls ({names}), and template {template!r} "
                              f"writes one call per reply", f"Split them into replies of one call, each followed by "
                              f"its result, or use a template that writes several "
                              f"({', '.join(templates_writing_several_calls())}).")


def _refuse_free_form(replies: list[dict], definitions: list[dict], tools: ToolSupport, where: str) -> None:
    """A free-form (custom) call, or tool, that the template has no place for: a template writing function calls
    only would write the call as none at all (an empty reply trained) or fail to render it."""
    writers = templates_writing_free_form()
    fix = (f"Templates with a place for free-form calls: {', '.join(writers)}; use one of them for such calls, or "
           f"write the call as a \"function\" call with JSON arguments.")
    which = f"template {tools.template!r} does not write" + (
        f": it writes free-form calls to {', '.join(map(repr, tools.free_form))}" if tools.free_form else "")
    for number, turn in enumerate(replies, 1):
        for k, call in enumerate(turn.get("tool_calls") or []):
            if call.get("type") == "custom" and call["custom"]["name"] not in tools.free_form:
                raise fail(where, f"reply {number}'s tool_calls[{k}] is a free-form (custom) call to "
                                  f"{call['custom']['name']!r}, which {which}", fix)
    for tool in definitions:
        if tool.get("type") == "custom" and tool["custom"]["name"] not in tools.free_form:
            raise fail(where, f"the record's tools define the free-form (custom) tool {tool['custom']['name']!r}, "
                              f"which {which}", fix)
