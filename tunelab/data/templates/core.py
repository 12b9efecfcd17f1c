"""A chat template: one jinja text renders training text, generation prompts and the exported `chat_template`.

Each built-in template is written in jinja, the language of the vendors' own `chat_template`s, and rendered the way
transformers renders them (sandboxed, `trim_blocks`, `lstrip_blocks`, its `tojson`), so the text tunelab trains on is
the text vLLM, Ollama or transformers build from the exported template. What the model learns from is marked inside the
template with `{% generation message %}...{% endgeneration %}` (transformers' own tag, plus the message so a reply with
`"train": False` stays context); `to_jinja()` is the same text without the marks, so export renders exactly `render()`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunelab.data.messages import TOOL_ROLES
from tunelab.errors import TunelabError

# Private-use characters around the text the model is trained on while `segments()` renders. A trained piece is
# wrapped in TRAINED...END, a reply kept as context ("train": False) in CONTEXT...END.
_TRAINED, _CONTEXT, _END = "\ue000", "\ue001", "\ue002"
_MARKS = re.compile(f"([{_TRAINED}{_CONTEXT}{_END}])")
_GENERATION_TAGS = re.compile(r"\{%-?\s*(?:generation\b[^%]*|endgeneration\s*)-?%\}")


class _GenerationMarks(Extension):
    """`{% generation [message] %}...{% endgeneration %}`: marks trained text while `segments()` renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        message = nodes.Const(None) if parser.stream.current.type == "block_end" else parser.parse_expression()
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        args = [nodes.Name("_tunelab_marks", "load"), message]
        return nodes.CallBlock(self.call_method("_mark", args), [], [], body).set_lineno(lineno)

    @staticmethod
    def _mark(marks, message, caller):
        text = caller()
        if not marks or not text:
            return text
        trained = not (isinstance(message, dict) and message.get("train", True) is False)
        return (_TRAINED if trained else _CONTEXT) + text + _END


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping, keys in the caller's order
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationMarks, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env


@lru_cache(maxsize=256)
def compile_jinja(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def _prepare(messages: list[dict]) -> list[dict]:
    """Messages as a chat template expects them: tool results (`TOOL_ROLES`) under role 'tool', content a string."""
    out = []
    for m in messages:
        role = "tool" if m.get("role") in TOOL_ROLES else m.get("role")
        content = m.get("content")
        if isinstance(content, str) and _MARKS.search(content):
            content = _MARKS.sub("", content)  # private-use characters cannot carry meaning for a model
        out.append({**m, "role": role, "content": "" if content is None else content})
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format. `source` is jinja with `{% generation message %}` around what the model learns to write."""

    name: str
    source: str = field(repr=False)
    stop_words: tuple[str, ...] = ()
    default_system: str = ""
    """System prompt used when a conversation has none (the vendor's own default, e.g. Qwen2.5's)."""
    vendor: str = ""
    """The model whose published chat_template this one reproduces (docs/DATA.md lists the intended differences)."""
    eos_token: str = ""
    """The tokenizer's end-of-sequence token, for a template that writes `eos_token` (fewshot, whose replies no token
    of its own ends): `get_template(name, tokenizer)` sets it. Unset, the text names none (transformers passes the
    tokenizer's to an exported template)."""
    pieces_apart: bool = False
    """Each piece of the text (a message; a reply with what ends it) is tokenised on its own and the ids joined, as
    LLaMA-Factory encodes each message: the pieces meet in plain text (fewshot's "Answer:" and the reply "A"), where
    tokenising the whole text would merge tokens across the join, so the reply would not start with the token the
    prompt is answered with. Otherwise the whole text is tokenised once (docs/DESIGN.md, Templates)."""

    def _header(self) -> str:
        header = "{%- set default_system = " + json.dumps(self.default_system, ensure_ascii=False) + " %}\n"
        if self.eos_token:
            header += "{%- set eos_token = " + json.dumps(self.eos_token, ensure_ascii=False) + " %}\n"
        return header

    def to_jinja(self) -> str:
        """An HF `chat_template` that renders exactly `render()` (the merged model's tokenizer gets it)."""
        return self._header() + _GENERATION_TAGS.sub("", self.source)

    def _render(self, source: str, messages, tools, add_generation_prompt, marks, options) -> str:
        if not messages:
            raise TunelabError(f"template {self.name!r}: a conversation needs at least one message")
        try:
            return compile_jinja(source).render(
                messages=_prepare(messages), tools=tools or None, add_generation_prompt=add_generation_prompt,
                _tunelab_marks=marks, **options)
        except jinja2.exceptions.TemplateError as exc:
            raise TunelabError(f"template {self.name!r} cannot render this conversation: {exc}") from None

    def render(self, messages: list[dict], *, tools: Optional[list] = None, add_generation_prompt: bool = False,
               **options) -> str:
        """The conversation as text (what the exported chat_template renders for the same arguments)."""
        return self._render(self.to_jinja(), messages, tools, add_generation_prompt, False, options)

    def prompt_pieces(self, messages: list[dict], *, tools: Optional[list] = None, reply_start: str = "") -> list[str]:
        """The generation prompt for `messages` as the texts to tokenise one by one, their ids joined: the whole text,
        or each of its pieces where the template keeps them apart (`pieces_apart`). `reply_start`: the start of the
        reply written after it (the reply's own piece where pieces are apart)."""
        if not self.pieces_apart:
            return [self.render(messages, tools=tools, add_generation_prompt=True) + reply_start]
        pieces = [text for text, _ in self.segments(messages, tools=tools, add_generation_prompt=True)]
        return pieces + [reply_start] if reply_start else pieces

    def prompt_ids(self, tokenizer, messages: list[dict], *, tools: Optional[list] = None,
                   reply_start: str = "") -> list[int]:
        """The generation prompt's token ids (no special tokens added: the template writes them), tokenised as
        training tokenises its text (`encode.token_ids`); `reply_start`: text the reply starts with, for the model
        to go on with (a tool call's start, `tunelab.chat.tools.CallFormat.reply_start`)."""
        from tunelab.data.encode import token_ids

        pieces = self.prompt_pieces(messages, tools=tools, reply_start=reply_start)
        return [i for ids in token_ids(tokenizer, pieces) for i in ids]

    def segments(self, messages: list[dict], *, tools: Optional[list] = None, add_generation_prompt: bool = False,
                 **options) -> list[tuple[str, bool]]:
        """The rendered text in pieces, each flagged True if the model is trained on it."""
        marked = self._render(self._header() + self.source, messages, tools, add_generation_prompt, True, options)
        pieces: list[tuple[str, bool]] = []
        trained = False
        for part in _MARKS.split(marked):
            if part in (_TRAINED, _CONTEXT, _END):
                trained = part == _TRAINED
            elif part:
                pieces.append((part, trained))
        return pieces


@dataclass(frozen=True)
class HFChatTemplate(ChatTemplate):
    """The tokenizer's own chat_template. Trained pieces come from its `{% generation %}` marks when it has them,
    else from rendering the conversation one assistant turn at a time and diffing."""

    tokenizer: Any = field(default=None, compare=False, repr=False)

    def _variables(self) -> dict:
        tok = self.tokenizer
        names = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
        return {n: str(getattr(tok, n)) for n in names if getattr(tok, n, None) is not None}

    def to_jinja(self) -> str:
        return self.tokenizer.chat_template

    def render(self, messages, *, tools=None, add_generation_prompt=False, **options) -> str:
        try:
            return self.tokenizer.apply_chat_template(_prepare(messages), tools=tools or None, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **options)
        except jinja2.TemplateError as exc:  # the template's own raise_exception: e.g. Gemma-2's on a system prompt
            # the system prompt is named as the cause only where there is one (Gemma-2's also refuses two user turns
            # in a row)
            fix = ("If it is the system prompt: remove SYSTEM and the records' system messages, or use"
                   if any(m.get("role") == "system" for m in messages) else "Fix the conversation, or use")
            raise TunelabError(
                f"prompt_template='hf': the tokenizer's chat_template refuses this conversation ({exc}). {fix} the "
                "built-in template of the model's family (`guess_template` names it), which takes it.") from None

    def segments(self, messages, *, tools=None, add_generation_prompt=False, **options):
        if "generation" in self.tokenizer.chat_template and _GENERATION_TAGS.search(self.tokenizer.chat_template):
            return ChatTemplate.segments(
                ChatTemplate(self.name, self.tokenizer.chat_template), messages, tools=tools,
                add_generation_prompt=add_generation_prompt, **{**self._variables(), **options})
        return self._segments_by_prefix(messages, tools, add_generation_prompt, options)

    def _segments_by_prefix(self, messages, tools, add_generation_prompt, options):
        def apply(msgs, gen):
            return self.render(msgs, tools=tools, add_generation_prompt=gen, **options)

        pieces: list[tuple[str, bool]] = []
        done = ""
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt, full = apply(messages[:k], True), apply(messages[: k + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                alike = " or ".join(f"prompt_template = {name!r}" for name in self._builtins_alike(options))
                use = (f"Use {alike}, the built-in template that renders this model's conversations as its "
                       "chat_template does" if alike else "Use the built-in template for this model "
                       "(`guess_template` names it)")
                raise TunelabError(
                    "prompt_template='hf': the tokenizer's chat_template renders earlier turns differently once a "
                    "turn is added (e.g. it drops old reasoning), so the trained parts cannot be found by diffing. "
                    f"{use}, or add {{% generation %}}...{{% endgeneration %}} around the assistant text in the "
                    "chat_template.")
            trained = msg.get("train", True) is not False
            end = _turn_end(full, len(prompt), self.stop_words)
            if end is None:  # no token ends the reply (ChatGLM3, GLM-4): the model stops by writing the next turn's
                full += self._next_turn_token(messages, k, full, apply)
                end = len(full)
            pieces += [(prompt[len(done):], False), (full[len(prompt):end], trained), (full[end:], False)]
            done = full
        rest = apply(messages, add_generation_prompt)
        if rest.startswith(done) and len(rest) > len(done):
            pieces.append((rest[len(done):], False))
        return [p for p in pieces if p[0]]

    def _builtins_alike(self, options) -> list[str]:
        """The built-in templates that render the most of a few probe conversations (generation prompts, with and
        without a system prompt, and finished ones) exactly as the tokenizer's chat_template does: the one to train
        with when this template cannot be diffed (Mistral v0.3's, Phi-3's and Qwen3's rewrite earlier turns)."""
        from tunelab.data.templates.families import DEFINITIONS  # (families builds on this module)

        system, turns = {"role": "system", "content": "S"}, [{"role": "user", "content": "Q1"},
                                                            {"role": "assistant", "content": "A1"},
                                                            {"role": "user", "content": "Q2"},
                                                            {"role": "assistant", "content": "A2"}]
        probes = [(turns[:3], True), ([system, *turns[:3]], True), (turns[:2], False), ([system, *turns], False)]
        scores = {t.name: sum(_renders_alike(t, self, messages, gen, options) for messages, gen in probes)
                  for t in DEFINITIONS}
        best = max(scores.values(), default=0)
        return [name for name, score in scores.items() if best and score == best]

    def _next_turn_token(self, messages, k, full, apply) -> str:
        """The stop word the template writes right after reply `k` (`full` ends with it), which the reply is trained
        up to, as the built-in chatglm3 / glm4_chat train '<|user|>' or '<|observation|>': a model whose template
        writes no token after a reply stops by writing the next role token. The next message shows which; after a
        conversation's last reply a user turn does (a tool result after a reply with tool calls), and the token is
        added to the text, so the model learns to stop there too. '' when the template writes no stop word next."""
        following = messages[k + 1:k + 2] or [
            {"role": "tool", "content": "x"} if messages[k].get("tool_calls") else {"role": "user", "content": "x"}]
        try:
            text = apply(messages[:k + 1] + following, False)
        except TunelabError:  # refused after this reply: the conversation's own next message raises where it renders
            return ""
        after = text[len(full):] if text.startswith(full) else ""
        return next((word for word in self.stop_words if after.startswith(word)), "")


def _renders_alike(template: ChatTemplate, hf: HFChatTemplate, messages, add_generation_prompt, options) -> bool:
    """Whether the built-in `template` renders `messages` as the tokenizer's chat_template does (a conversation either
    refuses counts as different)."""
    try:
        return template.render(messages, add_generation_prompt=add_generation_prompt, **options) == \
            hf.render(messages, add_generation_prompt=add_generation_prompt, **options)
    except TunelabError:
        return False


def _turn_end(text: str, start: int, ends: tuple[str, ...]) -> Optional[int]:
    """Where a reply rendered at text[start:] ends: after its last end-of-turn token (`ends`, the template's stop
    words), as every built-in template trains it. What the template writes after that token (ChatML's '\n' after
    <|im_end|>) is the next turn's prompt, not trained. None when the reply holds no such token."""
    return max((text.rfind(end, start) + len(end) for end in ends if text.find(end, start) >= 0), default=None)


def hf_template(tokenizer) -> HFChatTemplate:
    """'hf': the tokenizer's own chat_template."""
    if tokenizer is None:
        raise TunelabError("prompt_template='hf' needs the tokenizer (its chat_template is the template).")
    if not getattr(tokenizer, "chat_template", None):
        raise TunelabError(f"prompt_template='hf': the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has "
                           f"no chat_template. Choose a named template, e.g. one from `guess_template`.")
    known_ends = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
                  "<｜end▁of▁sentence｜>", "<|user|>", "<|observation|>")
    vocab = tokenizer.get_vocab()
    stops = tuple(dict.fromkeys([w for w in (tokenizer.eos_token, *known_ends) if w and w in vocab]))
    return HFChatTemplate(name="hf", source="", stop_words=stops, tokenizer=tokenizer)
