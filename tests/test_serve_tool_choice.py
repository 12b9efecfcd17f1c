"""How a reply is started as a tool call: the text its template writes before a call (up to the function's name, or
with the name given up to the arguments), right after the generation prompt."""

from __future__ import annotations

import pytest

from test_template_vendors import TOOLS
from tunelab.chat.tools import call_format
from tunelab.data.templates import TEMPLATES, get_template

ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize("name", sorted(n for n in TEMPLATES if n != "hf" and call_format(TEMPLATES[n])))
def test_every_call_format_starts_a_reply_as_its_template_writes_the_call(name):
    """The start is the trained text of a call up to the function's name (or, named, up to its arguments), right after
    the generation prompt: the prompt + start is the start of the conversation holding that call."""
    template, fmt = get_template(name), call_format(get_template(name))
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    whole = template.render([*ASK, {"role": "assistant", "content": "", "tool_calls": [call]}], tools=TOOLS)
    prompt = template.render(ASK, tools=TOOLS, add_generation_prompt=True)
    named = fmt.reply_start("get_weather")
    assert named and whole.startswith(prompt + named), (name, whole[len(prompt):])
    assert whole[len(prompt + named):].startswith('{"city"'), name  # the arguments come next
    if fmt.name_line:  # GLM-4: the name starts the call, nothing before it to start a reply with
        assert fmt.reply_start() == ""
    else:
        assert fmt.reply_start() and named.startswith(fmt.reply_start()) and \
            whole.startswith(prompt + fmt.reply_start() + "get_weather"), name


@pytest.mark.parametrize("template", ["qwen2_5_chat", "fewshot"])  # fewshot tokenises its pieces apart
def test_a_reply_start_follows_the_generation_prompt_in_the_prompt_ids(tiny_tokenizer, template):
    from tunelab.chat.engine import ChatModel

    chat = ChatModel(model=None, tokenizer=tiny_tokenizer, template=get_template(template))
    plain, _ = chat.prompt(list(ASK))
    started, _ = chat.prompt(list(ASK), reply_start='{"name": "')
    assert started[:len(plain)] == plain
    assert tiny_tokenizer.decode(started) == tiny_tokenizer.decode(plain) + '{"name": "'
