"""`tunelab convert gguf` on what a user's folders hold: refusals come before the model loads and are one line, write
failures name the path, a second GGUF in a folder keeps the first one's Modelfile, and the tokenizer that goes into
the file is the one the model was trained with (checked with llama.cpp's own reader where llama-cpp-python is
installed)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's GGUF reader/writer) is not installed")

from tests.train_helpers import assert_one_line_error  # noqa: E402
from tunelab.cli.main import main  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402
from tunelab.export.gguf_convert import convert_to_gguf  # noqa: E402


def _field(path: Path, key: str):
    field = gguf.GGUFReader(path).fields.get(key)
    return None if field is None else field.contents()


def _copy(model_dir: Path, dest: Path, *, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns(*drop))
    return dest


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model's weights are loaded: a refusal must come before."""
    import tunelab.model.load

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(tunelab.model.load, "load_causal_lm", refuse)


def _vocab_only(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


# --- 3: a second GGUF in the same folder -----------------------------------------------------------------------------

def test_a_second_gguf_in_the_folder_gets_its_own_modelfile(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    convert_to_gguf(str(tiny_llama_dir), str(out / "a.gguf"), prompt_template="qwen_chat")
    first = (out / "Modelfile").read_text()
    assert "FROM ./a.gguf" in first
    convert_to_gguf(str(tiny_llama_dir), str(out / "b.gguf"), prompt_template="llama3_chat")
    assert (out / "Modelfile").read_text() == first  # a.gguf's Modelfile is kept
    assert "FROM ./b.gguf" in (out / "b.Modelfile").read_text()
    # a.gguf written again: its own Modelfile is replaced along with it
    convert_to_gguf(str(tiny_llama_dir), str(out / "a.gguf"), prompt_template="internlm2_chat")
    assert "FROM ./a.gguf" in (out / "Modelfile").read_text() and (out / "Modelfile").read_text() != first
    assert not (out / "a.Modelfile").exists()
    # one written by hand (its FROM names no file of ours) is kept too
    (out / "Modelfile").write_text("FROM llama3\nPARAMETER temperature 0\n")
    convert_to_gguf(str(tiny_llama_dir), str(out / "a.gguf"), prompt_template="internlm2_chat")
    assert (out / "Modelfile").read_text() == "FROM llama3\nPARAMETER temperature 0\n"
    assert "FROM ./a.gguf" in (out / "a.Modelfile").read_text()


# --- 4: write failures ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocker", ["parent_is_a_file", "tmp_is_a_folder", "modelfiles_are_folders"])
def test_an_output_that_cannot_be_written_is_refused_before_loading(blocker, tiny_llama_dir, tmp_path, capsys,
                                                                    no_loading):
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    if blocker == "parent_is_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "sub" / "x.gguf"
        words = ["cannot write into", str(out.parent)]
    elif blocker == "tmp_is_a_folder":
        (out.parent / "x.gguf.tmp").mkdir()
        words = [f"{out.parent / 'x.gguf.tmp'} is a directory"]
    else:  # Modelfile a folder (someone else's): x.Modelfile is where it would go, and that is a folder too
        (out.parent / "Modelfile").mkdir()
        (out.parent / "x.Modelfile").mkdir()
        words = [f"{out.parent / 'x.Modelfile'} is a directory"]
    code = main(["convert", "gguf", str(tiny_llama_dir), str(out), "--prompt-template", "qwen_chat"])
    assert_one_line_error(capsys, code, *words, "Nothing was written")
    assert not out.exists()


def test_a_modelfile_folder_is_left_alone(tiny_llama_dir, tmp_path):
    (tmp_path / "Modelfile").mkdir()
    convert_to_gguf(str(tiny_llama_dir), str(tmp_path / "x.gguf"), prompt_template="qwen_chat")
    assert "FROM ./x.gguf" in (tmp_path / "x.Modelfile").read_text()


@pytest.mark.parametrize("failure", [(errno.ENOSPC, "write_tensors_to_file", "No space left on device"),
                                     (errno.EROFS, "write_header_to_file", "Read-only file system")])
def test_a_failed_write_is_one_line_naming_the_file_and_leaves_nothing(failure, tiny_llama_dir, tmp_path, capsys,
                                                                       monkeypatch):
    code_, step, text = failure
    out = tmp_path / "out" / "x.gguf"
    tmp = out.with_name("x.gguf.tmp")

    def fail(self, *args, **kwargs):
        tmp.write_bytes(b"GGUF half")  # what a write stopped midway leaves
        raise OSError(code_, text, str(tmp))

    monkeypatch.setattr(gguf.GGUFWriter, step, fail)
    if code_ == errno.EROFS:  # the cleanup fails too (read-only): the first error is the one reported
        real_unlink = Path.unlink
        monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (_ for _ in ()).throw(
            OSError(errno.EROFS, "Read-only file system", str(self))) if self == tmp else real_unlink(self, *a, **k))
    code = main(["convert", "gguf", str(tiny_llama_dir), str(out), "--prompt-template", "qwen_chat"])
    message = assert_one_line_error(capsys, code, f"cannot write {tmp}", text)
    if code_ == errno.ENOSPC:
        assert "MiB free in" in message
        assert not tmp.exists()
    assert not out.exists() and not (out.parent / "Modelfile").exists()


# --- 5: no tokenizer files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", ["nothing", "tokenizer_config.json"])
def test_a_model_folder_without_tokenizer_files_is_refused_naming_them(keep, tiny_llama_dir, tmp_path, capsys,
                                                                       no_loading):
    drop = ("tokenizer.json", "special_tokens_map.json") + (("tokenizer_config.json",) if keep == "nothing" else ())
    model = _copy(tiny_llama_dir, tmp_path / "model", drop=drop)
    code = main(["convert", "gguf", str(model), str(tmp_path / "x.gguf"), "--prompt-template", "qwen_chat"])
    assert_one_line_error(capsys, code, str(model), "no tokenizer.json or tokenizer.model", "Copy the base model's")


def test_load_tokenizer_names_the_missing_files(tiny_llama_dir, tmp_path):
    from tunelab.model.tokenizer import load_tokenizer

    model = _copy(tiny_llama_dir, tmp_path / "model", drop=("tokenizer.json",))
    with pytest.raises(TunelabError, match="tokenizer.json or tokenizer.model is missing"):
        load_tokenizer(str(model))


# --- 6: the tokenizer that goes in -----------------------------------------------------------------------------------

def test_tokenizer_json_alone_gets_the_templates_end_of_turn_as_eos(tiny_llama_dir, tmp_path, capsys):
    from tunelab.model.tokenizer import load_tokenizer

    model = _copy(tiny_llama_dir, tmp_path / "model", drop=("tokenizer_config.json", "special_tokens_map.json"))
    out = convert_to_gguf(str(model), str(tmp_path / "a" / "x.gguf"), prompt_template="qwen_chat")
    im_end = load_tokenizer(str(tiny_llama_dir)).convert_tokens_to_ids("<|im_end|>")
    assert _field(out, "tokenizer.ggml.eos_token_id") == im_end
    assert "the GGUF's eos is the template's end of turn '<|im_end|>'" in capsys.readouterr().out
    assert _vocab_only(out).token_eos() == im_end  # llama.cpp has an end token
    # no template and no eos anywhere: said plainly
    convert_to_gguf(str(model), str(tmp_path / "b" / "x.gguf"))
    assert "llama.cpp and Ollama will not know where a reply ends" in capsys.readouterr().out


def test_a_stray_tokenizer_model_beside_a_bpe_tokenizer_json_is_passed_over(tiny_llama_dir, tiny_model_factory,
                                                                             tmp_path, capsys):
    from tunelab.model.tokenizer import load_tokenizer

    model = _copy(tiny_llama_dir, tmp_path / "model")
    shutil.copy(tiny_model_factory("internlm2") / "tokenizer.model", model / "tokenizer.model")
    out = convert_to_gguf(str(model), str(tmp_path / "x.gguf"), prompt_template="qwen_chat")
    assert "differs from the tokenizer's vocabulary from id" in capsys.readouterr().out
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    assert _field(out, "tokenizer.ggml.model") == "gpt2"
    tokens = _field(out, "tokenizer.ggml.tokens")
    assert all(tokens[i] == t for t, i in tokenizer.get_vocab().items())
    text = "Hello there, who are you? 1234"
    expected = tokenizer(text, add_special_tokens=False).input_ids
    assert _vocab_only(out).tokenize(text.encode(), add_bos=False) == expected



# --- 7: refusals before the model loads ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["architecture", "unknown_template", "hf_without_chat_template"])
def test_refusals_come_before_the_model_loads(case, tiny_llama_dir, tiny_model_factory, tmp_path, capsys, no_loading):
    model, flags, words = tiny_llama_dir, [], []
    if case == "architecture":
        model, flags, words = tiny_model_factory("glm4"), ["--prompt-template", "glm4_chat"], \
            ["Glm4ForCausalLM: no GGUF export"]
    elif case == "unknown_template":
        flags, words = ["--prompt-template", "qwen9_chat"], ["unknown prompt_template 'qwen9_chat'"]
    else:  # the tiny tokenizer has no chat_template of its own
        flags, words = ["--prompt-template", "hf"], ["has no chat_template"]
    code = main(["convert", "gguf", str(model), str(tmp_path / "out" / "x.gguf"), *flags])
    assert_one_line_error(capsys, code, *words)
    assert not (tmp_path / "out" / "x.gguf").exists()


# --- 8: a raw base with no chat template ---------------------------------------------------------------------------

def _adds_bos(model_dir: Path) -> None:
    """Make the tokenizer add its BOS to a plain text, as Llama's and Mistral's do."""
    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text())
    bos = next(t for t in spec["added_tokens"] if t["content"] == "<s>")["id"]
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]}}}
    path.write_text(json.dumps(spec))


@pytest.mark.parametrize("adds_bos", [True, False])
def test_a_raw_base_keeps_the_tokenizers_bos_and_says_it_has_no_chat_template(adds_bos, tiny_llama_dir, tmp_path,
                                                                              capsys):
    from tunelab.model.tokenizer import load_tokenizer

    model = _copy(tiny_llama_dir, tmp_path / "model")
    if adds_bos:
        _adds_bos(model)
    tokenizer = load_tokenizer(str(model))
    assert not tokenizer.chat_template and (tokenizer("Hi").input_ids[0] == tokenizer.bos_token_id) == adds_bos
    out = convert_to_gguf(str(model), str(tmp_path / "x.gguf"))
    said = capsys.readouterr().out
    assert "keeps the tokenizer's own chat_template" not in said and "the tokenizer has no chat_template" in said
    assert "tokenizer.chat_template" not in gguf.GGUFReader(out).fields
    assert _field(out, "tokenizer.ggml.add_bos_token") is adds_bos
    text = "Hello there"
    assert _vocab_only(out).tokenize(text.encode()) == tokenizer(text).input_ids  # llama.cpp's plain prompt
    # with a tunelab template in the file, the template writes the BOS: llama.cpp adds none
    out = convert_to_gguf(str(model), str(tmp_path / "t" / "x.gguf"), prompt_template="llama3_chat")
    assert _field(out, "tokenizer.ggml.add_bos_token") is False


# --- 9: a sentencepiece run saved before checkpoints carried tokenizer.model ------------------------------------------

@pytest.fixture(scope="module")
def old_internlm2_run(tiny_model_factory, tmp_path_factory):
    """An InternLM2 LoRA run through the CLI (train, pth_to_hf, merge) with tokenizer.model deleted from every output,
    as tunelab saved them before it carried the file along: tokenizer.json alone (byte-fallback BPE)."""
    from tests.train_helpers import write_config

    base, root = tiny_model_factory("internlm2"), tmp_path_factory.mktemp("old_run")
    config = write_config(root, base, prompt_template="internlm2_chat", max_steps=1)
    assert main(["train", str(config), "--work-dir", str(root / "work"), "--device", "cpu"]) == 0
    assert main(["convert", "pth_to_hf", str(config), str(root / "work"), str(root / "adapter")]) == 0
    assert main(["convert", "merge", str(base), str(root / "adapter"), str(root / "merged"), "--device", "cpu"]) == 0
    from tunelab.train.checksums import write_manifest
    from tunelab.train.layout import list_checkpoints

    for stale in root.rglob("tokenizer.model"):
        stale.unlink()
    for checkpoint in list_checkpoints(root / "work"):  # an old run's checksums.json never listed the file
        write_manifest(checkpoint)
    return base, root


@pytest.mark.parametrize("given", ["work", "adapter", "merged", "base --adapter adapter"])
def test_an_old_sentencepiece_run_takes_tokenizer_model_from_its_local_base(given, old_internlm2_run, tmp_path,
                                                                           capsys):
    import sentencepiece as spm

    base, root = old_internlm2_run
    model, adapter = (str(base), str(root / "adapter")) if given.startswith("base") else (str(root / given), None)
    out = convert_to_gguf(model, str(tmp_path / "x.gguf"), adapter=adapter)
    said = capsys.readouterr().out
    assert f"using the base model's {base / 'tokenizer.model'}" in said and "has no tokenizer.model" in said
    assert _field(out, "tokenizer.ggml.model") == "llama"
    sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    assert _field(out, "tokenizer.ggml.tokens")[:sp.get_piece_size()] == [sp.id_to_piece(i)
                                                                          for i in range(sp.get_piece_size())]


def test_an_old_sentencepiece_run_whose_base_is_not_local_is_refused_before_loading(old_internlm2_run, tmp_path,
                                                                                   capsys, no_loading):
    _, root = old_internlm2_run
    merged = _copy(root / "merged", tmp_path / "merged")
    meta = json.loads((merged / "tunelab.json").read_text())
    (merged / "tunelab.json").write_text(json.dumps({**meta, "base_model": "internlm/internlm2-chat-1_8b"}))
    code = main(["convert", "gguf", str(merged), str(tmp_path / "out" / "x.gguf")])
    assert_one_line_error(capsys, code, str(merged), "no tokenizer.model", "internlm/internlm2-chat-1_8b",
                          "Copy the base model's tokenizer.model")
    assert not (tmp_path / "out" / "x.gguf").exists()
