"""`tokenizer.ggml.add_space_prefix` of a sentencepiece GGUF: llama.cpp (llama-cpp-python) tokenizes a rendered chat
prompt to the ids the model's own transformers tokenizer gives, for each way a Llama 2 / Mistral tokenizer is shipped:
tokenizer.model alone (transformers 5: Metaspace "first"), tokenizer.json with Llama 2's normalizer under a generic
tokenizer class (kept as is: "▁" after every special token), the same file under LlamaTokenizer with `legacy: true`
(transformers 5 rebuilds it: Metaspace "always"), and Mistral v0.3's layout ([INST] / [/INST] special pieces)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tunelab.data.templates import get_template
from tunelab.export.gguf_convert import convert_to_gguf
from tunelab.export.gguf_space import llama_cpp_ids
from tunelab.model.tiny import _CORPUS, make_model
from tunelab.model.tokenizer import load_tokenizer

LLAMA2_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
LLAMA2_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# conversations other than the export's own probes: leading spaces, newlines, digits, several turns
CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Be brief.\nReally."}, {"role": "user", "content": " 42 apples"},
     {"role": "assistant", "content": "Fine, 7."}, {"role": "user", "content": "And\nthen?"}],
]
LAYOUTS = ("spm_only", "llama2_json", "legacy_true", "mistral_v3")
# every layout with the templates that start with the BOS; 'default' starts with text: only where transformers puts
# "▁" before every piece of text (Llama 2's normalizer, Metaspace "always") can llama.cpp follow it
CASES = [(layout, template) for layout in LAYOUTS for template in ("llama2_chat", "mistral", "mistral_v3")]
CASES += [("llama2_json", "default"), ("legacy_true", "default")]


def _sentencepiece(user_defined: tuple[str, ...] = ()) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4), model_writer=out, vocab_size=600, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, user_defined_symbols=list(user_defined))
    return out.getvalue()


def _write_layout(layout: str, out: Path) -> Path:
    """A tokenizer folder shipped as `layout` (the module docstring), then a tiny Llama model with those very files
    (as a downloaded model has them: transformers' save_pretrained would rewrite them)."""
    tok_dir = out / "tok"
    tok_dir.mkdir(parents=True)
    markers = ("[INST]", "[/INST]") if layout == "mistral_v3" else ()
    (tok_dir / "tokenizer.model").write_bytes(_sentencepiece(markers))
    config = dict(CONFIG)
    if layout == "mistral_v3":  # the markers are special pieces, as in Mistral v0.3's vocabulary
        config["added_tokens_decoder"] = {str(i): {"content": m, "special": True, "normalized": False}
                                          for i, m in zip((3, 4), markers)}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    if layout in ("llama2_json", "legacy_true"):
        spec = json.loads(load_tokenizer(str(tok_dir)).backend_tokenizer.to_str())
        spec.update(normalizer=LLAMA2_NORMALIZER, pre_tokenizer=None, decoder=LLAMA2_DECODER)
        (tok_dir / "tokenizer.json").write_text(json.dumps(spec))
        config.update(tokenizer_class="PreTrainedTokenizerFast") if layout == "llama2_json" else config.update(
            legacy=True)
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    model_dir = out / "model"
    make_model(model_dir, "llama", tokenizer=load_tokenizer(str(tok_dir)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink(missing_ok=True)
    for path in tok_dir.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    return model_dir


@pytest.fixture(scope="module")
def layout_model(tmp_path_factory):
    made = {}

    def make(layout: str) -> Path:
        if layout not in made:
            made[layout] = _write_layout(layout, tmp_path_factory.mktemp(layout))
        return made[layout]

    return make


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


def _prompts(model_dir: Path, template_name: str) -> list[tuple[str, list[int]]]:
    tokenizer = load_tokenizer(str(model_dir))
    template = get_template(template_name, tokenizer)
    prompts = [template.render(c, add_generation_prompt=True) for c in CONVERSATIONS]
    return [(p, tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]


def _llama_cpp_tokens(gguf_path: Path, prompt: str) -> list[int]:
    llm = _llama_cpp().Llama(str(gguf_path), n_ctx=256, verbose=False, vocab_only=True)
    return llm.tokenize(prompt.encode(), add_bos=False, special=True)


@pytest.mark.parametrize("layout,template_name", CASES, ids=["-".join(c) for c in CASES])
def test_llama_cpp_tokenizes_the_training_prompt_to_the_training_ids(layout, template_name, layout_model, tmp_path,
                                                                    capsys):
    _llama_cpp()
    model_dir = layout_model(layout)
    out = convert_to_gguf(str(model_dir), str(tmp_path / "m.gguf"), out_type="f32", prompt_template=template_name)
    assert "warning" not in capsys.readouterr().out
    for prompt, ids in _prompts(model_dir, template_name):
        assert _llama_cpp_tokens(out, prompt) == ids, prompt


@pytest.mark.parametrize("layout", ["spm_only", "mistral_v3"])
def test_a_template_that_starts_with_text_is_warned_about(layout, layout_model, tmp_path, capsys):
    """'default' starts with the system text (Metaspace "first": "▁" there) and puts text after </s> (no "▁"): no
    one llama.cpp setting does both, and the export says so."""
    model_dir = layout_model(layout)
    convert_to_gguf(str(model_dir), str(tmp_path / "m.gguf"), out_type="f32", prompt_template="default")
    said = capsys.readouterr().out
    assert "warning: llama.cpp and Ollama will tokenize prompts differently from training" in said
    assert "probe prompts differ" in said


def test_a_model_with_no_template_keeps_the_prefix_of_a_plain_prompt(layout_model, tmp_path):
    model_dir = layout_model("spm_only")
    out = convert_to_gguf(str(model_dir), str(tmp_path / "m.gguf"), out_type="f32")
    import gguf

    assert gguf.GGUFReader(out).fields["tokenizer.ggml.add_space_prefix"].contents() is True
    tokenizer = load_tokenizer(str(model_dir))
    for text in ("Hello world", "Who are you? 123"):
        llm = _llama_cpp().Llama(str(out), n_ctx=256, verbose=False, vocab_only=True)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text).input_ids


def test_internlm2_chat_prompts_tokenize_as_training(tiny_model_factory, tmp_path, capsys):
    """InternLM2's tokenizer.model has add_dummy_prefix off and its chat markers are user-defined pieces."""
    _llama_cpp()
    model_dir = tiny_model_factory("internlm2")
    out = convert_to_gguf(str(model_dir), str(tmp_path / "m.gguf"), out_type="f32", prompt_template="internlm2_chat")
    assert "warning" not in capsys.readouterr().out
    for prompt, ids in _prompts(model_dir, "internlm2_chat"):
        assert _llama_cpp_tokens(out, prompt) == ids, prompt


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("setting", [True, False])
def test_the_probe_tokenizes_as_llama_cpp_does(layout, setting, layout_model, tmp_path):
    """The export's stand-in for llama.cpp (`llama_cpp_ids`) against llama.cpp itself, under both settings."""
    import gguf

    from tunelab.export.gguf_space import _cut_pattern

    model_dir = layout_model(layout)
    out = convert_to_gguf(str(model_dir), str(tmp_path / "m.gguf"), out_type="f32", prompt_template="llama2_chat")
    fields = gguf.GGUFReader(out).fields
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]) for i in fields["tokenizer.ggml.tokens"].data]
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    llm = _llama_cpp().Llama(str(out), n_ctx=256, verbose=False, vocab_only=True,
                             kv_overrides={"tokenizer.ggml.add_space_prefix": setting})
    tokenizer = load_tokenizer(str(model_dir))
    for prompt, _ in _prompts(model_dir, "llama2_chat") + _prompts(model_dir, "mistral"):
        theirs = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert llama_cpp_ids(tokenizer, prompt, _cut_pattern(tokens, types), setting) == theirs, prompt


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_saved_tokenizer_tokenizes_as_the_one_training_loaded(layout, layout_model, tmp_path):
    """Checkpoints, adapters and merged models carry the tokenizer through `save_tokenizer`; reloaded, it gives the
    ids training gave (chat, the web page and the GGUF export read the saved one), whatever the base shipped."""
    from tunelab.model.tokenizer import save_tokenizer

    model_dir = layout_model(layout)
    save_tokenizer(load_tokenizer(str(model_dir)), tmp_path / "saved")
    saved = load_tokenizer(str(tmp_path / "saved"))
    for prompt, ids in _prompts(model_dir, "llama2_chat") + _prompts(model_dir, "mistral"):
        assert saved(prompt, add_special_tokens=False).input_ids == ids, prompt
