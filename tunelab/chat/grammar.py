"""Structured output for `tunelab serve`, by xgrammar: the grammar a reply must follow, and the token masks that hold
it there while the batcher decodes.

A request's grammar (`reply_constraint`) is one of:

* `response_format` {"type": "json_object"} (any JSON object) or {"type": "json_schema", ...} (JSON valid for that
  schema): the reply is that JSON, after the reasoning block where the template writes one (Qwen3, DeepSeek-R1). With
  tools offered and `tool_choice` "auto", it may be a call to one of them instead, as the template writes a call.
* a forced call (`tool_choice` "required" or a named function): the prompt ends with the call's start
  (`CallFormat.reply_start`), and the rest is the function's name where none was given (one of the tools' names), its
  arguments as JSON valid for that tool's `parameters`, then what the template writes after a call's arguments, up
  to its end-of-turn marker (`CallFormat.after_arguments`); under "required" with `parallel_tool_calls` further
  calls may follow, as the template joins them (`CallFormat.between_calls`).

Each is an xgrammar structural tag, compiled once per distinct grammar (the compiler caches them) with the model's
`TokenizerInfo`, whose stop tokens are the model's EOS tokens and the template's stop words that are one token: the
reply may end only once the grammar is complete, and a stop word spelt out inside a JSON string is text. Whitespace
between JSON elements is at most `WHITESPACE_RUN` characters, so a model cannot wander off into whitespace.

xgrammar is optional (the `web` extra installs it): without it a `response_format` other than "text" is refused,
and forced calls are started but not constrained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunelab.chat.requests import RequestError
from tunelab.chat.tools import ID_SLOT, CallFormat, ToolChoice

WHITESPACE_RUN = 20
"""The most whitespace characters between two JSON elements (llama.cpp's JSON grammars allow a newline and 20)."""

COMPILED_CACHE_BYTES = 256 * 2**20
"""What the compiled grammars a server keeps may take: a long-running server sees many schemas."""


def xgrammar_module():
    """xgrammar, or None where it is not installed."""
    try:
        import xgrammar
    except ImportError:
        return None
    return xgrammar


@dataclass
class Grammars:
    """The xgrammar compiler for one model's tokenizer (its `TokenizerInfo` takes a while to build for a large
    vocabulary: made once, by `ChatModel.grammars`)."""

    compiler: object

    @classmethod
    def for_model(cls, chat) -> Grammars:
        import xgrammar

        # (no stop token known: xgrammar looks for one in the vocabulary)
        info = xgrammar.TokenizerInfo.from_huggingface(chat.tokenizer, vocab_size=_output_size(chat),
                                                       stop_token_ids=list(stop_token_ids(chat)) or None)
        return cls(xgrammar.GrammarCompiler(info, cache_limit_bytes=COMPILED_CACHE_BYTES))

    def compile(self, structure: dict, param: str, what: str):
        """The compiled structural tag `structure`; one xgrammar refuses is a RequestError naming `param`, saying
        `what` could not be followed and xgrammar's reason."""
        try:
            return self.compiler.compile_structural_tag({"type": "structural_tag", "format": structure})
        except (RuntimeError, ValueError) as exc:
            raise RequestError(f"{what}: {_reason(exc)}", param) from None


def _output_size(chat) -> int:
    """The width of the model's logits (its vocabulary may be padded beyond the tokenizer's)."""
    head = chat.model.get_output_embeddings() if hasattr(chat.model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else len(chat.tokenizer)


def stop_token_ids(chat) -> tuple[int, ...]:
    """The tokens that may end a constrained reply, once its grammar is complete: the EOS tokens and each of the
    template's stop words that is a token of its own (Qwen's <|im_end|>)."""
    from tunelab.chat.engine import eos_token_ids
    from tunelab.model.generate import stop_token_ids as template_stop_ids

    return tuple(dict.fromkeys([*eos_token_ids(chat), *template_stop_ids(chat.template, chat.tokenizer)]))


def _reason(exc: Exception) -> str:
    """xgrammar's message without its log prefix ('[12:00:00] /project/cpp/...cc:5082: ')."""
    text = str(exc).strip()
    return re.sub(r"^(\[[\d:]+\]\s*)?\S+\.(cc|h|cpp):\d+:\s*", "", text) or text


# ------------------------------------------------------------------ the grammars, as structural tags
def _text(value: str) -> dict:
    return {"type": "const_string", "value": value}


def _json(schema) -> dict:
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": WHITESPACE_RUN}


def _sequence(*elements: dict) -> dict:
    """`elements` one after the other; those that are no text at all left out (xgrammar takes no empty sequence)."""
    kept = [e for e in elements if e != _text("")]
    if len(kept) <= 1:
        return kept[0] if kept else _text("")
    return {"type": "sequence", "elements": kept}


def _either(elements: list[dict]) -> dict:
    return elements[0] if len(elements) == 1 else {"type": "or", "elements": elements}


def _written(text: str, fmt: CallFormat) -> dict:
    """The text a template writes, any id of the call's shape where it writes one (`ID_SLOT`)."""
    pieces = text.split(ID_SLOT)
    elements = [_text(pieces[0])]
    for piece in pieces[1:]:
        elements += [{"type": "regex", "pattern": f"[A-Za-z0-9]{{{fmt.id_length}}}"}, _text(piece)]
    return _sequence(*elements)


def _arguments(tool: dict) -> dict:
    return _json(tool["function"].get("parameters") or {"type": "object"})


def _calls(fmt: CallFormat, tools: list[dict], several: bool) -> dict:
    """A call's rest from its name on (one of `tools`), and with `several`, further calls as the template joins them,
    up to the end of the turn."""
    start = fmt.reply_start()
    one = _either([_sequence(_text(fmt.reply_start(t["function"]["name"])[len(start):]), _arguments(t))
                   for t in tools])
    more = [{"type": "star", "content": _sequence(_written(fmt.between_calls, fmt), one)}] \
        if several and fmt.between_calls else []
    return _sequence(one, *more, _written(fmt.after_arguments, fmt))


def forced_call(fmt: CallFormat, tools: list[dict], choice: ToolChoice) -> dict:
    """What follows `choice.start` in a forced call: a named function's arguments (one call), or under "required" one
    of the tools' names and its arguments (and more calls where `choice.parallel`)."""
    if choice.name is not None:
        tool = next(t for t in tools if t["function"]["name"] == choice.name)
        return _sequence(_arguments(tool), _written(fmt.after_arguments, fmt))
    return _calls(fmt, tools, several=choice.parallel)


def _whole_call(fmt: CallFormat, tools: list[dict], several: bool) -> dict:
    """A call as the reply writes it from its marker on (Qwen3's before_name holds the empty reasoning block of a
    reply without reasoning: a reasoning block is the grammar's own start, `_after_reasoning`)."""
    start = fmt.reply_start()
    if fmt.marker and fmt.marker in start:
        start = start[start.index(fmt.marker):]
    return _sequence(_text(start), _calls(fmt, tools, several))


def _after_reasoning(thinking, answer: dict) -> dict:
    """`answer` after the reasoning block a reply of the template starts with (`thinking`, a ReasoningFormat): one the
    generation prompt opened is closed first; else it may come first (Qwen3 writes an empty one)."""
    if thinking is None:
        return answer
    block = {"type": "tag", "begin": "" if thinking.opened else thinking.open, "content": {"type": "any_text"},
             "end": thinking.close}
    if not thinking.opened:
        block = {"type": "optional", "content": block}
    space = {"type": "regex", "pattern": f"[ \\t\\r\\n]{{0,{WHITESPACE_RUN}}}"}
    return _sequence(block, space, answer)


def _answer(response_format: dict) -> dict:
    if response_format["type"] == "json_object":
        return _json({"type": "object"})
    return _json(response_format["json_schema"]["schema"])


def wants_json(response_format: dict | None) -> bool:
    return response_format is not None and response_format["type"] != "text"


def constrains(response_format: dict | None, choice: ToolChoice) -> bool:
    """Whether a request may need a grammar (`reply_constraint`): a response_format other than text, a forced call."""
    return bool(choice.start) or wants_json(response_format)


def reply_constraint(chat, response_format: dict | None, choice: ToolChoice = ToolChoice(),
                     tools: list[dict] | None = None, fmt: CallFormat | None = None, *, templated: bool = True):
    """The compiled grammar a reply must follow (None: free text) for a request's `response_format` and its tool
    choice (`choice`, over the offered `tools`, whose calls the template writes as `fmt`). `templated`: the prompt
    is the chat template's, so a reasoning model reasons first; False for /v1/completions, whose reply is the JSON
    from its first token. Compiling takes a while on a new schema: call it off the event loop. A grammar xgrammar
    cannot follow is a RequestError naming the field; so is a `response_format` where xgrammar is not installed."""
    wanted = wants_json(response_format)
    if xgrammar_module() is None:
        if wanted:
            raise RequestError(f"response_format {response_format['type']!r} needs xgrammar, which constrains the "
                               f"reply to it: pip install xgrammar (or 'tunelab[web]') on the server.",
                               "response_format")
        return None  # a forced call is started, as without xgrammar it always was, and not held to the schema
    if choice.start:  # a forced call: its reply is the call (a response_format is for an answer in text)
        return chat.grammars.compile(forced_call(fmt, tools, choice), "tools", _named_tools(tools, choice))
    if not wanted:
        return None
    grammar, what = _answer(response_format), "response_format.json_schema.schema"
    if tools and fmt is not None and fmt.after_name:  # "auto": a call stays possible
        grammar = _either([grammar, _whole_call(fmt, tools, several=choice.parallel)])
        what = f"{what} or the tools' parameters (a reply may be a call)"
    return chat.grammars.compile(_after_reasoning(chat.reasoning if templated else None, grammar), "response_format",
                                 f"{what}: xgrammar cannot hold a reply to it")


def _named_tools(tools: list[dict], choice: ToolChoice) -> str:
    names = [choice.name] if choice.name else [t["function"]["name"] for t in tools]
    return f"tools: xgrammar cannot hold a call to {' or '.join(map(repr, names))} to its parameters"


# ------------------------------------------------------------------ in the batcher
def new_matcher(compiled):
    """A matcher of `compiled` (a grammar from `reply_constraint`) for one reply: it follows the tokens the reply takes
    and tells which may come next."""
    import xgrammar

    return xgrammar.GrammarMatcher(compiled)


def mask_outside_grammars(logits, matchers: list[tuple[int, object]]) -> None:
    """Set to -inf, in place, the logits of every token the grammar of a constrained row does not allow next
    (`matchers`: (row, matcher) of the rows that have one); the other rows are not touched."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    rows = [i for i, matcher in matchers if matcher.fill_next_token_bitmask(bitmask, i)]
    if rows:
        xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)

