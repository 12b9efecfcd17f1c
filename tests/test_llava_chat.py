"""Chat, web and serve with a LLaVA model: an exported HF LLaVA folder answers about a picture exactly as
transformers' own `generate` does with the folder's processor; pictures come as OpenAI image_url parts (data URLs)
to the server, as files to the terminal (`tunelab chat --image`) and as an upload on the web page; a text model
refuses pictures instead of dropping them."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import pytest
import torch

from chat_helpers import post_json
from tunelab.errors import TunelabError

TEMPLATE = "qwen_chat"


def _png(colour: str, size=(40, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(colour: str) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(colour)).decode()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tiny_model_factory, tiny_vision_factory):
    """A random tiny LLaVA exported as a HF LLaVA folder with its tunelab.json."""
    from tests.chat_helpers import make_llava_dir

    return make_llava_dir(tmp_path_factory.mktemp("llava_hf"), tiny_model_factory("llama"), tiny_vision_factory("clip"),
                          template=TEMPLATE)


@pytest.fixture(scope="module")
def chat(llava_dir):
    from tunelab.chat.engine import load_chat_model

    return load_chat_model(str(llava_dir), device="cpu", max_batch_size=4)


def _greedy(n: int):
    from tunelab.model.generate import GenerationSettings

    return GenerationSettings(max_new_tokens=n, temperature=0.0)


def _reply_ids(chat, messages, n=6, files=False):
    import queue

    ids, pixels = chat.prompt(messages, files=files)
    done: queue.Queue = queue.Queue()
    chat.batcher.submit(chat.job(ids, _greedy(n), ignore_eos=True, on_done=done.put, pixel_values=pixels))
    result = done.get(timeout=60)
    assert not isinstance(result, Exception), result
    return result.token_ids


def test_replies_about_a_picture_as_transformers_generates_them(chat, llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from PIL import Image

    assert chat.vision is not None and chat.template.name == TEMPLATE
    question = [{"type": "image_url", "image_url": {"url": _data_url("red")}},
                {"type": "text", "text": "What colour is it?"}]
    ours = _reply_ids(chat, [{"role": "user", "content": question}])

    processor = AutoProcessor.from_pretrained(llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32).eval()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "What colour is it?"}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=text, images=[Image.open(io.BytesIO(_png("red")))], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert ours == out[0, inputs["input_ids"].shape[1]:].tolist()
    # the picture reaches the model: another one changes the next-token scores
    last = []
    for colour in ("red", "blue"):
        ids, pixels = chat.prompt([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(colour)}}, question[1]]}])
        with torch.no_grad():
            last.append(chat.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1])
    assert (last[0] - last[1]).abs().max() > 1e-4


def test_a_picture_that_cannot_be_read_is_named_by_its_place(chat):
    """Not "cannot identify image file <_io.BytesIO object at 0x...>": the part at fault, and what to send."""
    from tunelab.errors import TunelabError

    not_a_picture = "data:image/png;base64," + base64.b64encode(b"just some text").decode()
    content = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": not_a_picture}}]
    with pytest.raises(TunelabError) as refused:
        chat.prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": content}])
    assert str(refused.value) == ("request: messages[2].content[1]: the image cannot be read (not a picture in a "
                                  "format it knows): send a PNG, JPEG, WebP or GIF picture.")


def test_serve_takes_data_urls_and_refuses_files(chat, tmp_path):
    from tunelab.chat.server import create_app
    from tunelab.chat.http_server import BackgroundServer

    picture = tmp_path / "red.png"
    picture.write_bytes(_png("red"))

    def post(url, content):
        return post_json(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                        "max_tokens": 4, "temperature": 0})

    text = {"type": "text", "text": "What colour is it?"}
    with BackgroundServer(create_app(chat, _greedy(4))) as url:
        content = [{"type": "image_url", "image_url": {"url": _data_url("red")}}, text]
        status, answer = post(url, content)
        # the prompt as counted is the one the model saw, the image's 16 tokens in it
        prompt_ids = chat.prompt([{"role": "user", "content": content}])[0]
        assert status == 200 and answer["usage"]["prompt_tokens"] == len(prompt_ids)
        assert len(prompt_ids) > len(chat.prompt([{"role": "user", "content": [text]}])[0]) + 15
        status, answer = post(url, [{"type": "image_url", "image_url": {"url": str(picture)}}, text])
        assert status == 400 and "not a data URL" in answer["error"]["message"]
        status, answer = post(url, [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, text])
        assert status == 400
        with urllib.request.urlopen(url + "/tunelab/info", timeout=30) as response:
            assert json.loads(response.read())["images"] is True
        # /v1/completions carries no picture: its image token is refused (the model would fail on it), text is served
        status, answer = post_json(url + "/v1/completions", {"prompt": prompt_ids, "max_tokens": 2})
        error = answer["error"]
        assert status == 400 and error["param"] == "prompt" and "image token" in error["message"]
        status, answer = post_json(url + "/v1/completions", {"prompt": "What colour", "max_tokens": 2})
        assert status == 200 and answer["usage"]["completion_tokens"] >= 1


def test_chat_cli_image_goes_with_the_first_question(chat, llava_dir, tmp_path, monkeypatch, capsys):
    """`tunelab chat MODEL --image PATH --prompt Q`: the file's picture goes with the first question, once; the
    reply is the one the same picture gets as a data URL."""
    from tunelab.chat.engine import ChatModel
    from tunelab.chat.terminal import run_chat
    from tunelab.cli.main import main

    picture = tmp_path / "red.png"
    picture.write_bytes(_png("red"))
    prompts = []
    real_prompt = ChatModel.prompt

    def spy(self, messages, *, files=False):
        prompts.append(real_prompt(self, messages, files=files))
        return prompts[-1]

    monkeypatch.setattr(ChatModel, "prompt", spy)
    assert main(["chat", str(llava_dir), "--device", "cpu", "--dtype", "fp32", "--image", str(picture),
                 "--prompt", "What colour is it?", "--prompt", "Sure?", "--no-streamer", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    question = [{"type": "image_url", "image_url": {"url": _data_url("red")}},
                {"type": "text", "text": "What colour is it?"}]
    ids, pixels = real_prompt(chat, [{"role": "user", "content": question}])
    assert prompts[0][0] == ids
    torch.testing.assert_close(prompts[0][1], pixels)
    assert prompts[1][1].shape[0] == 1  # the second turn holds the first question's picture, not a second copy
    reply = chat.reply([{"role": "user", "content": question}], _greedy(4))
    assert printed.startswith(reply)

    monkeypatch.setattr(ChatModel, "prompt", real_prompt)
    with pytest.raises(TunelabError, match=r"no such file"):
        run_chat(chat, _greedy(4), prompts=["Hi"], stream=False, out=io.StringIO(), images=[str(tmp_path / "no.png")])


@pytest.mark.parametrize("model, picture, says", [
    ("text", "red.png", "reads text only"),
    ("llava", "missing.png", "no such file"),
    ("llava", "notes.jpg", "the image cannot be read (not a picture in a format it knows)"),
])
def test_chat_cli_checks_its_images_before_loading(tiny_llama_dir, llava_dir, tmp_path, monkeypatch, capsys, model,
                                                   picture, says):
    """`tunelab chat MODEL --image PATH`: a model that reads no images (known from config.json and tunelab.json), a
    missing file or one that is no picture is one line at once, before minutes of loading the weights."""
    import tunelab.chat.engine
    from tunelab.cli.main import main

    (tmp_path / "red.png").write_bytes(_png("red"))
    (tmp_path / "notes.jpg").write_text("not a picture")
    loaded = []
    monkeypatch.setattr(tunelab.chat.engine, "load_from_args", lambda args: loaded.append(args) or 1 / 0)
    path = tiny_llama_dir if model == "text" else llava_dir
    assert main(["chat", str(path), "--image", str(tmp_path / picture), "--prompt", "What is it?"]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert loaded == []


def test_chat_cli_with_images_hashes_a_checkpoint_once_before_loading(llava_dir, tmp_path, monkeypatch, capsys):
    """`tunelab chat WORK_DIR --image PATH`: the checkpoint's model/ files are checked against its checksums.json once,
    by the early check, before the weights load (not read again at load: on a multi-GB model that is seconds), and a
    damaged one stops there."""
    import shutil
    from collections import Counter
    from pathlib import Path

    from tunelab.cli.main import main
    from tunelab.train import checksums, layout

    work = tmp_path / "work"
    ckpt = layout.checkpoint_dir(work, 3)
    shutil.copytree(llava_dir, ckpt / layout.MODEL_DIR)  # a full run of a LLaVA model, as training saves it
    layout.write_meta(ckpt, {"base_model": str(llava_dir), "method": "full", "prompt_template": TEMPLATE})
    checksums.write_manifest(ckpt)
    layout.write_pointer(work, ckpt)
    (tmp_path / "red.png").write_bytes(_png("red"))
    hashed = Counter()
    real_hash = checksums._hash_file
    monkeypatch.setattr(checksums, "_hash_file", lambda path: hashed.update([Path(path).name]) or real_hash(path))
    args = ["chat", str(work), "--image", str(tmp_path / "red.png"), "--prompt", "What colour is it?", "--device",
            "cpu", "--max-new-tokens", "2", "--no-streamer"]
    assert main(args) == 0, capsys.readouterr()
    model_files = {p.name for p in (ckpt / layout.MODEL_DIR).iterdir()}
    assert set(hashed) == model_files and set(hashed.values()) == {1}, hashed

    weights = next((ckpt / layout.MODEL_DIR).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x40
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err  # one line: the error, and no 'loading ...' before it
    assert f"{ckpt} is damaged" in err and f"{weights.name} does not match" in err and err.count("\n") == 1, err


def test_chat_cli_image_check_takes_what_the_chat_reads(llava_dir, tmp_path):
    """The early --image check passes every picture reference the chat itself reads (`resolve_image`): a file://
    path and a data URL too, not only a plain path."""
    from tunelab.chat.vision import check_chat_images

    (tmp_path / "red.png").write_bytes(_png("red"))
    check_chat_images([f"file://{tmp_path / 'red.png'}", _data_url("blue")], str(llava_dir), None)
    with pytest.raises(TunelabError, match="web address"):
        check_chat_images(["https://example.com/cat.png"], str(llava_dir), None)


@pytest.mark.browser
def test_web_page_uploads_a_picture_with_the_question(chat, tmp_path):
    """On `tunelab web` with a LLaVA model, a picked file goes with the question (shown above it) as an image_url
    part, and the page shows the model's reply to it."""
    import shutil

    from tunelab.chat.http_server import BackgroundServer
    from tunelab.chat.web import create_web_app

    chromium = "/usr/bin/chromium"
    if not shutil.which(chromium):
        pytest.skip(f"{chromium} is missing: apt-get install -y chromium")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    picture = tmp_path / "red.png"
    picture.write_bytes(_png("red"))
    question = "What colour is it?"
    with BackgroundServer(create_web_app(chat, _greedy(4))) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            sent = []
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/completions") else None)
            page.goto(url)
            page.wait_for_selector("#info:has-text('reads images')")
            page.set_input_files("#image", str(picture))
            page.fill("#question", question)
            page.press("#question", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 1 && "
                                   "!document.getElementById('send').disabled", timeout=30000)
            assert page.locator(".msg.user img").count() == 1
            assert page.inner_text(".msg.user").strip() == question
            assert page.input_value("#image") == ""  # the picture went with that question only
            shown = page.inner_text(".msg.assistant")
        finally:
            browser.close()
    # the request holds the file as an OpenAI image_url part (a data URL), before the question's text
    messages = sent[0]["messages"]
    assert messages[-1]["content"] == [{"type": "image_url", "image_url": {"url": _data_url("red")}},
                                       {"type": "text", "text": question}]
    assert shown.split() == chat.reply(messages, _greedy(4)).split()


def test_a_text_model_refuses_pictures(tiny_llama_dir):
    from tunelab.chat.engine import load_chat_model

    chat = load_chat_model(str(tiny_llama_dir), prompt_template=TEMPLATE, device="cpu")
    with pytest.raises(TunelabError, match=r"reads text only"):
        chat.prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url("red")}},
                                                  {"type": "text", "text": "Hi"}]}])
    # text parts alone are still read as text
    ids, pixels = chat.prompt([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert pixels is None and ids == chat.encode([{"role": "user", "content": "Hi"}])
