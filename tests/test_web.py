"""`tunelab web`: the page is served, and in a real headless Chromium a typed question gets the taught answer;
with --api-key the page asks for the key and then works."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request

import pytest

from chat_helpers import ANSWER, QUESTION, taught_model_dir

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


KEY = "page-s3cret"


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from tunelab.chat.engine import load_chat_model

    chat = load_chat_model(str(taught_model_dir(tmp_path_factory)), system="", max_batch_size=4)
    yield chat
    chat.batcher.stop()


def _web(chat, **kwargs):
    from tunelab.chat.http_server import BackgroundServer
    from tunelab.chat.web import create_web_app
    from tunelab.model.generate import GenerationSettings

    return BackgroundServer(create_web_app(chat, GenerationSettings(max_new_tokens=24), **kwargs))


@pytest.fixture(scope="module")
def web_url(chat):
    with _web(chat) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_web_url(chat):
    with _web(chat, api_key=KEY) as url:
        yield url


def test_page_and_api_share_one_server(web_url):
    with urllib.request.urlopen(f"{web_url}/", timeout=10) as response:
        page = response.read().decode()
    assert response.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page and "Clear history" in page
    with urllib.request.urlopen(f"{web_url}/tunelab/info", timeout=10) as response:
        assert b'"template":"qwen_chat"' in response.read()


def test_web_cli_defaults_to_localhost_and_takes_a_key():
    from tunelab.cli.main import build_parser

    args = build_parser().parse_args(["web", "some/model", "--adapter", "a"])
    assert args.host == "127.0.0.1" and args.adapter == "a" and args.api_key is None
    assert build_parser().parse_args(["web", "m", "--api-key", "k"]).api_key == "k"


def test_with_a_key_the_page_loads_but_the_api_does_not(keyed_web_url):
    with urllib.request.urlopen(f"{keyed_web_url}/", timeout=10) as response:
        assert "api_key" in response.read().decode()  # the page, with its key box
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{keyed_web_url}/tunelab/info", timeout=10)  # it holds the system prompt
    assert refused.value.code == 401


def _browser_or_skip():
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install playwright")
    return sync_playwright


@pytest.mark.browser
def test_browser_chat_shows_taught_answer_and_clears(web_url):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(web_url)
            page.wait_for_selector("#info:has-text('qwen_chat')")
            page.fill("#question", QUESTION)
            page.press("#question", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 1 && "
                                   "!document.getElementById('send').disabled", timeout=30000)
            assert page.inner_text(".msg.user") == QUESTION
            assert page.inner_text(".msg.assistant") == ANSWER
            # a second turn sends the whole conversation; then Clear history empties the page
            page.fill("#question", QUESTION)
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 && "
                                   "!document.getElementById('send').disabled", timeout=30000)
            page.click("#clear")
            assert page.locator(".msg").count() == 0
            # a bad setting shows the server's error on the page instead of hanging
            page.fill("#max_tokens", "999999")
            page.fill("#question", QUESTION)
            page.click("#send")
            page.wait_for_selector(".msg.error", timeout=30000)
            assert "limit" in page.inner_text(".msg.error")
        finally:
            browser.close()


@pytest.mark.browser
def test_browser_asks_for_the_key_once_then_chats(keyed_web_url):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(keyed_web_url)
            page.wait_for_selector("#keybox:not([hidden])")
            assert page.inner_text("#info") == "API key needed"
            page.fill("#api_key", "wrong")
            page.click("#use_key")
            page.wait_for_selector("#info:has-text('wrong API key')")
            page.fill("#api_key", KEY)
            page.press("#api_key", "Enter")
            page.wait_for_selector("#info:has-text('qwen_chat')")
            assert page.is_hidden("#keybox")
            page.fill("#question", QUESTION)
            page.press("#question", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 1 && "
                                   "!document.getElementById('send').disabled", timeout=30000)
            assert page.inner_text(".msg.assistant") == ANSWER
            # the tab keeps the key: a reload does not ask again
            page.reload()
            page.wait_for_selector("#info:has-text('qwen_chat')")
            assert page.is_hidden("#keybox")
        finally:
            browser.close()
