"""Chat templates: how a conversation becomes the text a model is trained on and prompted with.

One definition per template serves training (which pieces are trained on), evaluation, chat, serving and export
(`to_jinja()` becomes the merged tokenizer's `chat_template`), so a model chats the way it was trained. Each built-in
template renders what its vendor's published chat_template renders (tests/vendor_templates holds those, docs/DATA.md
lists them). 'hf' uses the tokenizer's own chat_template; `guess_template(model_dir)` picks one for a model.
"""

from __future__ import annotations

from dataclasses import replace

from tunelab.data.templates.core import TOOL_ROLES, ChatTemplate, HFChatTemplate, hf_template
from tunelab.data.templates.families import ALIASES, DEFINITIONS
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
        return TEMPLATES[name]
    known = ", ".join(sorted(TEMPLATES))
    raise TunelabError(f"unknown prompt_template {name!r}. Known templates: {known}")


__all__ = ["TEMPLATES", "TOOL_ROLES", "ChatTemplate", "HFChatTemplate", "get_template", "guess_template"]
