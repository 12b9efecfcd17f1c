"""Tool calls through `tunelab serve`: a reply written as the vendor's template writes a call comes back as OpenAI
`tool_calls`; the request's tools and earlier calls reach the prompt as the template renders them; a template with
no place for tools refuses them instead of dropping them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from chat_helpers import openai_client, served_scripted, taught_model_dir
from test_template_vendors import CALL, FAMILIES, TOOLS, _with_ids, vendor_render
from tunelab.chat.jobs import Reply
from tunelab.chat.tools import call_format, split_calls
from tunelab.data.templates import get_template, tool_support

openai = pytest.importorskip("openai")

ASK = [{"role": "user", "content": "北京天气怎么样？"}]
ENDS = ("<|im_end|>", "<|eot_id|>", "</s>", "<|end|>")


def vendor_reply(family: str) -> str:
    """The assistant turn holding CALL exactly as the vendor's published template writes it."""
    turn = [*ASK, {"role": "assistant", "content": "", "tool_calls": [CALL]}]
    if family.startswith("mistral"):  # Mistral's template asks for 9-character call ids
        turn = _with_ids(turn)
    whole = vendor_render(family, turn, tools=TOOLS)
    prompt = vendor_render(family, ASK, tools=TOOLS, add_generation_prompt=True)
    assert whole.startswith(prompt)
    return whole[len(prompt):]


# Phi-4-mini's published template writes no call into an assistant turn, so it has no vendor text to read here
@pytest.mark.parametrize("family", ["qwen2_5", "qwen3", "llama3_1", "llama3_2", "mistral_v3", "mistral_tekken"])
@pytest.mark.parametrize("cut_at_stop", [False, True])
def test_a_call_written_as_the_vendor_writes_it_is_read_back(family, cut_at_stop):
    reply = vendor_reply(family)
    if cut_at_stop:  # the server's reply text ends before the stop word
        for end in ENDS:
            reply = reply.split(end)[0]
    fmt = call_format(get_template(FAMILIES[family][0]))
    text, calls = split_calls(reply, fmt)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "北京"})], reply
    assert text.replace("<think>", "").replace("</think>", "").strip() == ""  # Qwen3 writes an empty think block
    ids = [c["id"] for c in calls]  # Mistral's are 9 letters and digits, as its template writes them
    assert all(c["type"] == "function" for c in calls)
    assert all(len(i) == 9 and i.isalnum() if family.startswith("mistral") else i.startswith("call_") for i in ids)


def test_text_around_calls_is_kept_and_every_call_is_read():
    fmt = call_format(get_template("qwen2_5_chat"))
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    two = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    text, calls = split_calls(f"Let me look.\n{one}\n{two}", fmt)
    assert text == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("template, reply", [
    ("qwen2_5_chat", "No call here: {\"name\": \"get_weather\"} is how one starts."),
    ("qwen2_5_chat", "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \n</tool_call>"),  # cut off
    ("llama3_1_chat", "Use {\"name\": \"x\", \"parameters\": {}} like this."),  # a bare call must be the whole reply
    ("llama3_1_chat", "{\"temperature\": 25}"),  # JSON, but not a call
    # a call and more: it came back as the first call and the rest with its braces cut out ('; "name": "g", ...}')
    ("llama3_1_chat", "{\"name\": \"f\", \"parameters\": {\"a\": 1}}; {\"name\": \"g\", \"parameters\": {}}"),
    ("llama3_1_chat", "{\"name\": \"f\", \"parameters\": {}} is the call I would make."),
])
def test_text_that_is_not_a_whole_call_stays_text(template, reply):
    text, calls = split_calls(reply, call_format(get_template(template)))
    assert calls == [] and text == reply


def test_which_templates_write_tools_and_how_their_calls_are_read():
    def support(name):
        return tool_support(get_template(name))

    assert not support("qwen_chat").definitions and call_format(get_template("qwen_chat")) is None
    assert support("glm4_chat").definitions and call_format(get_template("glm4_chat")).name_line
    assert support("qwen2_5_chat").calls and support("llama3_1_chat").calls and support("mistral_v3").calls
    assert not support("qwen_chat").calls  # drops them
    assert not support("chatglm3").calls  # writes <|observation|> where the call was, not the call
    assert not support("deepseek_r1").calls  # refuses to render them


# --- through the server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from tunelab.chat.engine import load_chat_model

    chat = load_chat_model(str(taught_model_dir(tmp_path_factory)), max_batch_size=4)
    yield chat
    chat.batcher.stop()


def _client(chat, **app_kwargs):
    from tunelab.chat.server import create_app
    from tunelab.chat.http_server import BackgroundServer
    from tunelab.model.generate import GenerationSettings

    return BackgroundServer(create_app(chat, GenerationSettings(max_new_tokens=8), **app_kwargs))


def test_tools_and_earlier_calls_reach_the_prompt_as_the_template_renders_them(chat):
    served = dataclasses.replace(chat, template=get_template("qwen2_5_chat"))
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "{\"weather\": \"sunny\"}"}]
    canonical = [*ASK, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                 {"role": "tool", "name": "get_weather", "content": "{\"weather\": \"sunny\"}"}]
    expected = served.template.render(canonical, tools=TOOLS, add_generation_prompt=True)
    assert "get_weather" in expected and "sunny" in expected and "<tools>" in expected
    with _client(served) as url:
        client = openai_client(url)
        answer = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=4)
        streamed = list(client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=4,
                                                       stream=True, stream_options={"include_usage": True}))
    prompt_tokens = len(served.tokenizer(expected, add_special_tokens=False).input_ids)
    assert answer.usage.prompt_tokens == prompt_tokens
    # the taught model writes no call: its text comes back, streamed as one piece
    assert answer.choices[0].message.tool_calls is None
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == answer.choices[0].message.content


def test_a_reply_with_a_call_is_sent_as_tool_calls():
    from tunelab.chat.server import _reply_message

    fmt = call_format(get_template("qwen2_5_chat"))
    reply = Reply(text='<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>',
                  finish_reason="stop", prompt_tokens=10, completion_tokens=20)
    message, finish = _reply_message(reply, fmt)
    assert finish == "tool_calls" and message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "北京"}
    plain, finish = _reply_message(dataclasses.replace(reply, text="Sunny."), fmt)
    assert plain == {"content": "Sunny."} and finish == "stop"


def test_tools_on_a_template_without_them_are_refused_not_dropped(chat):
    with _client(chat) as url:
        client = openai_client(url)
        with pytest.raises(openai.BadRequestError, match="has no place for tools"):
            client.chat.completions.create(model="m", messages=ASK, tools=TOOLS)
        with pytest.raises(openai.BadRequestError, match="has no place for tools"):  # a call to one too
            client.chat.completions.create(model="m", messages=ASK, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
        # tool_choice 'none' leaves the tools out, so any template serves the request
        answer = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none",
                                                max_tokens=2)
        assert answer.choices[0].finish_reason in ("stop", "length")


def test_earlier_tool_calls_on_a_template_without_them_are_refused_not_dropped(chat):
    """qwen_chat renders an assistant turn's tool_calls as an empty turn: the request is refused, naming the message,
    instead of the model answering a conversation it cannot see."""
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    with _client(chat) as url:
        client = openai_client(url)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=history, max_tokens=2)
        error = refused.value.body
        assert error["param"] == "messages"
        assert error["message"].startswith("messages[1].tool_calls: the chat template 'qwen_chat' has no place for "
                                           "tool calls")
        # the same conversation without the calls is answered
        answer = client.chat.completions.create(model="m", messages=ASK, max_tokens=2)
        assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("template", ["glm4_chat", "llama3_1_chat"])
def test_an_earlier_reply_with_several_calls_on_a_template_that_writes_one_is_refused(chat, template):
    """GLM-4 wrote the first of an earlier reply's calls alone (the model never saw the second), Llama 3.1's template
    refused them with its own words: a 400 names the message."""
    served = dataclasses.replace(chat, template=get_template(template))
    call = {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [dict(call, id="call_1"),
                                                                            dict(call, id="call_2")]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
               {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]
    with _client(served) as url:
        client = openai_client(url)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=2)
    error = refused.value.body
    assert error["param"] == "messages"
    assert error["message"].startswith(f"messages[1].tool_calls holds 2 calls, and the chat template {template!r} "
                                       f"writes one call per reply")


class _Writes:
    """A batcher whose every reply is `text`, keeping the prompts it was given."""

    max_batch_size = 1

    def __init__(self, text: str):
        self.text, self.prompts = text, []

    def submit(self, job):
        self.prompts.append(job.prompt_ids)
        job.on_done(Reply(text=self.text, finish_reason="stop", prompt_tokens=len(job.prompt_ids), completion_tokens=9))


@pytest.mark.parametrize("name, shape", [("mistral_v3", r"[A-Za-z0-9]{9}"), ("mistral_tekken", r"[A-Za-z0-9]{9}"),
                                         ("qwen2_5_chat", r"call_[0-9a-f]{24}"), ("llama3_1_chat", r"call_[0-9a-f]{24}")])
def test_a_served_call_gets_an_id_the_template_keeps(name, shape, tiny_tokenizer):
    # the server gave every call OpenAI's 'call_<hex>' id, which Mistral's template (ids of 9 letters and digits)
    # renumbers: sent back with its result, the call reached the prompt as 000000001, not as the id the client held
    import re

    from tunelab.chat.engine import ChatModel

    template = get_template(name)
    written = "".join(t for t, trained in template.segments(
        [*ASK, {"role": "assistant", "content": "", "tool_calls": [CALL]}], tools=TOOLS) if trained)
    batcher = _Writes(written.split("</s>")[0].split("<|im_end|>")[0].split("<|eot_id|>")[0])
    served = ChatModel(model=None, tokenizer=tiny_tokenizer, template=template, _batcher=batcher)
    with _client(served) as url:
        client = openai_client(url)
        answer = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS)
        [call] = answer.choices[0].message.tool_calls
        assert re.fullmatch(shape, call.id) and call.function.name == "get_weather", call.id
        streamed = [c for c in client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, stream=True)
                    if c.choices and c.choices[0].delta.tool_calls]
        assert re.fullmatch(shape, streamed[0].choices[0].delta.tool_calls[0].id)
        history = [*ASK, answer.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        client.chat.completions.create(model="m", messages=history, tools=TOOLS)
    prompt = tiny_tokenizer.decode(batcher.prompts[-1])
    if name.startswith("mistral"):  # the call and its result carry the id the client was given
        assert prompt.count(f'"{call.id}"') == 2, prompt


def test_a_tool_result_answering_no_call_is_refused(tiny_tokenizer):
    # it reached the prompt as an answer to nothing (Mistral's as a call never made), without a word
    from tunelab.chat.engine import ChatModel

    served = ChatModel(model=None, tokenizer=tiny_tokenizer, template=get_template("qwen2_5_chat"),
                       _batcher=_Writes("Sunny."))
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, {"role": "tool", "content": "windy"}]
    with _client(served) as url:
        client = openai_client(url)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=history, tools=TOOLS)
        assert client.chat.completions.create(model="m", messages=history[:-1], tools=TOOLS).choices[0].message \
            .content == "Sunny."
    assert refused.value.body["param"] == "messages"
    assert refused.value.body["message"].startswith("the request: an assistant reply makes 1 tool call (get_weather) "
                                                    "and 2 tool results follow it: result 2 ('windy') answers no call")


@pytest.mark.parametrize("name", ["internlm2_chat", "internlm2_5_chat", "phi4_mini", "qwen3_nothink_chat", "glm4_chat"])
def test_a_call_as_tunelabs_template_writes_it_is_read_back(name):
    """Families without a vendor text to compare (above): the call as the training text holds it."""
    template = get_template(name)
    reply = "".join(text for text, trained in
                    template.segments([*ASK, {"role": "assistant", "content": "", "tool_calls": [CALL]}], tools=TOOLS)
                    if trained)
    text, calls = split_calls(reply, call_format(template))
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "北京"})], reply


def test_glm4_call_is_a_name_line_and_its_arguments_and_nothing_else():
    fmt = call_format(get_template("glm4_chat"))
    _, calls = split_calls('get_weather\n{"city": "北京"}', fmt)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "北京"})]
    for text in ("Sunny today.\n{\"note\": 1}", "get_weather\n{\"city\": \"北京\"} and more", "北京天气晴。"):
        assert split_calls(text, fmt) == (text, [])


def test_reasoning_and_tool_call_parts_of_an_earlier_reply_reach_the_prompt(tiny_tokenizer):
    """An assistant message sent as content parts (a `tool_call` part, a `reasoning` part) is read as training data
    reads it: the call is rendered in the template's format, not dropped with the parts that are not text."""
    from tunelab.chat.engine import ChatModel

    chat = ChatModel(model=None, tokenizer=tiny_tokenizer, template=get_template("qwen3_chat"))  # writes reasoning
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [{"type": "reasoning", "text": "Ask the tool."},
                                                  {"type": "tool_call", "tool_call": call}]},
                {"role": "tool", "content": "18C"}]
    prompt = tiny_tokenizer.decode(chat.prompt(messages)[0])
    assert '<think>\nAsk the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
           '</tool_call>' in prompt


# --- InternLM2's code interpreter: a free-form (custom) tool ------------------------------------------------------

INTERPRETER_TOOL = {"type": "custom", "custom": {"name": "interpreter", "description": "Run Python in a notebook."}}
CODE = "```python\nprint(2 ** 10)\n```"
INTERPRETER_REPLY = f"Let me compute it.\n\n<|action_start|><|interpreter|>\n{CODE}<|action_end|>\n"
"""A reply as internlm2_chat trains it (chat_format.md's interpreter call), up to its <|im_end|>, the stop word."""


def test_an_interpreter_call_comes_back_as_a_custom_tool_call_and_goes_back_into_the_prompt(tiny_tokenizer):
    """OpenAI's Chat Completions answers a call to a custom tool as {"type": "custom", "custom": {"name", "input"}}:
    the code InternLM2 writes after <|action_start|><|interpreter|> comes back so; sent back with its result, the call
    reaches the prompt as the template writes it, the result as the interpreter's environment message."""
    from chat_helpers import post_json

    chat, server = served_scripted(tiny_tokenizer, "internlm2_chat", [INTERPRETER_REPLY])
    ask = [{"role": "user", "content": "What is 2**10?"}]
    with server as url:
        status, answer = post_json(f"{url}/v1/chat/completions", {"messages": ask, "tools": [INTERPRETER_TOOL]})
        assert status == 200, answer
        choice = answer["choices"][0]
        [call] = choice["message"]["tool_calls"]
        assert call["type"] == "custom" and call["custom"] == {"name": "interpreter", "input": CODE}
        assert call["id"].startswith("call_") and "function" not in call
        assert choice["message"]["content"] == "Let me compute it." and choice["finish_reason"] == "tool_calls"
        history = [*ask, choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "1024\n"}]
        status, answer = post_json(f"{url}/v1/chat/completions", {"messages": history, "tools": [INTERPRETER_TOOL]})
        assert status == 200, answer
    prompt = tiny_tokenizer.decode(chat.batcher.prompts[-1])
    assert prompt.endswith("<|im_start|>system name=<|interpreter|>\nRun Python in a notebook.<|im_end|>\n"
                           "<|im_start|>user\nWhat is 2**10?<|im_end|>\n<|im_start|>assistant\nLet me compute it."
                           f"<|action_start|><|interpreter|>\n{CODE}<|action_end|>\n<|im_end|>\n"
                           "<|im_start|>environment name=<|interpreter|>\n1024\n<|im_end|>\n<|im_start|>assistant\n")


def test_an_interpreter_block_is_a_call_only_where_the_request_offers_the_interpreter():
    from tunelab.chat.tools import offered_format

    fmt = call_format(get_template("internlm2_chat"))
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    assert split_calls(INTERPRETER_REPLY, offered_format(fmt, [weather])) == (INTERPRETER_REPLY, [])
    cut = INTERPRETER_REPLY.split("<|action_end|>")[0]  # max_tokens reached inside the code
    assert split_calls(cut, offered_format(fmt, [INTERPRETER_TOOL])) == (cut, [])


@pytest.mark.parametrize("request_body, param, field", [
    ({"messages": ASK, "tools": [INTERPRETER_TOOL]}, "tools", "tools[0]"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "custom", "custom": {"name": "interpreter", "input": CODE}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "1024"}]}, "messages", "messages[1].tool_calls[0]"),
])
def test_a_free_form_tool_on_a_template_without_a_place_for_it_is_a_400(tiny_tokenizer, request_body, param, field):
    from chat_helpers import post_json

    _, server = served_scripted(tiny_tokenizer, "qwen2_5_chat", ["Sunny."])
    with server as url:
        status, answer = post_json(f"{url}/v1/chat/completions", request_body)
    assert status == 400 and answer["error"]["param"] == param
    assert answer["error"]["message"].startswith(f"{field} is a free-form (custom) tool 'interpreter', which the chat "
                                                 f"template 'qwen2_5_chat' does not write"), answer
    assert "internlm2_chat ('interpreter')" in answer["error"]["message"]
