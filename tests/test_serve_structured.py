"""Structured output through `tunelab serve`: `response_format` (json_object, json_schema) and forced tool calls whose
arguments follow the tool's `parameters`, by xgrammar's token masks in the batcher. The model is a random tiny llama:
it writes nonsense, so whatever it writes under a constraint is the constraint's doing. Schemas use enums, bounded
integers, booleans and short strings, so that a random model reaches the end of the JSON within max_tokens."""

from __future__ import annotations

import json
import sys
import threading

import pytest

from chat_helpers import openai_client, served_scripted

openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

ASK = [{"role": "user", "content": "What will the weather be?"}]
FORECAST = {"type": "object", "properties": {
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "alerts": {"type": "boolean"}},
    "required": ["unit", "days", "alerts"], "additionalProperties": False}
AS_FORECAST = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST, "strict": True}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}}, "required": ["zone"],
    "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}


def _problems(instance, schema) -> list[str]:
    """Where `instance` breaks `schema`, by the jsonschema package (Draft 2020-12)."""
    return [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(instance)]


def _valid_json(text: str, schema: dict):
    value = json.loads(text)
    assert not _problems(value, schema), (text, _problems(value, schema))
    return value


@pytest.fixture(scope="module")
def chat(tiny_llama_dir):
    """A random tiny llama with Qwen2.5's template (it writes tool calls as <tool_call> JSON), batching."""
    from tunelab.chat.engine import load_chat_model

    chat = load_chat_model(str(tiny_llama_dir), max_batch_size=8, prompt_template="qwen2_5_chat")
    yield chat
    chat.close()


@pytest.fixture(scope="module")
def server_url(chat):
    from tunelab.chat.http_server import BackgroundServer
    from tunelab.chat.server import create_app
    from tunelab.model.generate import GenerationSettings

    with BackgroundServer(create_app(chat, GenerationSettings(max_new_tokens=300), max_tokens_limit=2000)) as url:
        yield url


@pytest.fixture
def client(server_url):
    return openai_client(server_url)


def _streamed(chunks) -> tuple[str, str]:
    text, finish = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def test_json_object_gives_a_json_object(client):
    free = client.chat.completions.create(model="m", messages=ASK, max_tokens=40)
    with pytest.raises(ValueError):  # unconstrained, the random model writes no JSON
        json.loads(free.choices[0].message.content)
    for seed in (None, 3):  # greedy, then sampled
        answer = client.chat.completions.create(model="m", messages=ASK, response_format={"type": "json_object"},
                                                max_tokens=400, seed=seed, temperature=0.8 if seed else None)
        assert answer.choices[0].finish_reason == "stop", answer
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    text, finish = _streamed(client.chat.completions.create(
        model="m", messages=ASK, response_format={"type": "json_object"}, max_tokens=400, stream=True))
    assert finish == "stop" and isinstance(json.loads(text), dict)


def test_json_schema_gives_an_instance_of_the_schema(client):
    answer = client.chat.completions.create(model="m", messages=ASK, response_format=AS_FORECAST, max_tokens=300)
    assert answer.choices[0].finish_reason == "stop"
    value = _valid_json(answer.choices[0].message.content, FORECAST)
    assert set(value) == {"unit", "days", "alerts"}
    assert answer.usage.completion_tokens < 300
    for seed in (1, 2, 5):
        sampled = client.chat.completions.create(model="m", messages=ASK, response_format=AS_FORECAST, max_tokens=300,
                                                 temperature=1.0, top_p=1.0, seed=seed,
                                                 extra_body={"top_k": 0})
        _valid_json(sampled.choices[0].message.content, FORECAST)
    text, finish = _streamed(client.chat.completions.create(model="m", messages=ASK, response_format=AS_FORECAST,
                                                            max_tokens=300, stream=True))
    assert finish == "stop" and text == answer.choices[0].message.content


def test_text_is_free_text(client):
    plain = client.chat.completions.create(model="m", messages=ASK, max_tokens=20)
    text = client.chat.completions.create(model="m", messages=ASK, max_tokens=20, response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content


def test_a_template_stop_word_inside_a_json_string_does_not_end_the_reply(client):
    """<|im_end|> ends a Qwen reply, as its token; spelt out inside a JSON string it is text, and the reply goes on to
    the end of the JSON."""
    schema = {"type": "object", "properties": {"end": {"const": "<|im_end|>"}, "ok": {"type": "boolean"}},
              "required": ["end", "ok"], "additionalProperties": False}
    answer = client.chat.completions.create(model="m", messages=ASK, max_tokens=300, response_format={
        "type": "json_schema", "json_schema": {"name": "ending", "schema": schema}})
    assert answer.choices[0].finish_reason == "stop"
    assert _valid_json(answer.choices[0].message.content, schema)["end"] == "<|im_end|>"


def test_max_tokens_cuts_a_constrained_reply_with_length(client):
    answer = client.chat.completions.create(model="m", messages=ASK, response_format=AS_FORECAST, max_tokens=3)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
    with pytest.raises(ValueError):
        json.loads(answer.choices[0].message.content)
    assert answer.choices[0].message.content.startswith("{")


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_a_named_call_has_arguments_valid_for_the_tool_schema(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                            max_tokens=300)
    assert answer.choices[0].finish_reason == "stop"  # OpenAI's for a named function; "tool_calls" under "required"
    [(name, arguments)] = _calls(answer.choices[0].message)
    assert name == "get_weather" and not _problems(arguments, SCHEMAS["get_weather"]), arguments
    streamed = list(client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                                   max_tokens=300, stream=True))
    calls = [(c.function.name, json.loads(c.function.arguments)) for chunk in streamed for choice in chunk.choices
             for c in choice.delta.tool_calls or []]
    assert calls == [(name, arguments)]


@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_one_of_the_tools_with_valid_arguments(client, parallel):
    answer = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                            parallel_tool_calls=parallel, max_tokens=400)
    calls = _calls(answer.choices[0].message)
    assert calls and answer.choices[0].finish_reason == "tool_calls"
    for name, arguments in calls:
        assert name in SCHEMAS and not _problems(arguments, SCHEMAS[name]), (name, arguments)
    if not parallel:
        assert len(calls) == 1


@pytest.mark.parametrize("response_format, words", [
    ("json", "should be an object"),
    ({"type": "xml"}, '"xml"'),
    ({}, "type"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}, "schema"),
    ({"type": "json_schema", "json_schema": {"schema": FORECAST}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": FORECAST, "strict": "yes"}}, "strict"),
])
def test_a_bad_response_format_is_a_400_naming_it(client, response_format, words):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=ASK, response_format=response_format)
    error = refused.value.body
    assert error["param"] == "response_format" and error["type"] == "invalid_request_error"
    assert "response_format" in error["message"] and words in error["message"], error


def test_a_schema_xgrammar_cannot_compile_is_a_400_with_its_reason(client):
    bad = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 2}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": bad}})
    assert refused.value.body["param"] == "response_format"
    assert "minimum greater than maximum" in refused.value.body["message"], refused.value.body
    assert "json_converter.cc" not in refused.value.body["message"] and ".cc:" not in refused.value.body["message"]
    tool = {"type": "function", "function": {"name": "count", "parameters": bad}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=ASK, tools=[tool], tool_choice="required")
    assert refused.value.body["param"] == "tools" and "count" in refused.value.body["message"]


def test_an_unconstrained_request_beside_a_constrained_one_gets_what_it_gets_alone(chat):
    """Masks touch only the rows that have a grammar: a free reply decoded in the same batch as a constrained one is
    token for token the reply it gets alone, and the constrained one the reply it gets alone."""
    from tunelab.chat.grammar import reply_constraint
    from tunelab.chat.tools import ToolChoice
    from tunelab.model.generate import GenerationSettings

    free_ids = chat.encode([{"role": "user", "content": "Tell me something"}])
    json_ids = chat.encode(ASK)
    constraint = reply_constraint(chat, AS_FORECAST, ToolChoice(), None, None)
    sizes = []
    hook = chat.model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)

    def run(jobs):
        results, done = {}, threading.Semaphore(0)
        for name, ids, n, grammar in jobs:
            def finish(reply, name=name):
                results[name] = reply
                done.release()
            chat.batcher.submit(chat.job(ids, GenerationSettings(max_new_tokens=n), ignore_eos=grammar is None,
                                         constraint=grammar, on_done=finish))
        for _ in jobs:
            assert done.acquire(timeout=120)
        return results

    try:
        free_alone = run([("free", free_ids, 40, None)])["free"]
        json_alone = run([("json", json_ids, 300, constraint)])["json"]
        sizes.clear()
        together = run([("free", free_ids, 40, None), ("json", json_ids, 300, constraint)])
    finally:
        hook.remove()
    assert max(sizes) == 2  # they did share decode steps
    assert together["free"].token_ids == free_alone.token_ids and together["free"].finish_reason == "length"
    assert together["json"].token_ids == json_alone.token_ids and together["json"].finish_reason == "stop"
    _valid_json(together["json"].text, FORECAST)


def test_without_xgrammar_a_response_format_is_a_400_and_a_forced_call_goes_unconstrained(tiny_tokenizer,
                                                                                       monkeypatch):
    call = 'get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    chat, server = served_scripted(tiny_tokenizer, "qwen2_5_chat", [call])
    with server as url:
        client = openai_client(url)
        constrained = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="required")
        monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` fails from here on
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=ASK, response_format=AS_FORECAST)
        loose = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="required")
        text = client.chat.completions.create(model="m", messages=ASK, response_format={"type": "text"})
    assert refused.value.body["param"] == "response_format"
    assert "pip install xgrammar" in refused.value.body["message"]
    assert _calls(constrained.choices[0].message) == _calls(loose.choices[0].message) == \
        [("get_weather", {"city": "Paris", "days": 2})]
    assert text.choices[0].message.content == call
    first, second, third = chat.batcher.jobs
    assert first.constraint is not None and second.constraint is None and third.constraint is None


def _call_templates():
    from tunelab.chat.tools import call_format
    from tunelab.data.templates import TEMPLATES, get_template

    return sorted(n for n in TEMPLATES if n != "hf" and call_format(get_template(n)))


@pytest.mark.parametrize("name", _call_templates())
def test_a_call_grammar_takes_the_call_as_its_template_writes_it(tiny_tokenizer, name):
    """The grammar of a forced call's rest is learnt from the template's rendering of a probe call: the rest of a call
    the template writes (one call, or for "required" two where the template writes several) is a whole sentence of
    it, up to the end-of-turn marker, and a call to a tool not offered, or arguments breaking its schema, are not."""
    from tunelab.chat.engine import ChatModel
    from tunelab.chat.grammar import new_matcher, reply_constraint
    from tunelab.chat.tools import call_format, choose
    from tunelab.data.templates import get_template, tool_support

    template = get_template(name)
    fmt, chat = call_format(template), ChatModel(model=None, tokenizer=tiny_tokenizer, template=template)
    prompt = template.render(ASK, tools=[WEATHER, TIME], add_generation_prompt=True)
    weather = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
    time = {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}
    cases = [({"type": "function", "function": {"name": "get_weather"}}, [weather]), ("required", [time])]
    if tool_support(template).several_calls:
        cases.append(("required", [time, weather]))
    for tool_choice, calls in cases:
        try:
            choice = choose(tool_choice, [WEATHER, TIME], fmt, name, parallel=True)
        except Exception:  # noqa: BLE001 (GLM-4 starts no "required" call)
            assert fmt.name_line and tool_choice == "required"
            continue
        whole = template.render([*ASK, {"role": "assistant", "content": "", "tool_calls": calls}], tools=[WEATHER, TIME])
        assert whole.startswith(prompt + choice.start)
        rest = whole[len(prompt + choice.start):]
        rest = rest[:min(rest.find(w) for w in template.stop_words if w in rest)]
        grammar = reply_constraint(chat, None, choice, [WEATHER, TIME], fmt)
        matcher = new_matcher(grammar)
        assert matcher.accept_string(rest) and matcher.is_completed(), (name, tool_choice, rest)
        wrong = rest.replace('"Paris"', '"Paris, France"').replace('"CET"', '"PST"')
        assert not (new_matcher(grammar).accept_string(wrong) and new_matcher(grammar).is_completed()), wrong


@pytest.mark.parametrize("name, reply", [
    ("qwen3_chat", '<think>\nIt is cold.\n</think>\n\n{"unit": "celsius", "days": 3, "alerts": false}'),
    ("qwen3_chat", '{"unit": "celsius", "days": 3, "alerts": false}'),
    ("deepseek_r1", 'It is cold.\n</think>\n\n{"unit": "celsius", "days": 3, "alerts": false}'),
])
def test_a_reasoning_model_reasons_before_its_structured_answer(tiny_tokenizer, name, reply):
    from tunelab.chat.engine import ChatModel
    from tunelab.chat.grammar import new_matcher, reply_constraint
    from tunelab.chat.tools import ToolChoice
    from tunelab.data.templates import get_template

    chat = ChatModel(model=None, tokenizer=tiny_tokenizer, template=get_template(name))
    matcher = new_matcher(reply_constraint(chat, AS_FORECAST, ToolChoice(), None, None))
    assert matcher.accept_string(reply) and matcher.is_completed()


@pytest.mark.parametrize("name, reply", [
    ("qwen2_5_chat", '{"unit": "celsius", "days": 3, "alerts": false}'),
    ("qwen2_5_chat", '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'),
    ("qwen3_chat", '<think>\nWhich zone?\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}'
                   '\n</tool_call>'),
    ("llama3_1_chat", '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}'),
    ("llama3_1_chat", '{"unit": "fahrenheit", "days": 14, "alerts": true}'),
])
def test_with_tools_offered_under_auto_the_reply_is_the_json_or_a_call(tiny_tokenizer, name, reply):
    """response_format is the form of an answer in text: a reply may still be a call, as the template writes one."""
    from tunelab.chat.engine import ChatModel
    from tunelab.chat.grammar import new_matcher, reply_constraint
    from tunelab.chat.tools import ToolChoice, call_format
    from tunelab.data.templates import get_template

    chat = ChatModel(model=None, tokenizer=tiny_tokenizer, template=get_template(name))
    grammar = reply_constraint(chat, AS_FORECAST, ToolChoice(), [WEATHER, TIME], call_format(chat.template))
    matcher = new_matcher(grammar)
    assert matcher.accept_string(reply) and matcher.is_completed()
    assert not new_matcher(grammar).accept_string("Sunny.")


def test_logprobs_of_a_constrained_reply_are_over_the_tokens_its_grammar_allows(client):
    """The log-probabilities come from the masked logits (as vLLM's): every one finite, and no alternative the grammar
    forbids is listed (after `{"unit": "` only the enum's words may come)."""
    answer = client.chat.completions.create(model="m", messages=ASK, response_format=AS_FORECAST, max_tokens=300,
                                            logprobs=True, top_logprobs=5)
    _valid_json(answer.choices[0].message.content, FORECAST)
    tokens = answer.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == answer.choices[0].message.content
    assert all(t.logprob <= 0 and all(a.logprob > float("-inf") for a in t.top_logprobs) for t in tokens)
    assert any(len(t.top_logprobs) < 5 for t in tokens)  # where the grammar leaves fewer than 5 tokens


def test_a_completion_is_held_to_its_response_format_from_its_first_token(client, chat):
    """/v1/completions takes `response_format` too (vLLM's does): the reply is the JSON, no template around it,
    streamed or not, one grammar for each of several prompts."""
    prompts = ["The forecast as JSON:", "Weather:"]
    free = client.completions.create(model="m", prompt=prompts[0], max_tokens=40)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].text)
    reply = client.completions.create(model="m", prompt=prompts, max_tokens=300, extra_body={
        "response_format": AS_FORECAST})
    assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]
    for choice in reply.choices:
        _valid_json(choice.text, FORECAST)
    streamed = client.completions.create(model="m", prompt=prompts[0], max_tokens=300, stream=True,
                                         extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads("".join(c.choices[0].text for c in streamed if c.choices)), dict)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="m", prompt="x", extra_body={"response_format": {"type": "xml"}})
    assert refused.value.body["param"] == "response_format"
