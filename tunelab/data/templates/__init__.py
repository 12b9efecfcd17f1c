"""Chat templates: how a conversation becomes the text a model is trained on and prompted with.

One definition per template serves training (which pieces are trained on), evaluation, chat, serving and export
(`to_jinja()` becomes the merged tokenizer's `chat_template`), so a model chats the way it was trained. Each built-in
template renders what its vendor's published chat_template renders (tests/vendor_templates holds those, docs/DATA.md
lists them). 'hf' uses the tokenizer's own chat_template; `guess_template(model_dir)` picks one for a model.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, replace

from tunelab.config.typecheck import did_you_mean
from tunelab.data.templates.chatml import INTERPRETER
from tunelab.data.templates.core import TOOL_ROLES, ChatTemplate, HFChatTemplate, hf_template
from tunelab.data.templates.families import ALIASES, DEFINITIONS, LLAMAFACTORY_NAMES
from tunelab.data.templates.guess import guess_template
from tunelab.errors import TunelabError

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in DEFINITIONS}
TEMPLATES.update({alias: replace(TEMPLATES[target], name=alias) for alias, target in ALIASES.items()})
TEMPLATES["hf"] = HFChatTemplate(name="hf", source="")
"""Every template by name; 'hf' needs a tokenizer: get it with get_template('hf', tokenizer)."""


def get_template(name: str, tokenizer=None) -> ChatTemplate:
    """The template called `name`. ('hf' = the tokenizer's own chat_template; needs `tokenizer`.)"""
    if name == "hf":
        return hf_template(tokenizer)
    if name in TEMPLATES:
        return _with_eos(TEMPLATES[name], tokenizer)
    known = ", ".join(sorted(TEMPLATES))
    hint = did_you_mean(name, TEMPLATES, LLAMAFACTORY_NAMES)
    raise TunelabError(f"unknown prompt_template {name!r}.{hint} Known templates: {known}")


def _with_eos(template: ChatTemplate, tokenizer) -> ChatTemplate:
    """A template that writes `eos_token` (fewshot) writing the tokenizer's, which is then its stop word too."""
    eos = getattr(tokenizer, "eos_token", None)
    if not eos or "eos_token" not in template.source:
        return template
    return replace(template, eos_token=eos, stop_words=tuple(dict.fromkeys([*template.stop_words, eos])))


@dataclass(frozen=True)
class ToolSupport:
    """What a template does with tools (many families' templates have no place for them), and with reasoning."""

    template: str
    definitions: bool
    """The tool definitions of a conversation reach the prompt."""
    calls: bool
    """An assistant's tool calls are written into its (trained) turn."""
    reasoning: bool = True
    """An assistant's reasoning_content is written into its (trained) turn (True where the probe cannot tell)."""
    several_calls: bool = True
    """A reply's several tool calls are all written (Llama 3.1 / 3.2 and GLM-4 write one call per reply)."""
    text_with_calls: bool = True
    """A reply's text beside its tool calls is written (Llama 3.1 / 3.2 and Mistral write the calls alone)."""
    free_form: tuple[str, ...] = ()
    """The free-form (OpenAI "custom") tools, among `FREE_FORM_TOOLS`, whose definitions and calls (text input, not
    JSON arguments) the template writes: InternLM2's ('interpreter', its code interpreter); () for most."""


FREE_FORM_TOOLS = (INTERPRETER,)
"""The free-form tools a built-in template has a place for, by name (a template writes a call to a free-form tool in
its own markup for that tool, so each is probed by its name)."""
PROBE_TOOL = "tunelab_probe_function"
PROBE_ARGUMENTS = {"city": "Paris"}
PROBE_REASONING = "tunelab probe reasoning"


def _writes_reasoning(template: ChatTemplate) -> bool:
    """Whether a last reply's reasoning_content reaches the text (Qwen3, DeepSeek-R1), by rendering a probe one."""
    turns = [{"role": "user", "content": "?"},
             {"role": "assistant", "content": "a", "reasoning_content": PROBE_REASONING}]
    try:
        return PROBE_REASONING in template.render(turns)
    except Exception:  # noqa: BLE001 (a template's own refusal: it cannot tell, so nothing is said)
        return True


PROBE_SECOND_TOOL = "tunelab_second_probe"
PROBE_TEXT = "tunelab probe text"


@dataclass(frozen=True)
class ReasoningFormat:
    """How a reply of a template carries its reasoning: `open` reasoning `close` answer (Qwen3's and DeepSeek-R1's
    <think>...</think>)."""

    open: str
    """The marker before the reasoning ('' where the template writes it into the generation prompt and no other
    text tells it)."""
    close: str
    """The marker between the reasoning and the answer."""
    opened: bool
    """The generation prompt already opened the block (DeepSeek-R1's ends with '<think>\\n'): a reply starts inside
    it, and what comes before `close` is reasoning. Else a reply holds reasoning only when it starts with `open`."""


def reasoning_format(template: ChatTemplate) -> ReasoningFormat | None:
    """Whether and how `template` writes a reply's reasoning, learnt by rendering: a last reply holding probe reasoning
    and probe text, after the generation prompt. None where it writes no reasoning, where nothing but whitespace
    separates the two, or where the reply does not start where the generation prompt ends (Qwen3 without thinking
    closes an empty block in the prompt: its replies hold none)."""
    asked = [{"role": "user", "content": "?"}]
    try:
        before = template.render(asked)
        prompt = template.render(asked, add_generation_prompt=True)
        whole = template.render([*asked, {"role": "assistant", "content": PROBE_TEXT,
                                          "reasoning_content": PROBE_REASONING}])
        plain = template.render([*asked, {"role": "assistant", "content": PROBE_TEXT}])
    except Exception:  # noqa: BLE001 (a template's own refusal: it writes no such reply)
        return None
    if not whole.startswith(prompt) or PROBE_REASONING not in whole[len(prompt):]:
        return None
    reply = whole[len(prompt):]
    start = reply.index(PROBE_REASONING)
    end = reply.find(PROBE_TEXT, start + len(PROBE_REASONING))
    close = reply[start + len(PROBE_REASONING):end].strip() if end >= 0 else ""
    if not close:
        return None
    opener = reply[:start].strip()
    if opener:
        return ReasoningFormat(opener, close, opened=False)
    # opened by the generation prompt: its marker is what that prompt writes beyond a reply without reasoning's opener
    added = prompt[len(before):] if prompt.startswith(before) else ""
    plain_opener = plain[len(before):plain.find(PROBE_TEXT)] if plain.startswith(before) else ""
    opener = added[len(plain_opener):].strip() if plain_opener and added.startswith(plain_opener) else ""
    return ReasoningFormat(opener, close, opened=True)


def probe_call_reply(template: ChatTemplate, names: tuple = (PROBE_TOOL,), content: str = "") -> str | None:
    """The trained text `template` writes for an assistant turn holding `content` and a probe tool call to each of
    `names` (with `PROBE_ARGUMENTS`); None where the template refuses to render it."""
    calls = [{"type": "function", "function": {"name": name, "arguments": dict(PROBE_ARGUMENTS)}} for name in names]
    turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": content, "tool_calls": calls}]
    try:
        return "".join(text for text, trained in template.segments(turns) if trained)
    except Exception:  # noqa: BLE001 (a template's own refusal: raise_exception, TunelabError)
        return None


PROBE_CODE = 'print("tunelab probe")\n'
"""A free-form call's probe input: quotes and a newline, which a template writing the call as JSON would escape."""


def probe_free_form_reply(template: ChatTemplate, name: str) -> str | None:
    """The trained text `template` writes for an assistant turn holding a probe call (input `PROBE_CODE`) to the
    free-form tool `name`, that tool offered; None where the template refuses to render it."""
    turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "custom", "custom": {"name": name, "input": PROBE_CODE}}]}]
    try:
        return "".join(text for text, trained in template.segments(turns, tools=[_probe_tool(name)]) if trained)
    except Exception:  # noqa: BLE001 (a template's own refusal, or one that reads every call as a function's)
        return None


def _writes_free_form(template: ChatTemplate, name: str) -> bool:
    """Whether `template` writes the free-form tool `name`: its description into the prompt, a call's input as it is
    (not quoted into JSON) into the trained reply."""
    if PROBE_CODE not in (probe_free_form_reply(template, name) or ""):
        return False
    return PROBE_CODE in template.render([{"role": "user", "content": "?"}], tools=[_probe_tool(name)])


def _probe_tool(name: str) -> dict:
    """The free-form tool `name` as a probe offers it, described by `PROBE_CODE`."""
    return {"type": "custom", "custom": {"name": name, "description": PROBE_CODE}}


def tool_support(template: ChatTemplate) -> ToolSupport:
    """Learnt by rendering a probe tool definition and probe calls (a template that refuses them writes neither)."""
    tool = {"type": "function", "function": {"name": PROBE_TOOL, "description": "", "parameters": {}}}
    asked = [{"role": "user", "content": "?"}]
    try:
        definitions = template.render(asked, tools=[tool]) != template.render(asked)
    except Exception:  # noqa: BLE001 (a template's own refusal: raise_exception, TunelabError)
        definitions = False
    calls = PROBE_TOOL in (probe_call_reply(template) or "")
    several_calls = text_with_calls = True  # (a template that writes no call: nothing to say of them)
    if calls:
        two = probe_call_reply(template, (PROBE_TOOL, PROBE_SECOND_TOOL)) or ""
        several_calls = PROBE_TOOL in two and PROBE_SECOND_TOOL in two
        text_with_calls = PROBE_TEXT in (probe_call_reply(template, content=PROBE_TEXT) or "")
    return ToolSupport(template.name, definitions, calls, _writes_reasoning(template), several_calls=several_calls,
                       text_with_calls=text_with_calls,
                       free_form=tuple(name for name in FREE_FORM_TOOLS if _writes_free_form(template, name)))


@functools.cache
def _builtin_support() -> dict[str, ToolSupport]:
    """Every built-in template's `tool_support`, probed once for all the lists below."""
    return {name: tool_support(t) for name, t in sorted(TEMPLATES.items()) if name != "hf"}


def templates_writing_tool_calls() -> list[str]:
    """The built-in templates that write tool calls (and their definitions), for messages that suggest one."""
    return [name for name, support in _builtin_support().items() if support.calls]


def templates_writing_several_calls() -> list[str]:
    """The built-in templates that write every call of a reply that makes several."""
    return [name for name, support in _builtin_support().items() if support.calls and support.several_calls]


def templates_writing_text_with_calls() -> list[str]:
    """The built-in templates that write a reply's text beside its calls."""
    return [name for name, support in _builtin_support().items() if support.calls and support.text_with_calls]


def templates_writing_free_form() -> list[str]:
    """The built-in templates that write free-form (custom) tools, each with their names: "internlm2_chat
    ('interpreter')"."""
    return [f"{name} ({', '.join(map(repr, support.free_form))})" for name, support in _builtin_support().items()
            if support.free_form]


def templates_writing_reasoning() -> list[str]:
    """The built-in templates that write an assistant's reasoning_content, for messages that suggest one."""
    return [name for name, support in _builtin_support().items() if support.reasoning]


def choose_template(prompt_template: str | None, meta: dict | None, model_path: str, tokenizer):
    """(template, where it came from) for a model about to chat or be served: the flag, then the training record
    (tunelab.json), then a guess from the model (its family, or its tokenizer's own chat_template), then 'default'.
    `tunelab chat`, `serve` and `serve --engine vllm` all choose here, so they prompt a model alike."""
    if prompt_template:
        return get_template(prompt_template, tokenizer), "--prompt-template"
    if meta and meta.get("prompt_template"):
        return get_template(meta["prompt_template"], tokenizer), "tunelab.json"
    try:
        guessed = guess_template(model_path)
    except (OSError, ValueError):  # an unreadable config.json: fall through to the tokenizer's own template
        guessed = None
    if guessed:
        return get_template(guessed, tokenizer), f"guessed from {model_path}"
    if getattr(tokenizer, "chat_template", None):
        return get_template("hf", tokenizer), "the tokenizer's chat_template"
    return get_template("default", tokenizer), \
        "fallback (no tunelab.json, no guess; pass --prompt-template to choose)"


def template_with_default_system(template: ChatTemplate, system: str | None) -> ChatTemplate:
    """`template` rendering `system` when a conversation brings no system prompt (the one a model was trained with,
    written into exported chat templates)."""
    if system and dataclasses.is_dataclass(template) and hasattr(template, "default_system"):
        return replace(template, default_system=system)
    return template


__all__ = ["TEMPLATES", "TOOL_ROLES", "ChatTemplate", "HFChatTemplate", "ReasoningFormat", "ToolSupport",
           "choose_template", "get_template", "guess_template", "probe_call_reply", "probe_free_form_reply",
           "reasoning_format", "template_with_default_system", "templates_writing_free_form",
           "templates_writing_reasoning", "templates_writing_several_calls", "templates_writing_text_with_calls",
           "templates_writing_tool_calls", "tool_support"]
