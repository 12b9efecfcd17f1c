"""`tool_choice: "required"` and a named function through `tunelab serve`: the reply is started for the model with the
text its template writes before a call (up to the function's name, or with the name given up to the arguments), the
model continues it, and the prefix + continuation is read back as calls are read under "auto". `parallel_tool_calls:
false` keeps a reply's first call alone. The batcher here writes a scripted continuation and keeps the prompts."""

from __future__ import annotations

import json

import pytest

from chat_helpers import openai_client, served_scripted
from test_template_vendors import TOOLS
from tunelab.chat.tools import call_format
from tunelab.data.templates import TEMPLATES, get_template

openai = pytest.importorskip("openai")

ASK = [{"role": "user", "content": "Weather in Paris?"}]
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time of a zone",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def _streamed_calls(chunks) -> tuple[list[tuple[str, dict]], str]:
    calls, finish = [], None
    for chunk in chunks:
        for choice in chunk.choices:
            calls += [(c.function.name, json.loads(c.function.arguments)) for c in choice.delta.tool_calls or []]
            finish = choice.finish_reason or finish
    return calls, finish


# template, tool_choice, the text the reply is started with, the model's continuation
STARTS = [
    ("qwen2_5_chat", "required", '<tool_call>\n{"name": "',
     'get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("qwen2_5_chat", NAMED, '<tool_call>\n{"name": "get_weather", "arguments": ', '{"city": "Paris"}}\n</tool_call>'),
    ("llama3_1_chat", "required", '{"name": "', 'get_weather", "parameters": {"city": "Paris"}}'),
    ("llama3_1_chat", NAMED, '{"name": "get_weather", "parameters": ', '{"city": "Paris"}}'),
    ("mistral_v3", "required", '[TOOL_CALLS] [{"name": "',
     'get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]'),
    ("glm4_chat", NAMED, "get_weather\n", '{"city": "Paris"}'),
    # Qwen3 writes a reply without reasoning with an empty think block before its call
    ("qwen3_chat", "required", '<think>\n\n</think>\n\n<tool_call>\n{"name": "',
     'get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
]


@pytest.mark.parametrize("template, choice, start, continuation", STARTS)
def test_a_forced_call_is_started_in_the_prompt_and_read_back_with_its_start(tiny_tokenizer, template, choice, start,
                                                                            continuation):
    chat, server = served_scripted(tiny_tokenizer, template, [continuation[:9], continuation[9:]])
    with server as url:
        client = openai_client(url)
        answer = client.chat.completions.create(model="m", messages=ASK, tools=[*TOOLS, TIME], tool_choice=choice)
        streamed = list(client.chat.completions.create(model="m", messages=ASK, tools=[*TOOLS, TIME],
                                                       tool_choice=choice, stream=True))
    prompt = chat.template.render(ASK, tools=[*TOOLS, TIME], add_generation_prompt=True)
    for ids in chat.batcher.prompts:  # the generation prompt, then the start of a call
        assert tiny_tokenizer.decode(ids) == prompt + start
    assert _calls(answer.choices[0].message) == [("get_weather", {"city": "Paris"})]
    # OpenAI's finish_reason (vLLM's too): "tool_calls" under "required", "stop" for a named function
    finish = "stop" if choice == NAMED else "tool_calls"
    assert answer.choices[0].finish_reason == finish
    assert not answer.choices[0].message.content
    assert _streamed_calls(streamed) == ([("get_weather", {"city": "Paris"})], finish)


def test_auto_starts_nothing(tiny_tokenizer):
    chat, server = served_scripted(tiny_tokenizer, "qwen2_5_chat", ["Sunny."])
    with server as url:
        answer = openai_client(url).chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="auto")
    assert answer.choices[0].message.content == "Sunny."
    assert tiny_tokenizer.decode(chat.batcher.prompts[0]) == chat.template.render(ASK, tools=TOOLS,
                                                                                  add_generation_prompt=True)


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


def test_a_named_function_keeps_only_its_calls_and_required_keeps_every_call(tiny_tokenizer):
    two = ('get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    _, server = served_scripted(tiny_tokenizer, "qwen2_5_chat", [two])
    with server as url:
        client = openai_client(url)
        required = client.chat.completions.create(model="m", messages=ASK, tools=[*TOOLS, TIME],
                                                  tool_choice="required")
    assert _calls(required.choices[0].message) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    _, server = served_scripted(tiny_tokenizer, "qwen2_5_chat", [two.removeprefix('get_weather", "arguments": ')])
    with server as url:
        named = openai_client(url).chat.completions.create(model="m", messages=ASK, tools=[*TOOLS, TIME],
                                                           tool_choice=NAMED)
    assert _calls(named.choices[0].message) == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_parallel_tool_calls_false_keeps_the_first_call_alone(tiny_tokenizer, choice):
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    two = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    text = f"{one}\n{two}"
    if choice == "required":
        text = text[len('<tool_call>\n{"name": "'):]
    _, server = served_scripted(tiny_tokenizer, "qwen2_5_chat", [text])
    with server as url:
        client = openai_client(url)
        kwargs = dict(model="m", messages=ASK, tools=[*TOOLS, TIME], tool_choice=choice)
        single = client.chat.completions.create(**kwargs, parallel_tool_calls=False)
        streamed = list(client.chat.completions.create(**kwargs, parallel_tool_calls=False, stream=True))
        both = client.chat.completions.create(**kwargs, parallel_tool_calls=True)
    assert _calls(single.choices[0].message) == [("get_weather", {"city": "Paris"})]
    assert _streamed_calls(streamed) == ([("get_weather", {"city": "Paris"})], "tool_calls")
    assert [name for name, _ in _calls(both.choices[0].message)] == ["get_weather", "get_time"]


def test_a_forced_call_the_model_does_not_finish_is_an_error_not_a_reply(tiny_tokenizer):
    """As vLLM answers a "required" reply that is no call: an error, never a reply without the call asked for. Cut
    by max_tokens, a 400 naming max_tokens (raising it helps); any other text, a 500 quoting what the model wrote."""
    _, server = served_scripted(tiny_tokenizer, "qwen2_5_chat", ['get_weather", "arguments": {"ci'], finish="length")
    with server as url:
        client = openai_client(url)
        with pytest.raises(openai.BadRequestError) as cut:
            client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=5)
        events = [line for line in client.chat.completions.with_raw_response.create(
            model="m", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=5, stream=True).http_response
            .iter_lines() if line]
    assert cut.value.body["param"] == "max_tokens"
    assert "max_tokens" in cut.value.body["message"] and "raise" in cut.value.body["message"]
    errors = [json.loads(line[6:])["error"] for line in events if line.startswith("data: {\"error\"")]
    assert [e["param"] for e in errors] == ["max_tokens"] and events[-1] == "data: [DONE]"

    _, server = served_scripted(tiny_tokenizer, "qwen2_5_chat", ["I cannot call that."])
    with server as url:
        with pytest.raises(openai.InternalServerError) as astray:
            openai_client(url).chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=NAMED)
    assert astray.value.body["type"] == "server_error"
    assert "get_weather" in astray.value.body["message"] and "I cannot call that." in astray.value.body["message"]


@pytest.mark.parametrize("template, tools, choice, words", [
    ("qwen2_5_chat", None, "required", "the request has no tools"),
    ("qwen2_5_chat", [], "required", "the request has no tools"),
    ("qwen2_5_chat", TOOLS, {"type": "function", "function": {"name": "get_time"}}, "not among the tools"),
    ("qwen2_5_chat", TOOLS, {"type": "function"}, "'required'"),
    ("qwen2_5_chat", TOOLS, {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}, "'required'"),
    ("qwen2_5_chat", TOOLS, "sometimes", "'required'"),
    ("glm4_chat", TOOLS, "required", "name one"),  # a GLM-4 call starts with the name itself
    ("qwen_chat", TOOLS, "required", "has no place for tools"),
])
def test_a_tool_choice_that_cannot_be_served_is_a_400_naming_why(tiny_tokenizer, template, tools, choice, words):
    chat, server = served_scripted(tiny_tokenizer, template, ["never"])
    with server as url:
        with pytest.raises(openai.BadRequestError) as refused:
            openai_client(url).chat.completions.create(model="m", messages=ASK, tool_choice=choice,
                                                       **({} if tools is None else {"tools": tools}))
    assert words in refused.value.body["message"], refused.value.body
    assert refused.value.body["param"] in ("tool_choice", "tools")
    assert chat.batcher.prompts == []


def test_a_template_that_writes_tools_but_no_call_it_can_start_refuses_a_forced_call(tiny_tokenizer):
    """A tokenizer's own template that writes the definitions but no calls: "auto" is served, a forced call is not."""
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}{% for m in messages %}"
                               "{{ m.role }}: {{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    _, server = served_scripted(tokenizer, get_template("hf", tokenizer), ["Sunny."])
    with server as url:
        client = openai_client(url)
        assert client.chat.completions.create(model="m", messages=ASK, tools=TOOLS).choices[0].message.content == \
            "Sunny."
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=NAMED)
    assert refused.value.body["param"] == "tool_choice"
    assert "writes no tool call" in refused.value.body["message"]


@pytest.mark.parametrize("template", ["qwen2_5_chat", "fewshot"])  # fewshot tokenises its pieces apart
def test_a_reply_start_follows_the_generation_prompt_in_the_prompt_ids(tiny_tokenizer, template):
    from tunelab.chat.engine import ChatModel

    chat = ChatModel(model=None, tokenizer=tiny_tokenizer, template=get_template(template))
    plain, _ = chat.prompt(list(ASK))
    started, _ = chat.prompt(list(ASK), reply_start='{"name": "')
    assert started[:len(plain)] == plain
    assert tiny_tokenizer.decode(started) == tiny_tokenizer.decode(plain) + '{"name": "'
