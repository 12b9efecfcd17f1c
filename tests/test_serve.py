"""`tunelab serve`: the official `openai` client gets the taught answer, streamed or not; concurrent requests are
batched and each gets what it would get alone; limits, bad values, disconnects, the API key and SIGTERM."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from chat_helpers import ANSWER, QUESTION, openai_client, taught_model_dir

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def chat(taught_chat):
    return taught_chat


@pytest.fixture(scope="module")
def server_url(taught_server_url):
    return taught_server_url


@pytest.fixture
def client(taught_server_url):
    return openai_client(taught_server_url)


ASK = [{"role": "user", "content": QUESTION}]


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_idle(batcher, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while batcher.active and time.time() < deadline:
        time.sleep(0.05)
    assert batcher.active == 0, "the engine still holds requests"


def test_models_and_plain_completion(client, chat):
    assert [m.id for m in client.models.list().data] == [chat.name]
    result = client.chat.completions.create(model=chat.name, messages=ASK)
    assert result.choices[0].message.content == ANSWER
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.prompt_tokens == len(chat.encode(ASK)) and result.usage.completion_tokens > 0


def test_any_model_name_is_answered_by_the_served_model(client, chat):
    """Clients often send a fixed name: it is answered (docs/CHAT.md says so), named as /v1/models lists it."""
    result = client.chat.completions.create(model="gpt-4o-mini", messages=ASK)
    assert result.choices[0].message.content == ANSWER and result.model == chat.name


def test_a_developer_message_is_a_system_message(client, chat):
    """OpenAI's clients send the system prompt of newer models as 'developer': the server reads it as a system
    message, as training data reads it (tunelab.data.formats), instead of a 400."""
    told = {"content": "Be brief."}
    result = client.chat.completions.create(model=chat.name, messages=[{"role": "developer", **told}, *ASK],
                                            max_tokens=2)
    assert result.usage.prompt_tokens == len(chat.encode([{"role": "system", **told}, *ASK]))


def test_streaming_gives_the_same_answer_in_pieces(client, chat):
    stream = client.chat.completions.create(model=chat.name, messages=ASK, stream=True)
    pieces, finish = [], None
    for event in stream:
        delta = event.choices[0].delta.content
        if delta:
            pieces.append(delta)
        finish = event.choices[0].finish_reason or finish
    assert "".join(pieces).strip() == ANSWER
    assert len(pieces) > 1 and finish == "stop"


def _events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_usage_comes_as_openai_sends_it(server_url, chat):
    """OpenAI's stream: usage only with stream_options.include_usage, then in a last chunk of its own with empty
    choices (every other chunk has "usage": null), so a client reading it there finds it."""
    plain = _events(server_url, {"messages": ASK, "stream": True})
    assert all(event.get("usage") is None for event in plain)
    asked = _events(server_url, {"messages": ASK, "stream": True, "stream_options": {"include_usage": True}})
    *replies, last = asked
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk" and last["id"] == replies[0]["id"]
    assert last["usage"]["prompt_tokens"] == len(chat.encode(ASK)) and last["usage"]["completion_tokens"] > 0
    assert all("usage" in event and event["usage"] is None for event in replies)
    assert replies[-1]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_and_stop(client, chat):
    short = client.chat.completions.create(model=chat.name, messages=ASK, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert len(short.choices[0].message.content) < len(ANSWER)
    cut = client.chat.completions.create(model=chat.name, messages=ASK, stop=["TuneBot"])
    assert cut.choices[0].message.content == "I am "  # as generated, as streamed (OpenAI and vLLM do not strip)


def test_concurrent_requests_are_decoded_together(client, chat):
    """Requests that arrive together share forward passes, and each still gets the taught answer."""
    sizes = []
    hook = chat.model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)
    start = threading.Barrier(6)

    def ask(i):
        start.wait()
        if i % 2:
            events = client.chat.completions.create(model=chat.name, messages=ASK, stream=True)
            return "".join(e.choices[0].delta.content or "" for e in events).strip()
        return client.chat.completions.create(model=chat.name, messages=ASK).choices[0].message.content

    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
    finally:
        hook.remove()
    assert answers == [ANSWER] * 6
    assert max(sizes) > 1


def _run_together(chat, prompts, settings, *, stagger: int = 0):
    """Replies of `prompts` (each with its own settings) submitted to the engine: the first `stagger` ones first, the
    rest once the first has produced text, so they join a batch already decoding."""
    results, first_text, finished = {}, threading.Event(), threading.Semaphore(0)

    def submit(i):
        def done(reply):
            results[i] = reply
            finished.release()
        chat.batcher.submit(chat.job(prompts[i], settings[i], ignore_eos=True, on_text=lambda _: first_text.set(),
                                     on_done=done))

    for i in range(len(prompts)):
        if i == stagger and stagger:
            assert first_text.wait(60)
        submit(i)
    for _ in prompts:
        assert finished.acquire(timeout=120)
    return [results[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def random_models(tiny_llama_dir):
    """The same random tiny llama (fp32, CPU) behind a batching engine and a one-at-a-time engine."""
    from tunelab.chat.engine import load_chat_model

    models = (load_chat_model(str(tiny_llama_dir), max_batch_size=8, prompt_template="qwen_chat"),
              load_chat_model(str(tiny_llama_dir), max_batch_size=1, prompt_template="qwen_chat"))
    yield models
    for chat in models:
        chat.batcher.stop()


def test_greedy_in_a_batch_equals_generate_alone(random_models, monkeypatch):
    """Left padding, joining mid-batch and leaving early change no token: each reply equals transformers' own
    `generate` for that prompt alone (greedy, fp32)."""
    import torch

    from tunelab.model.generate import GenerationSettings

    batched, _ = random_models
    batcher = batched.batcher
    running_at_prefill = []  # how many rows were decoding when newcomers were prefilled (> 0: they joined mid-batch)
    prefill = batcher._prefill

    def counting_prefill(jobs):
        running_at_prefill.append(len(batcher.rows))
        return prefill(jobs)

    monkeypatch.setattr(batcher, "_prefill", counting_prefill)
    prompts = [batched.encode([{"role": "user", "content": "Hello there " * k}]) for k in (1, 9, 3, 25, 2, 14)]
    lengths = [20, 45, 30, 12, 40, 25]
    replies = _run_together(batched, prompts, [GenerationSettings(max_new_tokens=n) for n in lengths], stagger=3)
    # the last three were submitted once the first three were decoding: some of them must have joined that batch,
    # else this compares only batches that started together
    assert max(running_at_prefill) > 0, running_at_prefill
    for ids, n, reply in zip(prompts, lengths, replies):
        out = batched.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None,
                                     top_k=None, top_p=None, pad_token_id=0)
        assert reply.token_ids == out[0, len(ids):].tolist()
        assert reply.finish_reason == "length" and reply.completion_tokens == n


def test_each_request_keeps_its_sampling_settings_in_a_batch(random_models):
    """Seeded sampling, top-k / top-p, the penalties, logit bias and greedy requests mixed in one batch give what each
    gives served alone (each sequence samples from its own generator)."""
    from tunelab.model.generate import GenerationSettings

    batched, alone = random_models
    prompts = [batched.encode([{"role": "user", "content": f"Question {k}: " + "tips " * k}]) for k in range(5)]
    settings = [GenerationSettings(max_new_tokens=30),
                GenerationSettings(max_new_tokens=30, temperature=0.9, top_k=20, top_p=0.9, seed=1),
                GenerationSettings(max_new_tokens=30, temperature=0.7, top_k=0, top_p=1.0, seed=2),
                GenerationSettings(max_new_tokens=30, repetition_penalty=1.3),
                GenerationSettings(max_new_tokens=30, temperature=1.2, repetition_penalty=0.8, seed=2**63 - 1),
                GenerationSettings(max_new_tokens=30, presence_penalty=1.5, frequency_penalty=0.5),
                GenerationSettings(max_new_tokens=30, temperature=0.8, seed=3, frequency_penalty=-1.0,
                                   logit_bias={5: 4.0, 9: -100.0})]
    prompts += prompts[:2]
    together = _run_together(batched, prompts, settings)
    one_by_one = [_run_together(alone, [p], [s])[0] for p, s in zip(prompts, settings)]
    assert [r.token_ids for r in together] == [r.token_ids for r in one_by_one]
    assert together[1].token_ids != together[4].token_ids  # the settings did differ


def test_one_at_a_time_mode(random_models):
    _, alone = random_models
    sizes = []
    hook = alone.model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]),
                                                 with_kwargs=True)
    from tunelab.model.generate import GenerationSettings

    try:
        prompts = [alone.encode([{"role": "user", "content": "Hi " * k}]) for k in (1, 2, 3)]
        _run_together(alone, prompts, [GenerationSettings(max_new_tokens=5)] * 3)
    finally:
        hook.remove()
    assert set(sizes) == {1}


class FakeOOM(RuntimeError):
    """What torch raises when a step does not fit the GPU (torch.OutOfMemoryError is a RuntimeError too)."""


def _submit(chat, ids, settings, results, done):
    def finish(outcome):
        results[tuple(ids)] = outcome
        done.release()
    chat.batcher.submit(chat.job(ids, settings, ignore_eos=True, on_done=finish))


def test_a_prefill_that_fails_fails_only_its_own_request(random_models):
    """Three streams decoding; a long prompt whose prefill runs out of memory (and a short one prefilled with it)
    join: only the long one gets the error, the short one is answered, and the three go on to the token they would
    have produced alone."""
    from tunelab.model.generate import GenerationSettings

    batched, _ = random_models
    running = [batched.encode([{"role": "user", "content": f"Tell me about {k} things"}]) for k in (1, 2, 3)]
    long = batched.encode([{"role": "user", "content": "word " * 60}])
    short = batched.encode([{"role": "user", "content": "Hi"}])
    settings = GenerationSettings(max_new_tokens=40)
    alone = {tuple(ids): reply.token_ids for ids, reply in
             zip(running + [short], _run_together(batched, running + [short], [settings] * 4))}
    results, done = {}, threading.Semaphore(0)
    decoding, hold, release = threading.Event(), threading.Event(), threading.Event()
    prefill_sizes = []

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:
            prefill_sizes.append(ids.shape[0])
        if ids.shape[1] > len(long) - 5:
            raise FakeOOM("CUDA out of memory. Tried to allocate 20.00 GiB")
        if ids.shape[1] == 1 and hold.is_set():  # hold the batch mid-decode while both newcomers are submitted
            decoding.set()
            assert release.wait(30)
            hold.clear()

    handle = batched.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in running:
            _submit(batched, ids, settings, results, done)
        hold.set()
        assert decoding.wait(60)
        _submit(batched, long, settings, results, done)
        _submit(batched, short, settings, results, done)
        release.set()
        for _ in range(5):
            assert done.acquire(timeout=120)
    finally:
        handle.remove()
    assert isinstance(results[tuple(long)], FakeOOM)
    for ids in running + [short]:
        reply = results[tuple(ids)]
        assert not isinstance(reply, Exception), reply
        assert reply.finish_reason == "length" and reply.token_ids == alone[tuple(ids)]
    assert prefill_sizes[-3:] == [2, 1, 1]  # long and short together, then each alone
    assert _run_together(batched, [short], [settings])[0].token_ids == alone[tuple(short)]  # the engine is fine


def test_a_prefill_that_fails_while_stacking_its_cache_leaves_the_batch_as_it_was(random_models, monkeypatch):
    """Out of memory half-way through stacking the newcomer's cache under the batch's (one layer stacked, the next
    not): the stacked layer goes back to the running rows, which go on to the tokens they would produce alone."""
    from tunelab.chat import batcher as batcher_module
    from tunelab.model.generate import GenerationSettings

    batched, _ = random_models
    running = [batched.encode([{"role": "user", "content": f"Say {k}"}]) for k in (1, 2)]
    newcomer = batched.encode([{"role": "user", "content": "Another question"}])
    settings = GenerationSettings(max_new_tokens=30)
    alone = [r.token_ids for r in _run_together(batched, running, [settings] * 2)]
    pads, left_pad = [], batcher_module._left_pad

    def failing_pad(x, width):
        pads.append(1)
        if len(pads) == 5:  # layer 0's keys and values are stacked (4 pads); layer 1's keys fail
            raise FakeOOM("CUDA out of memory while stacking")
        return left_pad(x, width)

    results, done = {}, threading.Semaphore(0)
    decoding, release = threading.Event(), threading.Event()

    def hold(module, args, kwargs):  # the first decode step of both rows waits until the newcomer is in the inbox
        if kwargs["input_ids"].shape == (2, 1) and not decoding.is_set():
            decoding.set()
            assert release.wait(30)

    handle = batched.model.register_forward_pre_hook(hold, with_kwargs=True)
    try:
        for ids in running:
            _submit(batched, ids, settings, results, done)
        assert decoding.wait(60)
        monkeypatch.setattr(batcher_module, "_left_pad", failing_pad)
        _submit(batched, newcomer, settings, results, done)
        release.set()
        for _ in range(3):
            assert done.acquire(timeout=120)
    finally:
        handle.remove()
    assert isinstance(results[tuple(newcomer)], FakeOOM)
    assert [results[tuple(ids)].token_ids for ids in running] == alone


def test_a_failing_decode_step_fails_its_batch_and_the_engine_goes_on(random_models):
    from tunelab.model.generate import GenerationSettings

    batched, _ = random_models
    prompts = [batched.encode([{"role": "user", "content": f"Question {k}"}]) for k in (1, 2)]
    settings = GenerationSettings(max_new_tokens=30)
    results, done = {}, threading.Semaphore(0)
    decode_steps = []

    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape == (2, 1):  # a decode step of both
            decode_steps.append(1)
            if len(decode_steps) == 3:
                raise FakeOOM("CUDA out of memory in the decode step")

    handle = batched.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in prompts:
            _submit(batched, ids, settings, results, done)
        for _ in prompts:
            assert done.acquire(timeout=120)
    finally:
        handle.remove()
    assert all(isinstance(results[tuple(ids)], FakeOOM) for ids in prompts)
    _wait_idle(batched.batcher)
    again = _run_together(batched, prompts, [settings] * 2)
    assert [r.finish_reason for r in again] == ["length"] * 2


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 0}', "n"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 129}', "n"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_k": -5}', "top_k"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e-300}', "repetition_penalty"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1180591620717411303424}', "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ""}', "stop"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": true}', "max_tokens"),  # not 1
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', "max_tokens"),  # not 5
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5.5}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": false}', "max_completion_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}', "max_completion_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9999}', "max_completion_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": "7"}', "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_k": true}', "top_k"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "0.5"}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": true}', "top_p"),
])
def test_bad_values_get_a_400_naming_the_parameter(server_url, client, chat, body, param):
    status, payload = _post(f"{server_url}/v1/chat/completions", body)
    assert status == 400
    error = payload["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    if param:
        assert error["message"].startswith(param) or f": {param}" in error["message"]
    # the server is still there
    assert client.chat.completions.create(model=chat.name, messages=ASK).choices[0].message.content == ANSWER


@pytest.mark.parametrize("role", ["Human", "human", "gpt", "bot"])
def test_an_unknown_role_is_a_400_naming_the_message_its_role_and_the_roles_taken(server_url, role):
    """A ShareGPT role (human, gpt) or any other is refused, as OpenAI's API refuses it, never guessed at: the 400, in
    OpenAI's error shape, says which message, which role, and the roles there are, so the client can be fixed."""
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": role, "content": "Hello"}]}).encode()
    status, payload = _post(f"{server_url}/v1/chat/completions", body)
    assert status == 400 and set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f'invalid request: messages[1].role "{role}": ') and error["param"] == "messages"
    assert all(f"'{taken}'" in error["message"] for taken in ("system", "user", "assistant", "tool")), error


@pytest.mark.parametrize("fields, param, where", [
    ({"messages": [{"role": "user", "content": "hi \\ud800"}]}, "messages", "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": [
        {"type": "text", "text": "ok"}, {"type": "text", "text": "\\udc00"}]}]},
     "messages", "messages[1].content[1].text"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}, "stop", "stop[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {
        "name": "f", "description": "\\ud83d"}}]}, "tools", "tools[0].function.description"),
])
def test_text_that_is_not_unicode_gets_a_400_naming_where(server_url, client, chat, fields, param, where):
    """A lone surrogate (JSON allows the escape, UTF-8 does not) is refused where it is, like any bad value, instead
    of failing in the tokenizer with a plain-text 500."""
    body = json.dumps(fields).replace("\\\\u", "\\u").encode()  # the escape itself, as a client sends it
    status, payload = _post(f"{server_url}/v1/chat/completions", body)
    assert status == 400, payload
    error = payload["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"] == f"invalid request: {where}: not valid Unicode text (it holds a lone surrogate such " \
                               "as \\ud800): send the text as UTF-8"
    assert client.chat.completions.create(model=chat.name, messages=ASK).choices[0].message.content == ANSWER


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_is_read_whatever_its_content_type(server_url, content_type):
    """`curl -d '{...}'` sends no JSON Content-Type: the body is read as JSON all the same."""
    body = json.dumps({"messages": ASK, "max_tokens": 3}).encode()
    response = httpx.post(f"{server_url}/v1/chat/completions", content=body, timeout=30,
                          headers={"Content-Type": content_type} if content_type else {})
    assert response.request.headers.get("content-type") == content_type
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("body, says", [
    (b"messages=hi", "the body is not valid JSON (Expecting value): send a JSON object, with the header "
                     "'Content-Type: application/json'"),
    (b'["hi"]', 'the body should be a JSON object, e.g. {"messages": '),
    (b'"%s"' % (b"x" * 500), 'the body should be a JSON object'),
])
def test_a_body_that_is_not_a_json_object_is_named_not_quoted(server_url, body, says):
    status, payload = _post(f"{server_url}/v1/chat/completions", body, {"Content-Type": "text/plain"})
    assert status == 400 and says in payload["error"]["message"]
    assert "xxxxxxxx" not in payload["error"]["message"] and "b'" not in payload["error"]["message"]


def test_numbers_are_json_numbers(server_url):
    """Integers and floats as JSON writes them are taken (temperature 1 is 1.0); strings and booleans are not."""
    body = json.dumps({"messages": ASK, "max_tokens": 2, "temperature": 1, "top_p": 1, "seed": 3}).encode()
    status, payload = _post(f"{server_url}/v1/chat/completions", body)
    assert status == 200 and payload["usage"]["completion_tokens"] == 2
    body = json.dumps({"messages": ASK, "max_tokens": True}).encode()
    message = _post(f"{server_url}/v1/chat/completions", body)[1]["error"]["message"]
    assert message == "invalid request: max_tokens true: Input should be a valid integer"
    for flag in ("stream", "ignore_eos"):  # a switch is true or false, not the text "true"
        body = json.dumps({"messages": ASK, flag: "true"}).encode()
        status, payload = _post(f"{server_url}/v1/chat/completions", body)
        assert status == 400 and payload["error"]["param"] == flag, payload


HI = {"type": "text", "text": "hi"}


@pytest.mark.parametrize("fields, param, says", [
    ({"messages": [{"role": "user", "content": [HI, {"type": "foo"}]}]}, "messages",
     "request: messages[0].content[1] has type 'foo'. Content parts are 'text' or 'image_url'"),
    ({"messages": [{"role": "user", "content": [HI, {"type": "input_audio", "input_audio": {}}]}]}, "messages",
     "request: messages[0].content[1] is a 'input_audio' part. A chat reads text, and images with a LLaVA model"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages",
     "request: messages[0].content[0] has no text (looked for 'text', 'value')"),
    ({"messages": [ASK[0], {"role": "user", "content": 5}]}, "messages",
     "invalid request: messages[1].content 5: should be a string or a list of content parts"),
    ({"messages": ASK, "tool_choice": "x"}, "tool_choice",
     "invalid request: tool_choice \"x\": should be 'auto' (the model chooses), 'none' (no tools), 'required' (a call "
     "to any tool) or {\"type\": \"function\", \"function\": {\"name\": NAME}} (a call to that one)"),
    ({"messages": [{"role": "tool", "content": "hi", "tool_calls": [{"name": "f"}]}]}, "messages",
     "messages[0].tool_calls on a 'tool' message"),
    ({"messages": ASK, "tools": [{"type": "function"}]}, "tools", "tools[0] is not a tool definition with a name"),
])
def test_request_errors_speak_of_the_request(server_url, fields, param, says):
    """Content errors name the place in the request (messages[0].content[1]) and the request field as `param`, with
    no advice meant for training data and no validator internals (str, literal[...], list[any])."""
    status, payload = _post(f"{server_url}/v1/chat/completions", json.dumps(fields).encode())
    assert status == 400
    error = payload["error"]
    assert error["param"] == param and says in error["message"], error["message"]
    for internal in ("dataset_map_fn", "from the data", "literal[", ".str", "list[any]", "'text', 'text'"):
        assert internal not in error["message"]


def test_range_messages_say_the_allowed_values(server_url):
    body = json.dumps({"messages": ASK, "repetition_penalty": 1e-300}).encode()
    assert "from 0.01 to 10" in _post(f"{server_url}/v1/chat/completions", body)[1]["error"]["message"]
    body = json.dumps({"messages": ASK, "max_tokens": 100000}).encode()
    assert "limit of 2000 (--max-tokens-limit)" in _post(f"{server_url}/v1/chat/completions", body)[1]["error"]["message"]


def test_max_model_len_above_the_models_context_is_warned_about_once(tmp_path_factory, capsys):
    from tunelab.chat.engine import load_chat_model

    model = taught_model_dir(tmp_path_factory)
    context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    load_chat_model(str(model), max_model_len=context + 1000)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert f"--max-model-len {context + 1000} is above the model's context of {context} tokens" in err
    load_chat_model(str(model), max_model_len=context)
    assert "warning" not in capsys.readouterr().err


def test_max_tokens_limit_also_bounds_the_default_reply_length(chat):
    """--max-tokens-limit 5 with --max-new-tokens 500: a request without max_tokens gets 5 tokens, not 500, and the
    web page's default (/tunelab/info) is 5 too."""
    from tunelab.chat.server import create_app
    from tunelab.chat.http_server import BackgroundServer
    from tunelab.model.generate import GenerationSettings

    with BackgroundServer(create_app(chat, GenerationSettings(max_new_tokens=500), max_tokens_limit=5)) as url:
        body = json.dumps({"messages": ASK, "ignore_eos": True}).encode()
        status, payload = _post(f"{url}/v1/chat/completions", body)
        assert status == 200 and payload["usage"]["completion_tokens"] == 5
        assert payload["choices"][0]["finish_reason"] == "length"
        with urllib.request.urlopen(f"{url}/tunelab/info", timeout=10) as response:
            assert json.loads(response.read())["defaults"]["max_new_tokens"] == 5


def test_prompt_and_max_tokens_are_bounded_by_the_context(chat):
    """A prompt over the context is refused in about the time it takes to tokenize it (a 1 MB prompt too); an asked-for
    max_tokens that does not fit is refused; a default max_tokens is cut to what fits."""
    from tunelab.chat.server import create_app
    from tunelab.chat.http_server import BackgroundServer
    from tunelab.model.generate import GenerationSettings

    small = dataclasses.replace(chat, max_model_len=64, _batcher=None)
    prompt_tokens = len(chat.encode(ASK))
    with BackgroundServer(create_app(small, GenerationSettings(max_new_tokens=500))) as url:
        huge = json.dumps({"messages": [{"role": "user", "content": "word " * 200_000}]}).encode()
        status, payload = _post(f"{url}/v1/chat/completions", huge)
        assert status == 400 and payload["error"]["param"] == "messages"
        assert "maximum context length is 64 tokens" in payload["error"]["message"]
        status, payload = _post(f"{url}/v1/chat/completions", json.dumps({"messages": ASK, "max_tokens": 60}).encode())
        assert status == 400 and payload["error"]["param"] == "max_tokens"
        assert f"({prompt_tokens} in the messages, 60 in the completion): lower max_tokens to {64 - prompt_tokens} " \
               f"or less" in payload["error"]["message"]
        body = json.dumps({"messages": ASK, "ignore_eos": True}).encode()
        status, payload = _post(f"{url}/v1/chat/completions", body)
        assert status == 200 and payload["usage"]["completion_tokens"] == 64 - prompt_tokens
        assert payload["choices"][0]["finish_reason"] == "length"
    small.batcher.stop()


@pytest.mark.parametrize("asked", [None, 10])
def test_a_prompt_too_long_is_told_to_shorten_the_conversation(chat, asked):
    """Over the context whether or not max_tokens was given: the message speaks of the messages (no max_tokens would
    help), not of a completion of the default 512 tokens the client never asked for."""
    from tunelab.chat.engine import ContextError

    small = dataclasses.replace(chat, max_model_len=64, _batcher=None)
    with pytest.raises(ContextError) as refused:
        small.fit_reply(70, 512 if asked is None else asked, asked=asked is not None)
    assert refused.value.param == "messages"
    assert str(refused.value) == ("This model's maximum context length is 64 tokens, but the messages alone take 70, "
                                  "which leaves no room for a reply: shorten the conversation.")


def test_a_client_that_goes_away_stops_its_generation(server_url, chat):
    long_reply = {"model": chat.name, "messages": ASK, "max_tokens": 1900, "ignore_eos": True}
    # streamed: close the connection after the first piece of text
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server_url}/v1/chat/completions", json={**long_reply, "stream": True}) as response:
            for line in response.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break
    _wait_idle(chat.batcher)
    last = chat.batcher.finished[-1]
    assert last.finish_reason == "cancelled" and 0 < last.completion_tokens < 1900
    # not streamed: the client gives up waiting
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server_url}/v1/chat/completions", json=long_reply, timeout=0.5)
    _wait_idle(chat.batcher)
    last = chat.batcher.finished[-1]
    assert last.finish_reason == "cancelled" and last.completion_tokens < 1900


def test_api_key_guards_every_route(chat):
    from tunelab.chat.server import create_app
    from tunelab.chat.http_server import BackgroundServer
    from tunelab.model.generate import GenerationSettings

    app = create_app(chat, GenerationSettings(max_new_tokens=4), api_key="s3cret")
    with BackgroundServer(app) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=chat.name, messages=ASK, max_tokens=2).choices[0].message.content
        for path in ("/v1/models", "/tunelab/info", "/tokenizer_info", "/openapi.json", "/docs", "/anything"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{url}{path}", timeout=10)
            assert refused.value.code == 401, path
            assert "--api-key" in json.loads(refused.value.read())["error"]["message"]
        for path, body in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "a"}),
                           ("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
            assert _post(f"{url}{path}", json.dumps(body).encode())[0] == 401, path
        keyed = urllib.request.Request(f"{url}/tunelab/info", headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(keyed, timeout=10) as response:
            assert json.loads(response.read())["model"] == chat.name
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:  # a probe needs no key, tells nothing
            assert json.loads(response.read()) == {"status": "ok"}


def test_sigterm_stops_the_server_mid_generation(tmp_path):
    """A reply that would take minutes is cut off: the stream ends with an error event, the process exits."""
    from tunelab.chat.http_server import free_port
    from tunelab.model.tiny import make_model

    model = make_model(tmp_path / "long", "llama", max_position_embeddings=65536)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(model), "--port", str(port),
                               "--prompt-template", "qwen_chat", "--max-tokens-limit", "60000"],
                              cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  p for p in (str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")) if p)})
    try:
        url = f"http://127.0.0.1:{port}"
        seen = []
        while not (seen and "OpenAI-compatible API on" in seen[-1]):
            seen.append(server.stdout.readline().decode())
            assert seen[-1], "".join(seen)  # the server ended before saying where it listens
        assert seen[-1].startswith(f"OpenAI-compatible API on {url}")
        urllib.request.urlopen(f"{url}/health", timeout=10)  # said only once it listens: no retrying needed
        body = {"messages": ASK, "max_tokens": 60000, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if len(lines) == 10:  # text is flowing: stop the server now
                        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert "the server is shutting down" in "\n".join(lines) and [x for x in lines if x][-1] == "data: [DONE]"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_cli_defaults_to_localhost(monkeypatch):
    import tunelab.chat.engine
    from tunelab.chat.http_server import free_port
    from tunelab.cli.main import build_parser, main

    args = build_parser().parse_args(["serve", "some/model"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.engine == "tunelab"
    loaded = []  # tunelab's engine decodes 16 requests together unless told (--engine vllm: vLLM's own default)
    monkeypatch.setattr(tunelab.chat.engine, "load_from_args", lambda args, **kwargs: loaded.append(kwargs) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["serve", "some/model", "--port", str(free_port())])
    assert loaded == [{"max_batch_size": 16}]


@pytest.mark.parametrize("argv, says", [
    (["serve", "m", "--max-batch-size", "0"], "--max-batch-size 0: must be at least 1"),
    (["web", "m", "--max-model-len", "1"], "--max-model-len 1: must be at least 2"),
    (["serve", "m", "--repetition-penalty", "1e-300"], "--repetition-penalty 1e-300: must be above 0 (from 0.01 to 10"),
    (["chat", "m", "--seed", str(2**70), "--prompt", "x"], "--seed"),
    (["serve", "m", "--temperature", "3"], "--temperature 3.0: must be 0 (greedy) or more, at most 2"),
    (["serve", "m", "--port", "70000"], "--port 70000: must be from 1 to 65535"),
    (["web", "m", "--port", "0"], "--port 0: must be from 1 to 65535"),
    (["serve", "m", "--api-key", ""], "--api-key is empty (an unset variable?)"),  # never served without a key
    (["web", "m", "--api-key", " "], "--api-key is empty"),
    (["serve", "m", "--engine", "vllm", "--api-key", ""], "--api-key is empty"),
    # as a request's empty `stop` is a 400: an empty stop word is in every text, so every reply would be empty
    (["chat", "m", "--stop-word", "", "--prompt", "x"], "--stop-word '': must be"),
    (["serve", "m", "--stop-word", "</s>", "--stop-word", ""], "--stop-word '': must be"),
])
def test_bad_flags_are_one_line_errors(argv, says, capsys):
    from tunelab.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["serve", "web"])
def test_stop_word_flags_end_the_replies_of_requests_without_stop(command, chat, monkeypatch):
    """`--stop-word` is a command-line value like --temperature: a request (or the web page) that leaves `stop` out
    takes it; one that sends `stop` has its own."""
    import tunelab.chat.engine
    import tunelab.chat.http_server
    from tunelab.chat.http_server import BackgroundServer, free_port
    from tunelab.cli.main import main

    apps = []
    monkeypatch.setattr(tunelab.chat.engine, "load_from_args", lambda args, **kwargs: chat)
    monkeypatch.setattr(tunelab.chat.http_server, "serve", lambda app, **kwargs: apps.append(app))
    assert main([command, "m", "--port", str(free_port()), "--stop-word", "TuneBot", "--max-new-tokens", "24"]) == 0
    with BackgroundServer(apps[0]) as url:
        asked = {"messages": ASK}
        assert _post(f"{url}/v1/chat/completions", json.dumps(asked).encode())[1]["choices"][0]["message"][
            "content"] == ANSWER.split("TuneBot")[0]
        asked["stop"] = ["your"]
        assert _post(f"{url}/v1/chat/completions", json.dumps(asked).encode())[1]["choices"][0]["message"][
            "content"] == ANSWER.split("your")[0]


@pytest.mark.parametrize("command", ["serve", "web"])
def test_an_address_it_cannot_listen_on_fails_in_one_line_before_loading(command, capsys):
    """A port in use, or an address that is not this machine's: one line and exit 2 at once, before the model loads
    (the model here does not even exist), and no 'API on http://...' line claiming it listens."""
    import socket

    from tunelab.cli.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([command, "no/such-model", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: --port {port}: 127.0.0.1:{port} is already in use (another server?): stop it or pick " \
                  f"another --port.\n"
    assert "on http://" not in out
    assert main([command, "no/such-model", "--host", "192.0.2.1"]) == 2  # TEST-NET-1: never this machine's
    out, err = capsys.readouterr()
    assert err.startswith("error: --host 192.0.2.1: not an address of this machine") and err.count("\n") == 1
    assert "on http://" not in out


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """An importable `vllm` package (vLLM itself needs a CUDA machine) and a stand-in for exec that records the call."""
    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    calls = []
    monkeypatch.setattr("tunelab.chat.vllm.os.execvpe", lambda file, argv, env: calls.append((argv, env)))
    return calls


def test_engine_vllm_starts_vllm_with_the_trained_template(tmp_path_factory, fake_vllm):
    """The command names the merged model, binds 127.0.0.1, passes the key in the environment, and its
    --chat-template file renders (by transformers' own apply_chat_template) exactly the prompt tunelab renders."""
    from transformers import AutoTokenizer

    from tunelab.cli.main import main
    from tunelab.data.templates import get_template

    model = taught_model_dir(tmp_path_factory)
    assert main(["serve", str(model), "--engine", "vllm", "--api-key", "k3y", "--system", "Be brief.",
                 "--max-model-len", "1024", "--dtype", "bf16"]) == 0
    (argv, env), = fake_vllm
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags["--model"] == str(model) and flags["--host"] == "127.0.0.1" and flags["--port"] == "8000"
    assert flags["--max-model-len"] == "1024" and flags["--dtype"] == "bfloat16"
    assert flags["--served-model-name"] == model.name
    assert "k3y" not in argv and env["VLLM_API_KEY"] == "k3y"
    template = Path(flags["--chat-template"])
    try:
        rendered = AutoTokenizer.from_pretrained(model).apply_chat_template(
            ASK, chat_template=template.read_text(encoding="utf-8"), tokenize=False, add_generation_prompt=True)
    finally:
        template.unlink()
    expected = get_template("qwen_chat").render([{"role": "system", "content": "Be brief."}, *ASK],
                                                add_generation_prompt=True)
    assert rendered == expected


def test_engine_vllm_prompts_a_model_without_tunelab_json_as_tunelab_chat_does(tiny_llama_dir, fake_vllm):
    """A model trained elsewhere, its tokenizer without a chat_template: vLLM gets the template `tunelab chat`
    chooses for it (a guess from its config), not none at all."""
    from transformers import AutoTokenizer

    from tunelab.chat.engine import load_chat_model
    from tunelab.cli.main import main

    assert not AutoTokenizer.from_pretrained(tiny_llama_dir).chat_template
    assert main(["serve", str(tiny_llama_dir), "--engine", "vllm"]) == 0
    (argv, _), = fake_vllm
    template = Path(dict(zip(argv[3::2], argv[4::2]))["--chat-template"])
    try:
        rendered = AutoTokenizer.from_pretrained(tiny_llama_dir).apply_chat_template(
            ASK, chat_template=template.read_text(encoding="utf-8"), tokenize=False, add_generation_prompt=True)
    finally:
        template.unlink()
    chat = load_chat_model(str(tiny_llama_dir), device="cpu")
    assert rendered == chat.template.render(ASK, add_generation_prompt=True)


@pytest.mark.parametrize("template, parsers", [
    ("qwen2_5_chat", ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]),
    ("qwen3_chat", ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"]),
    ("deepseek_r1", ["--reasoning-parser", "deepseek_r1"]),
    ("llama3_1_chat", ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]),
    ("internlm2_chat", ["--enable-auto-tool-choice", "--tool-call-parser", "internlm"]),
    ("mistral_v3", ["--enable-auto-tool-choice", "--tool-call-parser", "mistral"]),
    ("qwen_chat", []),
])
def test_engine_vllm_reads_the_calls_and_reasoning_the_template_writes(marked_llama_dir, fake_vllm, template,
                                                                        parsers):
    """vLLM is told the parsers of the formats the template writes, so its replies carry tool_calls and
    reasoning_content as tunelab's own server gives them."""
    from tunelab.cli.main import main

    assert main(["serve", str(marked_llama_dir), "--engine", "vllm", "--prompt-template", template]) == 0
    (argv, _), = fake_vllm
    Path(dict(zip(argv[3::2], argv[4::2]))["--chat-template"]).unlink()
    assert argv[argv.index("--chat-template") + 2:] == parsers  # no other option given: the parsers come last


@pytest.fixture(scope="module")
def marked_llama_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny llama with <think>, </think> and [TOOL_CALLS] tokens, as Qwen3's and Mistral's vocabularies have them
    (the tiny tokenizer has <tool_call> and </tool_call>, not these)."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("marked") / "model"
    shutil.copytree(tiny_llama_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not {"<think>", "</think>", "[TOOL_CALLS]"} & set(tokenizer.get_vocab())
    tokenizer.add_tokens(["<think>", "</think>", "[TOOL_CALLS]"], special_tokens=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("template, parsers, missing", [
    ("qwen3_chat", ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"], "<think> or </think>"),
    ("deepseek_r1", [], "<think> or </think>"),
    ("mistral_v3", [], "[TOOL_CALLS]"),
])
def test_engine_vllm_leaves_out_a_parser_whose_markers_are_not_tokens(tiny_llama_dir, fake_vllm, capsys, template,
                                                                       parsers, missing):
    """vLLM's hermes, mistral, qwen3 and deepseek_r1 parsers look their markers up in the vocabulary and fail every
    request they are made for where one is missing (a model trained with another family's template, e.g. qwen3_chat
    on Qwen2.5 or Llama): such a parser is left out, saying so, and the replies carry that text as content."""
    from tunelab.cli.main import main

    assert main(["serve", str(tiny_llama_dir), "--engine", "vllm", "--prompt-template", template]) == 0
    (argv, _), = fake_vllm
    Path(dict(zip(argv[3::2], argv[4::2]))["--chat-template"]).unlink()
    assert argv[argv.index("--chat-template") + 2:] == parsers
    err = capsys.readouterr().err
    assert f"the tokenizer has no {missing} token" in err and "vLLM starts without it" in err


def test_engine_vllm_samples_as_the_sampling_flags_say(tiny_llama_dir, fake_vllm):
    """The sampling flags reach vLLM as its default sampling values (--override-generation-config), defaults
    included, so vLLM samples as tunelab's own server would rather than by the model's generation_config.json;
    --max-tokens-limit is its max_new_tokens, the most a reply may take."""
    from tunelab.cli.main import main

    assert main(["serve", str(tiny_llama_dir), "--engine", "vllm", "--temperature", "0.7", "--top-p", "0.9",
                 "--top-k", "0", "--repetition-penalty", "1.1", "--max-tokens-limit", "300"]) == 0
    (argv, _), = fake_vllm
    flags = dict(zip(argv[3::2], argv[4::2]))
    Path(flags["--chat-template"]).unlink()
    assert json.loads(flags["--override-generation-config"]) == {
        "temperature": 0.7, "top_p": 0.9, "top_k": -1, "repetition_penalty": 1.1, "max_new_tokens": 300}
    fake_vllm.clear()
    assert main(["serve", str(tiny_llama_dir), "--engine", "vllm"]) == 0  # tunelab's defaults: greedy
    (argv, _), = fake_vllm
    flags = dict(zip(argv[3::2], argv[4::2]))
    Path(flags["--chat-template"]).unlink()
    assert json.loads(flags["--override-generation-config"]) == {
        "temperature": 0.0, "top_p": 0.75, "top_k": 40, "repetition_penalty": 1.0, "max_new_tokens": 4096}


def test_engine_vllm_takes_the_batch_size_and_the_gpu(tiny_llama_dir, fake_vllm, monkeypatch):
    """--max-batch-size is vLLM's --max-num-seqs (left out when not given: vLLM's own default batches far more than
    tunelab's 16); --device cuda:N is the GPU vLLM sees, through CUDA_VISIBLE_DEVICES (vLLM has had no device flag
    since 0.10), counted as torch counts them: among those already visible."""
    import torch

    from tunelab.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    started = []
    for visible, extra in ((None, []), (None, ["--max-batch-size", "64", "--device", "cuda:1"]),
                           ("4,6", ["--device", "cuda:1"]), ("4,6", ["--device", "cuda"])):
        if visible:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert main(["serve", str(tiny_llama_dir), "--engine", "vllm", *extra]) == 0
        (argv, env), = fake_vllm
        fake_vllm.clear()
        Path(argv[argv.index("--chat-template") + 1]).unlink()
        started.append((argv[argv.index("--max-num-seqs") + 1] if "--max-num-seqs" in argv else None,
                        env.get("CUDA_VISIBLE_DEVICES")))
    assert started == [(None, None), ("64", "1"), (None, "6"), (None, "4,6")]


@pytest.mark.parametrize("flags, says", [
    (["--stop-word", "</s>"], "--stop-word: vLLM takes no stop words of its own"),
    (["--seed", "3"], "--seed: vLLM takes no seed for requests"),
    (["--max-new-tokens", "100"], "--max-new-tokens: vLLM has no reply length of its own"),
    (["--temperature", "3"], "--temperature 3.0: must be 0 (greedy) or more, at most 2"),
    (["--device", "cpu"], "--device cpu: vLLM takes no device"),
])
def test_engine_vllm_refuses_the_flags_it_cannot_pass_on(tiny_llama_dir, fake_vllm, capsys, flags, says):
    """A flag vLLM's server has no place for is a one-line error before vLLM starts, never dropped."""
    from tunelab.cli.main import main

    assert main(["serve", str(tiny_llama_dir), "--engine", "vllm", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert fake_vllm == []


def test_engine_vllm_refuses_what_it_cannot_serve(tmp_path, fake_vllm, capsys):
    from tunelab.cli.main import main

    assert main(["serve", "some/base", "--adapter", str(tmp_path), "--engine", "vllm"]) == 2
    assert "tunelab convert merge" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--engine", "vllm"]) == 2  # a directory without config.json
    assert "no config.json" in capsys.readouterr().err
    assert fake_vllm == []


def test_engine_vllm_without_vllm_says_how_to_install(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    from tunelab.cli.main import main

    assert main(["serve", str(tmp_path), "--engine", "vllm"]) == 2
    assert "pip install vllm" in capsys.readouterr().err
