"""Chat templates: how a conversation becomes text.

One definition per template serves training (which pieces are trained on), evaluation, chat, serving, and export
(`to_jinja()` becomes the merged tokenizer's `chat_template`), so a model chats the way it was trained.
Texts follow each model's published chat format (XTuner's templates were the reference for the older ones).
`guess_template(model_dir)` picks one from a model's config.json; 'hf' uses the tokenizer's own chat_template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from tunelab.errors import TunelabError

TOOL_ROLES = ("tool", "function", "observation")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str = "{system}"
    """Format of the system prompt ('' when the template has no system slot)."""
    user: str = "{content}"
    """Format of a user turn, including whatever opens the assistant's reply."""
    assistant_end: str = ""
    """Appended after each assistant reply; trained on, so the model learns to stop."""
    separator: str = ""
    """Between a finished exchange and the next user (or tool) turn (not trained)."""
    tool: Optional[str] = None
    """Format of a tool / function result turn, including whatever opens the assistant's next reply.
    None: tool results are written like a user turn (templates with no tool role)."""
    bos: str = ""
    """Text at the very start (e.g. '<s>'), since text is tokenised with add_special_tokens=False."""
    stop_words: tuple[str, ...] = ()
    default_system: str = ""
    system_in_first_user: bool = False
    """Templates with no system role (llama2, mistral, gemma) put it inside the first user turn."""
    generation_prompt: str = ""
    """The tail of `user` / `tool` that opens the assistant's reply: left out when a conversation ends with a user
    turn and add_generation_prompt=False (as HF's apply_chat_template does)."""

    def _turn(self, fmt: str, content: str, opens_reply: bool) -> str:
        text = fmt.format(content=content)
        if not opens_reply and self.generation_prompt and text.endswith(self.generation_prompt):
            text = text[: -len(self.generation_prompt)]
        return text

    def segments(self, messages: list[dict], *, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """Split a conversation into text pieces, each flagged True if the model is trained on it."""
        messages = list(messages)
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
        pieces: list[tuple[str, bool]] = []
        if self.bos:
            pieces.append((self.bos, False))
        pending_system = ""
        if system:
            if self.system_in_first_user:
                pending_system = self.system.format(system=system)
            elif self.system:
                pieces.append((self.system.format(system=system), False))
        for i, msg in enumerate(messages):
            role, content = msg["role"], msg["content"]
            last = i == len(messages) - 1
            opens_reply = not last or add_generation_prompt
            if role in ("user", *TOOL_ROLES) and i > 0 and messages[i - 1]["role"] == "assistant" and self.separator:
                pieces.append((self.separator, False))
            if role == "user":
                pieces.append((self._turn(self.user, pending_system + content, opens_reply), False))
                pending_system = ""
            elif role == "assistant":
                pieces.append((content + self.assistant_end, True))
            elif role in TOOL_ROLES:
                pieces.append((self._turn(self.tool or self.user, content, opens_reply), False))
            elif role == "system":
                raise TunelabError(f"template {self.name!r}: a system message may only come first")
            else:
                raise TunelabError(f"template {self.name!r}: unknown role {role!r} (use system/user/assistant/tool)")
        return pieces

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt=add_generation_prompt))

    def to_jinja(self) -> str:
        """An HF `chat_template` whose output is exactly `render()` (for the merged model's tokenizer)."""
        lit = json.dumps

        def turn(fmt: str) -> str:  # 'before{content}after' with the reply opener only when it is wanted
            before, _, after = fmt.partition("{content}")
            opener = self.generation_prompt if self.generation_prompt and after.endswith(self.generation_prompt) else ""
            after = after[: len(after) - len(opener)]
            out = "{{ " + lit(before) + " + content + " + lit(after) + " }}"
            if opener:
                out += "{% if not loop.last or add_generation_prompt %}{{ " + lit(opener) + " }}{% endif %}"
            return out

        sys_before, _, sys_after = self.system.partition("{system}")
        system_text = lit(sys_before) + " + ns.system + " + lit(sys_after)
        parts = [
            "{%- set ns = namespace(system=" + lit(self.default_system) + ", pending='') -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}"
            "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}",
            "{{- " + lit(self.bos) + " -}}" if self.bos else "",
        ]
        if self.system and self.system_in_first_user:
            parts.append("{%- if ns.system -%}{%- set ns.pending = " + system_text + " -%}{%- endif -%}")
        elif self.system:
            parts.append("{%- if ns.system -%}{{- " + system_text + " -}}{%- endif -%}")
        parts += [
            "{%- for message in loop_messages -%}",
            "{%- set content = message['content'] -%}",
            "{%- if message['role'] != 'assistant' and not loop.first and loop_messages[loop.index0 - 1]['role'] "
            "== 'assistant' -%}{{- " + lit(self.separator) + " -}}{%- endif -%}" if self.separator else "",
            "{%- if message['role'] == 'user' -%}{%- set content = ns.pending + content -%}{%- set ns.pending = '' -%}",
            turn(self.user),
            "{%- elif message['role'] == 'assistant' -%}{{- content + " + lit(self.assistant_end) + " -}}",
            "{%- elif message['role'] in " + lit(list(TOOL_ROLES)) + " -%}",
            turn(self.tool or self.user),
            "{%- else -%}{{- raise_exception('unknown role ' + message['role']) -}}",
            "{%- endif -%}{%- endfor -%}",
        ]
        return "".join(parts)


@dataclass(frozen=True)
class HFChatTemplate(ChatTemplate):
    """The tokenizer's own chat_template. Trained pieces are found by rendering growing prefixes and diffing."""

    tokenizer: Any = field(default=None, compare=False, repr=False)

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def segments(self, messages: list[dict], *, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        pieces: list[tuple[str, bool]] = []
        done = ""
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self._apply(messages[:k], True)
            full = self._apply(messages[: k + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise TunelabError(
                    "prompt_template='hf': the tokenizer's chat_template does not render a conversation as a growing "
                    "text (earlier turns change when a turn is added), so the trained parts cannot be found. "
                    "Use a named template instead (see `tunelab preview --help`).")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        rest = self._apply(messages, add_generation_prompt)
        if rest.startswith(done) and len(rest) > len(done):
            pieces.append((rest[len(done):], False))
        return [p for p in pieces if p[0]]

    def to_jinja(self) -> str:
        return self.tokenizer.chat_template


_CHATML = dict(
    system="<|im_start|>system\n{system}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    separator="\n",
    tool="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
    generation_prompt="<|im_start|>assistant\n",
    stop_words=("<|im_end|>", "<|endoftext|>"),
)
_MISTRAL = dict(bos="<s>", system="{system}\n\n", system_in_first_user=True, user="[INST] {content} [/INST]",
                assistant_end="</s>", stop_words=("</s>",))

_DEFINITIONS = [
    ChatTemplate(name="default", system="{system}\n", user="### Human: {content}\n### Assistant: ",
                 assistant_end="</s>", separator="\n", generation_prompt="### Assistant: ",
                 stop_words=("</s>", "### Human:")),
    ChatTemplate(name="internlm_chat", bos="<s>", system="<|System|>:{system}\n",
                 user="<|User|>:{content}<eoh>\n<|Bot|>:", assistant_end="<eoa>", separator="\n",
                 generation_prompt="<|Bot|>:", stop_words=("<eoa>",)),
    ChatTemplate(name="internlm2_chat", bos="<s>", **{
        **_CHATML, "stop_words": ("<|im_end|>",),
        "tool": "<|im_start|>environment name=<|plugin|>\n{content}<|im_end|>\n<|im_start|>assistant\n"}),
    ChatTemplate(name="qwen_chat", **_CHATML),
    ChatTemplate(name="yi_chat", **_CHATML),
    ChatTemplate(
        name="llama2_chat", system="<<SYS>>\n{system}\n<</SYS>>\n\n", system_in_first_user=True,
        user="<s>[INST] {content} [/INST] ", assistant_end=" </s>", stop_words=("</s>",)),
    ChatTemplate(
        name="llama3_chat", bos="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_end="<|eot_id|>",
        tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        stop_words=("<|eot_id|>", "<|end_of_text|>"),
    ),
    ChatTemplate(name="mistral", **_MISTRAL),
    ChatTemplate(name="mixtral", **_MISTRAL),
    ChatTemplate(name="chatglm3", bos="[gMASK]<sop>", system="<|system|>\n{system}",
                 user="<|user|>\n{content}<|assistant|>\n", assistant_end="</s>",
                 tool="<|observation|>\n{content}<|assistant|>\n", generation_prompt="<|assistant|>\n",
                 stop_words=("</s>", "<|user|>", "<|observation|>")),
    ChatTemplate(name="baichuan2_chat", system="{system}", user="<reserved_106>{content}<reserved_107>",
                 assistant_end="</s>", generation_prompt="<reserved_107>", stop_words=("</s>",)),
    ChatTemplate(name="gemma", bos="<bos>", system="{system}\n\n", system_in_first_user=True,
                 user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
                 assistant_end="<end_of_turn>", separator="\n", generation_prompt="<start_of_turn>model\n",
                 stop_words=("<end_of_turn>", "<eos>")),
    ChatTemplate(name="phi3_chat", system="<|system|>\n{system}<|end|>\n",
                 user="<|user|>\n{content}<|end|>\n<|assistant|>\n", assistant_end="<|end|>", separator="\n",
                 generation_prompt="<|assistant|>\n", stop_words=("<|end|>", "<|endoftext|>")),
    ChatTemplate(name="deepseek_v2", bos="<｜begin▁of▁sentence｜>", system="{system}\n\n",
                 user="User: {content}\n\nAssistant: ", assistant_end="<｜end▁of▁sentence｜>",
                 generation_prompt="Assistant: ", stop_words=("<｜end▁of▁sentence｜>",)),
    ChatTemplate(name="zephyr", system="<|system|>\n{system}</s>\n", user="<|user|>\n{content}</s>\n<|assistant|>\n",
                 assistant_end="</s>", separator="\n", generation_prompt="<|assistant|>\n", stop_words=("</s>",)),
    ChatTemplate(name="vicuna", bos="<s>", system="{system} ", user="USER: {content} ASSISTANT: ",
                 assistant_end="</s>", generation_prompt="ASSISTANT: ", stop_words=("</s>", "USER:"),
                 default_system="A chat between a curious user and an artificial intelligence assistant. The "
                                "assistant gives helpful, detailed, and polite answers to the user's questions."),
]
ALIASES = {"internlm2_5_chat": "internlm2_chat", "internlm3_chat": "internlm2_chat", "qwen2_chat": "qwen_chat",
           "chatml": "qwen_chat", "llama3_1_chat": "llama3_chat", "glm4_chat": "chatglm3"}

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in _DEFINITIONS}
TEMPLATES.update({alias: replace(TEMPLATES[target], name=alias) for alias, target in ALIASES.items()})
TEMPLATES["hf"] = HFChatTemplate(name="hf")
"""Every template by name; 'hf' needs a tokenizer: get it with get_template('hf', tokenizer)."""


def get_template(name: str, tokenizer=None) -> ChatTemplate:
    """The template called `name`. ('hf' = the tokenizer's own chat_template; needs `tokenizer`.)"""
    if name == "hf":
        if tokenizer is None:
            raise TunelabError("prompt_template='hf' needs the tokenizer (its chat_template is the template).")
        if not getattr(tokenizer, "chat_template", None):
            raise TunelabError(f"prompt_template='hf': the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has "
                               f"no chat_template. Choose a named template, e.g. one from `guess_template`.")
        eos = tokenizer.eos_token
        known_ends = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
        vocab = tokenizer.get_vocab()
        stops = tuple(dict.fromkeys([w for w in (eos, *known_ends) if w and w in vocab]))
        return HFChatTemplate(name="hf", stop_words=stops, tokenizer=tokenizer)
    if name in TEMPLATES:
        return TEMPLATES[name]
    known = ", ".join(sorted(TEMPLATES))
    raise TunelabError(f"unknown prompt_template {name!r}. Known templates: {known}")


# --- guessing the template from a model --------------------------------------------------------

_BY_NAME = [("vicuna", "vicuna"), ("zephyr", "zephyr"), ("yi-", "yi_chat"), ("yi_", "yi_chat"),
            ("mixtral", "mixtral"), ("internlm3", "internlm3_chat"), ("internlm2", "internlm2_chat"),
            ("deepseek-v2", "deepseek_v2"), ("chatglm", "chatglm3"), ("glm-4", "chatglm3")]
_BY_TYPE = {"internlm": "internlm_chat", "internlm2": "internlm2_chat", "internlm3": "internlm3_chat",
            "qwen": "qwen_chat", "qwen2": "qwen_chat", "qwen2_moe": "qwen_chat", "qwen3": "qwen_chat",
            "qwen3_moe": "qwen_chat", "mistral": "mistral", "mixtral": "mixtral", "gemma": "gemma",
            "gemma2": "gemma", "gemma3": "gemma", "gemma3_text": "gemma", "phi3": "phi3_chat", "chatglm": "chatglm3",
            "glm": "chatglm3", "glm4": "chatglm3", "baichuan": "baichuan2_chat", "deepseek_v2": "deepseek_v2",
            "deepseek_v3": "deepseek_v2"}


def guess_template(model_config_or_dir) -> Optional[str]:
    """A template name for a model (a directory, a config.json path, a config dict or a transformers config)."""
    name = ""
    config: dict = {}
    if isinstance(model_config_or_dir, (str, Path)):
        path = Path(model_config_or_dir)
        # Only the model's own folder names count (e.g. "Yi-6B/merged"), not where the user keeps experiments.
        name = "/".join(path.resolve().parts[-2:]) if path.exists() else str(model_config_or_dir)
        path = path / "config.json" if path.is_dir() else path
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
    elif isinstance(model_config_or_dir, dict):
        config = model_config_or_dir
    else:
        config = model_config_or_dir.to_dict()
    name = (name + " " + str(config.get("_name_or_path", ""))).lower()
    for needle, template in _BY_NAME:
        if needle in name:
            return template
    model_type = str(config.get("model_type", "")).lower()
    architectures = " ".join(config.get("architectures") or []).lower()
    if model_type == "llama" or (not model_type and "llama" in architectures):
        return "llama3_chat" if int(config.get("vocab_size") or 0) >= 128000 else "llama2_chat"
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    for needle, template in sorted(_BY_TYPE.items(), key=lambda kv: -len(kv[0])):
        if needle in architectures:
            return template
    return None
