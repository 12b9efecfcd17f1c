"""`tunelab serve`: the official `openai` client gets the taught answer, streamed or not; requests queue safely."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from chat_helpers import ANSWER, QUESTION, taught_model_dir

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from tunelab.chat.engine import load_chat_model

    return load_chat_model(str(taught_model_dir(tmp_path_factory)))


@pytest.fixture(scope="module")
def server_url(chat):
    from tunelab.chat.server import BackgroundServer, create_app
    from tunelab.model.generate import GenerationSettings

    with BackgroundServer(create_app(chat, GenerationSettings(max_new_tokens=24), max_tokens_limit=64)) as url:
        yield url


@pytest.fixture
def client(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)


ASK = [{"role": "user", "content": QUESTION}]


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_and_plain_completion(client, chat):
    assert [m.id for m in client.models.list().data] == [chat.name]
    result = client.chat.completions.create(model=chat.name, messages=ASK)
    assert result.choices[0].message.content == ANSWER
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0


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


def test_max_tokens_and_stop(client, chat):
    short = client.chat.completions.create(model=chat.name, messages=ASK, max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    assert len(short.choices[0].message.content) < len(ANSWER)
    cut = client.chat.completions.create(model=chat.name, messages=ASK, stop=["TuneBot"])
    assert cut.choices[0].message.content == "I am"


def test_concurrent_requests_are_answered_one_at_a_time(client, chat):
    active, most = 0, 0
    guard = threading.Lock()
    original = chat.model.generate

    def counting_generate(*args, **kwargs):
        nonlocal active, most
        with guard:
            active += 1
            most = max(most, active)
        try:
            time.sleep(0.05)  # widen the window in which an unsafe server would overlap two generations
            return original(*args, **kwargs)
        finally:
            with guard:
                active -= 1

    chat.model.generate = counting_generate
    try:
        def ask(i):
            if i % 2:
                events = client.chat.completions.create(model=chat.name, messages=ASK, stream=True)
                return "".join(e.choices[0].delta.content or "" for e in events).strip()
            return client.chat.completions.create(model=chat.name, messages=ASK).choices[0].message.content

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
    finally:
        del chat.model.generate
    assert answers == [ANSWER] * 6
    assert most == 1


@pytest.mark.parametrize("body, where", [
    (b"{not json", "body"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 3}', "n"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', "limit"),
])
def test_malformed_requests_get_a_json_4xx(server_url, client, chat, body, where):
    status, payload = _post(f"{server_url}/v1/chat/completions", body)
    assert status == 400
    assert where in payload["error"]["message"] and payload["error"]["type"] == "invalid_request_error"
    # the server is still there
    assert client.chat.completions.create(model=chat.name, messages=ASK).choices[0].message.content == ANSWER


def test_openai_client_sees_a_bad_request_error(client, chat):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=chat.name, messages=[])


def test_api_key_is_enforced(chat):
    from tunelab.chat.server import BackgroundServer, create_app
    from tunelab.model.generate import GenerationSettings

    app = create_app(chat, GenerationSettings(max_new_tokens=4), api_key="s3cret")
    with BackgroundServer(app) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0).models.list().data


def test_serve_cli_defaults_to_localhost():
    from tunelab.cli.main import build_parser

    args = build_parser().parse_args(["serve", "some/model"])
    assert args.host == "127.0.0.1" and args.port == 8000
