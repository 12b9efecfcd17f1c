"""Shared fixtures: a tokenizer and tiny models built once per test session, in a temp dir, with no download."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from tunelab.model.tiny import make_tokenizer

    path = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _tiny_model(tmp_path_factory, arch):
    from tunelab.model.tiny import make_model

    path = tmp_path_factory.mktemp(f"tiny_{arch}")
    make_model(path, arch)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return _tiny_model(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return _tiny_model(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_bnb_4bit_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny base saved in 4 bits by bitsandbytes, as Unsloth's `unsloth/...-bnb-4bit` uploads are."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out = tmp_path_factory.mktemp("bnb_4bit")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quant, device_map="cpu")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Call with an architecture name (see tunelab.model.tiny.TINY_CONFIGS) to get a tiny model directory."""
    cache: dict[str, object] = {}

    def make(arch: str):
        if arch not in cache:
            cache[arch] = _tiny_model(tmp_path_factory, arch)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_vision_factory(tmp_path_factory):
    """Call with "clip" or "siglip" to get a tiny vision tower directory (32px images, 8px patches)."""
    from tunelab.model.tiny import make_vision_tower

    cache: dict[str, object] = {}

    def make(kind: str = "clip"):
        if kind not in cache:
            cache[kind] = make_vision_tower(tmp_path_factory.mktemp(f"tiny_{kind}_vision"), kind)
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def taught_chat(tmp_path_factory):
    """The taught model (chat_helpers.taught_model_dir) behind the batching engine (8 requests at once), shared by
    the serve tests."""
    from chat_helpers import taught_model_dir
    from tunelab.chat.engine import load_chat_model

    chat = load_chat_model(str(taught_model_dir(tmp_path_factory)), max_batch_size=8)
    yield chat
    chat.close()


@pytest.fixture(scope="session")
def taught_server_url(taught_chat):
    """`tunelab serve`'s app for `taught_chat` in a background server: replies of up to 24 tokens unless a request
    asks for more, and at most 2000."""
    from tunelab.chat.http_server import BackgroundServer
    from tunelab.chat.server import create_app
    from tunelab.model.generate import GenerationSettings

    with BackgroundServer(create_app(taught_chat, GenerationSettings(max_new_tokens=24),
                                     max_tokens_limit=2000)) as url:
        yield url


@pytest.fixture
def taught_client(taught_server_url):
    """The official OpenAI client of `taught_server_url`."""
    from chat_helpers import openai_client

    return openai_client(taught_server_url)
