"""A reasoning model's reply through `tunelab serve`, `tunelab chat` and the web page: the reasoning written inside
<think>...</think> (Qwen3, DeepSeek-R1) comes apart from the answer, as vLLM's reasoning parsers and DeepSeek's API
send it (`reasoning_content` and `reasoning`, the answer as `content`), whole or streamed, whatever the pieces the
text comes in; a
template without reasoning is served exactly as before. The generated text is scripted (a batcher that writes it),
so each case is the text a trained model writes."""

from __future__ import annotations

import io
import itertools
import json

import pytest

from chat_helpers import Scripted, openai_client, served_scripted
from tunelab.chat.reasoning import ANSWER, REASONING, ReasoningStream, split_reasoning
from tunelab.data.templates import ReasoningFormat, get_template, reasoning_format

openai = pytest.importorskip("openai")

ASK = [{"role": "user", "content": "北京天气怎么样？"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "", "parameters": {}}}]
QWEN3 = "<think>\nThe user asks about Beijing.\n</think>\n\nIt is sunny."
R1 = "The user asks about Beijing.\n</think>\n\nIt is sunny."  # R1's generation prompt opened the block
CUT = {"qwen3_chat": "<think>\nThe user asks about Bei", "deepseek_r1": "The user asks about Bei"}


def _deltas(stream) -> list[dict]:
    return [c.choices[0].delta.model_dump(exclude_none=True) for c in stream if c.choices]


def _joined(deltas, key) -> str:
    return "".join(d.get(key) or "" for d in deltas)


def _pieces(text: str, cuts) -> list[str]:
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


# --- the format, learnt from the template ---------------------------------------------------------------------------

def test_the_reasoning_format_is_learnt_by_rendering_the_template(tiny_tokenizer):
    from pathlib import Path

    assert reasoning_format(get_template("qwen3_chat")) == ReasoningFormat("<think>", "</think>", opened=False)
    assert reasoning_format(get_template("deepseek_r1")) == ReasoningFormat("<think>", "</think>", opened=True)
    for name in ("qwen3_nothink_chat", "qwen2_5_chat", "deepseek_v3", "chatml", "llama3_1_chat", "default"):
        assert reasoning_format(get_template(name)) is None, name  # (Qwen3 without thinking: the prompt closes it)
    vendor = Path(__file__).parent / "vendor_templates"
    tokenizer = tiny_tokenizer  # its own chat_template: 'hf'
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = (vendor / "qwen3.jinja").read_text()
        assert reasoning_format(get_template("hf", tokenizer)) == reasoning_format(get_template("qwen3_chat"))
        tokenizer.chat_template = (vendor / "deepseek_r1.jinja").read_text()  # writes no reasoning_content
        assert reasoning_format(get_template("hf", tokenizer)) is None
    finally:
        tokenizer.chat_template = saved


@pytest.mark.parametrize("template, text, want", [
    ("qwen3_chat", QWEN3, ("The user asks about Beijing.", "It is sunny.")),
    ("qwen3_chat", "<think>\n\n</think>\n\nIt is sunny.", ("", "It is sunny.")),  # the empty block of a plain reply
    ("qwen3_chat", "It is sunny.", (None, "It is sunny.")),  # no block: all answer, as it is
    ("qwen3_chat", " <thinking is fun", (None, " <thinking is fun")),
    ("qwen3_chat", CUT["qwen3_chat"], ("The user asks about Bei", "")),  # cut before </think>: all reasoning
    ("qwen3_chat", "<think>\nAlmost\n</thi", ("Almost\n</thi", "")),
    ("deepseek_r1", R1, ("The user asks about Beijing.", "It is sunny.")),
    ("deepseek_r1", "<think>\nR\n</think>\n\nA", ("R", "A")),  # a model that opens the block again (R1-0528)
    ("deepseek_r1", CUT["deepseek_r1"], ("The user asks about Bei", "")),
    ("deepseek_r1", "a < b, c </ d\n</think>x \n", ("a < b, c </ d", "x \n")),
])
def test_every_split_of_the_text_into_pieces_gives_the_same_reasoning_and_answer(template, text, want):
    fmt = reasoning_format(get_template(template))
    assert split_reasoning(text, fmt) == want
    for count in (1, 2, 3):
        for cuts in itertools.combinations(range(1, len(text)), count):
            stream = ReasoningStream(fmt)
            parts = [stream.feed(p) for p in _pieces(text, cuts)] + [stream.finish()]
            got = ("".join(p.get(REASONING, "") for p in parts), "".join(p.get(ANSWER, "") for p in parts))
            assert (got[0] if stream.had_block else None, got[1]) == want, cuts
            kinds = [k for p in parts for k in p]
            assert kinds == sorted(kinds, key=lambda k: k == ANSWER), cuts  # the reasoning comes first


def test_a_stream_holds_back_only_what_could_start_a_marker():
    stream = ReasoningStream(reasoning_format(get_template("qwen3_chat")))
    assert stream.feed("<thi") == {}
    assert stream.feed("nk>\nWe") == {REASONING: "We"}
    assert stream.feed(" know it. <") == {REASONING: " know it."}  # ' <' may be the start of '</think>'
    assert stream.feed("b>!\n") == {REASONING: " <b>!"}
    assert stream.feed("</think>\n") == {}
    assert stream.feed("\nSunny") == {ANSWER: "Sunny"}
    assert stream.finish() == {}


# --- serve ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, text", [("qwen3_chat", QWEN3), ("deepseek_r1", R1)])
def test_the_reasoning_comes_apart_whole_and_streamed(tiny_tokenizer, template, text):
    at = text.index("</think>") + 3  # the close marker cut in two, the open marker too
    pieces = _pieces(text, [3, 11, at, at + 6, len(text) - 4])
    _, server = served_scripted(tiny_tokenizer, template, pieces)
    with server as url:
        client = openai_client(url)
        whole = client.chat.completions.create(model="m", messages=ASK)
        streamed = _deltas(client.chat.completions.create(model="m", messages=ASK, stream=True))
    message = whole.choices[0].message.model_dump(exclude_none=True)
    assert message == {"role": "assistant", "content": "It is sunny.",  # DeepSeek's name, and newer vLLM's
                       "reasoning_content": "The user asks about Beijing.", "reasoning": "The user asks about Beijing."}
    assert whole.choices[0].finish_reason == "stop"
    assert streamed[0] == {"role": "assistant", "content": ""}
    assert _joined(streamed, "reasoning_content") == "The user asks about Beijing."
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in streamed)  # each piece under both names
    assert _joined(streamed, "content") == "It is sunny."
    last_thought = max(i for i, d in enumerate(streamed) if d.get("reasoning_content"))
    assert all(not d.get("content") for d in streamed[:last_thought])  # the answer only after the reasoning
    assert not any("think>" in (d.get("content") or "") + (d.get("reasoning_content") or "") for d in streamed)


@pytest.mark.parametrize("template", ["qwen3_chat", "deepseek_r1"])
def test_a_reply_cut_before_its_close_marker_is_all_reasoning(tiny_tokenizer, template):
    text = CUT[template]
    _, server = served_scripted(tiny_tokenizer, template, _pieces(text, [5, 9]), finish="length")
    with server as url:
        client = openai_client(url)
        whole = client.chat.completions.create(model="m", messages=ASK, max_tokens=8)
        streamed = _deltas(client.chat.completions.create(model="m", messages=ASK, max_tokens=8, stream=True))
    assert whole.choices[0].finish_reason == "length"
    assert whole.choices[0].message.content is None  # as vLLM: no answer yet
    assert whole.choices[0].message.model_extra["reasoning_content"] == "The user asks about Bei"
    assert whole.choices[0].message.model_extra["reasoning"] == "The user asks about Bei"
    assert _joined(streamed, "reasoning_content") == "The user asks about Bei" and _joined(streamed, "content") == ""
    assert _joined(streamed, "reasoning") == "The user asks about Bei"


def test_a_tool_call_is_read_from_the_answer_after_the_reasoning(tiny_tokenizer):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    text = f"<think>\nAsk the tool.\n</think>\n\n{call}"
    _, server = served_scripted(tiny_tokenizer, "qwen3_chat", _pieces(text, [4, 12, 30]))
    with server as url:
        client = openai_client(url)
        whole = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS)
        streamed = list(client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, stream=True))
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == choice.message.model_extra["reasoning"] == "Ask the tool."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == \
        [("get_weather", {"city": "北京"})]
    deltas = _deltas(streamed)
    assert _joined(deltas, "reasoning_content") == "Ask the tool."  # streamed as it comes (not again with the calls)
    assert _joined(deltas, "reasoning") == "Ask the tool."
    [calls] = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert calls[0]["function"]["name"] == "get_weather" and _joined(deltas, "content") == ""
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"


def test_a_call_written_inside_the_reasoning_is_not_made(tiny_tokenizer):
    """Only the answer is read for calls: a model thinking about the call it might make has not made it."""
    text = ('<think>\nI could write <tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n'
            '</tool_call> but I know it.\n</think>\n\nIt is sunny.')
    _, server = served_scripted(tiny_tokenizer, "qwen3_chat", [text])
    with server as url:
        whole = openai_client(url).chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].message.tool_calls is None
    assert whole.choices[0].message.content == "It is sunny."
    assert "<tool_call>" in whole.choices[0].message.model_extra["reasoning_content"]


def test_a_template_without_reasoning_is_served_as_before(tiny_tokenizer):
    """Byte for byte: the text as generated (a <think> block included) as content, no reasoning_content, the same
    stream chunks (a guard: this passed before the reasoning came apart, and must still)."""
    import urllib.request

    text = "<think>\nx\n</think>\n\nIt is sunny."
    _, server = served_scripted(tiny_tokenizer, "qwen2_5_chat", _pieces(text, [3, 10]))

    def post(url, **fields):
        request = urllib.request.Request(f"{url}/v1/chat/completions", method="POST",
                                         data=json.dumps({"messages": ASK, **fields}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read().decode()

    with server as url:
        whole, streamed = json.loads(post(url)), post(url, stream=True)
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": text}
    events = [json.loads(e[len("data: "):]) for e in streamed.split("\n\n") if e.startswith("data: {")]
    assert [e["choices"][0]["delta"] for e in events] == [{"role": "assistant", "content": ""}, {"content": "<th"},
                                                          {"content": "ink>\nx\n"}, {"content": text[10:]}, {}]


def test_reasoning_sent_back_reaches_the_prompt_as_training_renders_it(tiny_tokenizer):
    """An assistant message with reasoning_content (or vLLM's newer `reasoning`) is read as training data: Qwen3
    drops an earlier turn's reasoning and keeps that of a reply still calling tools after the last question."""
    chat, server = served_scripted(tiny_tokenizer, "qwen3_chat", ["<think>\nOK\n</think>\n\nSunny."])
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    earlier = [*ASK, {"role": "assistant", "content": "Sunny.", "reasoning_content": "Look outside."},
               {"role": "user", "content": "明天呢？"}]
    calling = [*ASK, {"role": "assistant", "content": None, "reasoning": "Ask the tool.", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    with server as url:
        client = openai_client(url)
        for history in (earlier, calling):
            client.chat.completions.create(model="m", messages=history, tools=TOOLS)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=[{**ASK[0], "reasoning_content": "?"}])
    assert refused.value.body["message"] == "the request: messages[0].reasoning_content on a 'user' message. Only " \
                                            "assistant messages carry reasoning."
    template = chat.template
    canonical_call = {"type": "function", "function": {"name": "get_weather", "arguments": {}}}
    expected = [template.render([*ASK, {"role": "assistant", "content": "Sunny.", "reasoning_content": "Look outside."},
                                 earlier[2]], tools=TOOLS, add_generation_prompt=True),
                template.render([*ASK, {"role": "assistant", "content": "", "reasoning_content": "Ask the tool.",
                                        "tool_calls": [canonical_call]},
                                 {"role": "tool", "name": "get_weather", "content": "sunny"}],
                                tools=TOOLS, add_generation_prompt=True)]
    prompts = [tiny_tokenizer.decode(ids) for ids in chat.batcher.prompts]
    assert prompts == expected
    assert "Look outside." not in prompts[0] and "<|im_start|>assistant\nSunny.<|im_end|>" in prompts[0]
    assert "<think>\nAsk the tool.\n</think>\n\n<tool_call>" in prompts[1]


def test_reasoning_sent_back_under_both_names_is_read_once_and_must_agree(tiny_tokenizer):
    """A reply sent back as the server sent it (the reasoning under both names, the same text) is read as under one;
    two different texts are a 400 naming the message, not one of them dropped silently."""
    chat, server = served_scripted(tiny_tokenizer, "qwen3_chat", ["<think>\nOK\n</think>\n\nSunny."])
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}

    def history(**thought):
        return [*ASK, {"role": "assistant", "content": None, **thought, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]

    with server as url:
        client = openai_client(url)
        for thought in ({"reasoning_content": "Ask the tool."}, {"reasoning": "Ask the tool."},
                        {"reasoning_content": "Ask the tool.", "reasoning": "Ask the tool."},
                        {"reasoning_content": "", "reasoning": "Ask the tool."}):
            client.chat.completions.create(model="m", messages=history(**thought), tools=TOOLS)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=history(reasoning_content="Ask the tool.",
                                                                       reasoning="Guess."), tools=TOOLS)
    assert refused.value.status_code == 400 and refused.value.body["param"] == "messages"
    assert refused.value.body["message"] == (
        "the request: messages[1].reasoning_content and messages[1].reasoning hold different texts. They are two "
        "names of one field (DeepSeek's and newer vLLM's): send the reasoning under one of them, or the same text "
        "under both.")
    prompts = {tiny_tokenizer.decode(ids) for ids in chat.batcher.prompts}
    assert len(prompts) == 1 and "<think>\nAsk the tool.\n</think>" in prompts.pop()


# --- chat (terminal) ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
def test_chat_shows_the_reasoning_apart_and_keeps_the_answer_in_the_history(tiny_tokenizer, capsys, stream):
    from tunelab.chat.engine import ChatModel
    from tunelab.chat.terminal import run_chat
    from tunelab.model.generate import GenerationSettings

    batcher = Scripted(_pieces(R1, [4, 30, 33]))
    chat = ChatModel(model=None, tokenizer=tiny_tokenizer, template=get_template("deepseek_r1"), _batcher=batcher)
    out = io.StringIO()
    assert run_chat(chat, GenerationSettings(max_new_tokens=8), prompts=["Q1", "Q2"], out=out, stream=stream) == 0
    assert out.getvalue() == "It is sunny.\nIt is sunny.\n"  # stdout: the answers alone
    assert capsys.readouterr().err == "thinking: The user asks about Beijing.\n" * 2
    second = tiny_tokenizer.decode(batcher.prompts[1])
    assert second == chat.template.render([
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "The user asks about Beijing."},
        {"role": "user", "content": "Q2"}], add_generation_prompt=True)
    assert "<｜Assistant｜>It is sunny.<｜end▁of▁sentence｜>" in second  # as training writes an earlier reply


def test_interactive_chat_dims_the_reasoning(tiny_tokenizer):
    from tunelab.chat.engine import ChatModel
    from tunelab.chat.terminal import DIM, PLAIN, run_chat
    from tunelab.model.generate import GenerationSettings

    class TTY(io.StringIO):
        def isatty(self):
            return True

    chat = ChatModel(model=None, tokenizer=tiny_tokenizer, template=get_template("qwen3_chat"),
                     _batcher=Scripted(_pieces(QWEN3, [5, 20])))
    out = TTY()
    run_chat(chat, GenerationSettings(max_new_tokens=8), stdin=TTY("Q1\n\nEXIT\n"), out=out)
    assert f"{DIM}The user asks about Beijing.{PLAIN}\nIt is sunny.\n" in out.getvalue()


# --- the web page ---------------------------------------------------------------------------------------------------

@pytest.mark.browser
def test_the_web_page_shows_the_reasoning_apart_and_sends_it_back(tiny_tokenizer):
    from test_web import CHROMIUM, CHROMIUM_ARGS, _browser_or_skip

    from tunelab.chat.engine import ChatModel
    from tunelab.chat.http_server import BackgroundServer
    from tunelab.chat.web import create_web_app
    from tunelab.model.generate import GenerationSettings

    sync_playwright = _browser_or_skip()
    batcher = Scripted(_pieces(QWEN3, [5, 20, 40]))
    chat = ChatModel(model=None, tokenizer=tiny_tokenizer, template=get_template("qwen3_chat"), _batcher=batcher)
    with BackgroundServer(create_web_app(chat, GenerationSettings(max_new_tokens=8))) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            sent = []  # the requests' bodies: the history the page sends back
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/completions") else None)
            page.goto(url)
            page.wait_for_selector("#info:has-text('qwen3_chat')")
            for turn in (1, 2):
                page.fill("#question", f"Q{turn}")
                page.press("#question", "Enter")
                page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {turn} && "
                                       "!document.getElementById('send').disabled", timeout=30000)
            last = page.locator(".msg.assistant").last
            assert last.locator("span").inner_text() == "It is sunny."
            assert last.locator(".thinking div").text_content() == "The user asks about Beijing."
            assert last.locator(".thinking").get_attribute("open") is None  # folded once the answer came
            last.locator(".thinking summary").click()
            assert last.locator(".thinking div").inner_text() == "The user asks about Beijing."
        finally:
            browser.close()
    assert sent[1]["messages"][1:4] == [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "The user asks about Beijing."},
        {"role": "user", "content": "Q2"}]
