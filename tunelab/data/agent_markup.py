"""Agent dialogues written as markup inside the text -> tool calls and tool results (docs/DATA.md, "Tools").

Two formats write an agent's calls into the reply's text instead of OpenAI's `tool_calls`:

* MS-Agent (ModelScope's agent data; XTuner's msagent configs): a ShareGPT reply holds the call between
  `<|startofthink|>` and `<|endofthink|>`, then the result between `<|startofexec|>` and `<|endofexec|>`, then the
  next reply.
* InternLM2's own chat format (InternLM's chat/chat_format.md, lagent): a reply's text is followed by
  `<|action_start|><|plugin|>` and the call as JSON (`{"name": ..., "parameters": {...}}`) up to `<|action_end|>`;
  the result is an `environment` message (named 'plugin'); the tool definitions are a system message named
  'plugin' holding their JSON list. Its code interpreter is called the same way, `<|action_start|><|interpreter|>`
  and the code (a markdown code block) up to `<|action_end|>`; its result is an `environment` message named
  'interpreter', its description (the prompt that says how to use it) a system message named 'interpreter'.

Both become the canonical messages (an assistant reply with `tool_calls`, role 'tool' results), which every template
with a call format writes its own way: `internlm2_chat` writes InternLM2's markup back as chat_format.md shows it.
A code cell is text, not JSON arguments, so an interpreter call becomes OpenAI's free-form (custom) call
`{"type": "custom", "custom": {"name": "interpreter", "input": code}}` and its description a custom tool
`{"type": "custom", "custom": {"name": "interpreter", "description": ...}}`: only a template with a place for
free-form calls writes them (tunelab.data.template_fit refuses them elsewhere).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from tunelab.data.messages import TOOL_ROLES, fail, parse_json_value, tool_call, tools
from tunelab.data.templates.chatml import INTERPRETER

_THINK = re.compile(r"<\|startofthink\|>(.*?)<\|endofthink\|>", re.S)
_EXEC = re.compile(r"<\|startofexec\|>(.*?)<\|endofexec\|>", re.S)
_MS_AGENT_BLOCK = re.compile(r"(<\|startofthink\|>.*?<\|endofthink\|>|<\|startofexec\|>.*?<\|endofexec\|>)", re.S)
_FENCE = re.compile(r"^\s*```(?:json)?\s*|\s*```\s*$", re.I)

_ACTION_START, _ACTION_END = "<|action_start|>", "<|action_end|>"
_ACTION = re.compile(r"<\|action_start\|>(<\|plugin\|>|<\|interpreter\|>)?(.*?)<\|action_end\|>", re.S)
PLUGIN_NAMES = ("plugin", "<|plugin|>")
INTERPRETER_NAMES = (INTERPRETER, "<|interpreter|>")
CHANNEL_NAMES = PLUGIN_NAMES + INTERPRETER_NAMES
"""The names of InternLM2's tool channels on a message (lagent writes 'plugin' / 'interpreter'), not a
participant's."""
_WRITE_CALL = ("Write the call as <|action_start|><|plugin|>\\n{\"name\": ..., \"parameters\": {...}}<|action_end|>, "
               "or code as <|action_start|><|interpreter|>\\n...<|action_end|>.")


# --- MS-Agent -------------------------------------------------------------------------------------

def is_ms_agent(value: Any) -> bool:
    return isinstance(value, str) and ("<|startofexec|>" in value or "<|startofthink|>" in value)


def split_ms_agent(value: str, where: str, field: str, train: bool = True) -> list[dict]:
    """An MS-Agent reply -> assistant (with its tool call), tool result, assistant, ...

    The call ({"api_name", "parameters"} between <|startofthink|> and <|endofthink|>) becomes a tool call; the
    result between <|startofexec|> and <|endofexec|> a tool message (not trained); the text after it the next reply.
    """
    out: list[dict] = []
    current = {"role": "assistant", "content": ""}
    for piece in _MS_AGENT_BLOCK.split(value):
        think, execd = _THINK.fullmatch(piece), _EXEC.fullmatch(piece)
        if think:
            call = parse_json_value(_FENCE.sub("", think.group(1)).strip(), where, f"{field} <|startofthink|> call")
            if not isinstance(call, dict) or "api_name" not in call:
                raise fail(where, f"{field}: the <|startofthink|> block has no \"api_name\"",
                           "Write the call as {\"api_name\": ..., \"parameters\": {...}}.")
            current.setdefault("tool_calls", []).append(
                tool_call({"name": call["api_name"], "arguments": call.get("parameters", {})}, where, field))
        elif execd:
            current["content"] = current["content"].strip()
            out += [current, {"role": "tool", "content": _FENCE.sub("", execd.group(1)).strip()}]
            current = {"role": "assistant", "content": ""}
        else:
            current["content"] += piece
    current["content"] = current["content"].strip()
    if current["content"] or current.get("tool_calls") or not out:
        out.append(current)
    if not train:
        for m in out:
            if m["role"] == "assistant":
                m["train"] = False
    return out


# --- InternLM2 ------------------------------------------------------------------------------------

def _role(turn: dict) -> str:
    return str(turn.get("role", "")).lower()


def is_internlm2(turns: Any) -> bool:
    """Whether a list of {"role", "content"} messages uses InternLM2's agent markup (environment results, a system
    message named 'plugin' / 'interpreter', or a reply with <|action_start|>)."""
    return isinstance(turns, list) and any(
        isinstance(t, dict) and (_role(t) == "environment" or t.get("name") in CHANNEL_NAMES
                                 or (isinstance(t.get("content"), str) and _ACTION_START in t["content"]))
        for t in turns)


def read_internlm2(turns: list, where: str, key: str) -> tuple[list[Optional[dict]], list[dict]]:
    """InternLM2's agent messages -> OpenAI-shaped messages, and the tool definitions of the system messages named
    'interpreter' (a custom tool) and 'plugin' (functions), in that order, InternLM's. The list keeps one entry per
    turn (None for such a system message), so that later errors name the turn where the user wrote it."""
    out: list[Optional[dict]] = []
    found: list[dict] = []
    interpreter: list[dict] = []
    for i, turn in enumerate(turns):
        at = f"{key}[{i}]"
        if not isinstance(turn, dict):
            out.append(turn)  # the reader of the messages says what is wrong with it
            continue
        if _role(turn) == "system" and turn.get("name") in INTERPRETER_NAMES:
            interpreter.append(_interpreter_tool(turn, where, at))
            out.append(None)
        elif _role(turn) == "system" and turn.get("name") in PLUGIN_NAMES:
            found += tools(turn.get("content"), where, f"{at}.content")
            out.append(None)
        elif _role(turn) in TOOL_ROLES and turn.get("name") in CHANNEL_NAMES:
            # the channel, not the tool answered (the call before it names that); another name is kept
            out.append({k: v for k, v in turn.items() if k != "name"})
        elif turn.get("name") in INTERPRETER_NAMES:
            raise fail(where, f"{at} is a {turn.get('role')!r} turn named {turn['name']!r}",
                       "InternLM2's interpreter channel names a system message (its description) or an environment "
                       "message (its output); the reply writes the call, as "
                       "<|action_start|><|interpreter|>\\n...<|action_end|>.")
        elif _role(turn) == "assistant" and isinstance(turn.get("content"), str) and _ACTION_START in turn["content"]:
            out.append(_split_action(turn, where, at))
        else:
            out.append(turn)
    return out, interpreter + found


def _interpreter_tool(turn: dict, where: str, at: str) -> dict:
    """The interpreter's system message -> the custom tool it describes (its text kept as the description)."""
    if not isinstance(turn.get("content"), str):
        raise fail(where, f"{at}.content should be the interpreter's description as text",
                   "Write the system message named 'interpreter' as text.")
    return {"type": "custom", "custom": {"name": INTERPRETER, "description": turn["content"]}}


def _split_action(turn: dict, where: str, at: str) -> dict:
    """A reply `text<|action_start|><|plugin|>\\n{json}<|action_end|>` -> {"content": text, "tool_calls": [...]}; a
    call `<|action_start|><|interpreter|>\\ncode<|action_end|>` becomes a custom call whose input is that code."""
    text = turn["content"]
    if turn.get("tool_calls") or turn.get("function_call"):
        raise fail(where, f"{at} has both 'tool_calls' and a call in its text (<|action_start|>)",
                   "Keep one of the two.")
    actions = list(_ACTION.finditer(text))
    # the text before, between and after the calls: a marker left there opens a call that is not closed
    outside = [text[start:end] for start, end in zip([0, *(a.end() for a in actions)],
                                                     [*(a.start() for a in actions), len(text)])]
    if not actions or any(_ACTION_START in piece or _ACTION_END in piece for piece in outside):
        raise fail(where, f"{at}.content opens a call (<|action_start|>) that does not end in <|action_end|>",
                   _WRITE_CALL)
    if any(piece.strip() for piece in outside[1:]):
        raise fail(where, f"{at}.content has text after its call (<|action_end|>)",
                   "InternLM2 writes a reply's text before its call: move the text before <|action_start|>, or "
                   "into the reply that follows the call's result.")
    calls = []
    for action in actions:
        if action.group(1) == "<|interpreter|>":
            # the text between `<|interpreter|>\\n` and <|action_end|> as it is: internlm2_chat writes it back so
            code = action.group(2)
            calls.append({"type": "custom", "custom": {"name": INTERPRETER,
                                                       "input": code[1:] if code.startswith("\n") else code}})
            continue
        if action.group(1) is None:
            raise fail(where, f"{at}.content has a call without <|plugin|> or <|interpreter|> after "
                              f"<|action_start|>", _WRITE_CALL)
        field = f"{at} <|plugin|> call"  # read here, so that its errors name the call in the text
        calls.append(tool_call(parse_json_value(action.group(2).strip(), where, field,
                                                '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
                               where, field))
    return {**turn, "content": outside[0], "tool_calls": calls}
