"""`tunelab web`: the page is served, and in a real headless Chromium a typed question gets the taught answer."""

from __future__ import annotations

import shutil
import urllib.request

import pytest

from chat_helpers import ANSWER, QUESTION, taught_model_dir

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def web_url(tmp_path_factory):
    from tunelab.chat.engine import load_chat_model
    from tunelab.chat.server import BackgroundServer
    from tunelab.chat.web import create_web_app
    from tunelab.model.generate import GenerationSettings

    chat = load_chat_model(str(taught_model_dir(tmp_path_factory)), system="")
    with BackgroundServer(create_web_app(chat, GenerationSettings(max_new_tokens=24))) as url:
        yield url


def test_page_and_api_share_one_server(web_url):
    with urllib.request.urlopen(f"{web_url}/", timeout=10) as response:
        page = response.read().decode()
    assert response.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page and "Clear history" in page
    with urllib.request.urlopen(f"{web_url}/tunelab/info", timeout=10) as response:
        assert b'"template":"qwen_chat"' in response.read()


def test_web_cli_defaults_to_localhost():
    from tunelab.cli.main import build_parser

    args = build_parser().parse_args(["web", "some/model", "--adapter", "a"])
    assert args.host == "127.0.0.1" and args.adapter == "a"


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
