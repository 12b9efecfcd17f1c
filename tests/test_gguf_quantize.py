"""`convert gguf --type q4_k_m` (and the other k-quants): llama.cpp's own quantiser writes the file from tunelab's f16
one (tunelab.export.gguf_quantize); llama.cpp loads it and computes the model's logits within 4-bit error."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tests.train_helpers import assert_one_line_error
from tunelab.cli.main import main
from tunelab.model.load import load_model_for_inference

gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's GGUF reader/writer) is not installed")


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """k-quants take rows of 256 values: a tiny Llama that wide, so its matrices are quantised as a 7B's are."""
    from tunelab.model.tiny import make_model

    return make_model(tmp_path_factory.mktemp("wide"), "llama", hidden_size=256, intermediate_size=512)


def _relative_error(path, model_dir) -> float:
    import llama_cpp

    model, tokenizer = load_model_for_inference(str(model_dir), device="cpu", dtype="fp32")
    ids = tokenizer("Hello there, who are you? Tell me about the river and the stone.", add_special_tokens=False).input_ids
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = np.array(llm.scores[:len(ids)])
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


@pytest.mark.slow
# the logits' error that 4 and 6 bits a weight make on this random model (q4_k_m 0.16, q6_k 0.05 measured); a wrong
# tensor or metadata gives errors of 1 and more
@pytest.mark.parametrize("out_type,file_type,bound", [("q4_k_m", 15, 0.25), ("q6_k", 18, 0.08)])
def test_llama_cpp_quantises_and_computes_the_models_logits(out_type, file_type, bound, wide_model, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/test.sh builds it)")
    out = tmp_path / "m.gguf"
    assert main(["convert", "gguf", str(wide_model), str(out), "--type", out_type,
                 "--prompt-template", "qwen_chat"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]  # the f16 file is gone
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == file_type
    assert any(t.tensor_type.name.endswith("_K") for t in reader.tensors)  # k-quant blocks, not f16
    assert reader.fields["tokenizer.chat_template"].contents()  # metadata carried through the quantiser
    f16 = tmp_path / "f16" / "m.gguf"
    assert main(["convert", "gguf", str(wide_model), str(f16), "--type", "f16"]) == 0
    assert out.stat().st_size < 0.6 * f16.stat().st_size
    assert _relative_error(out, wide_model) < bound
    assert _relative_error(f16, wide_model) < 1e-2  # the reference is f16's own error, not tunelab's


def test_without_llama_cpp_the_error_names_both_ways_before_loading(tmp_path, wide_model, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as when it is not installed
    monkeypatch.setattr("tunelab.model.load.load_causal_lm", lambda *a, **k: pytest.fail("loaded the model"))
    code = main(["convert", "gguf", str(wide_model), str(tmp_path / "m.gguf"), "--type", "q4_k_m"])
    assert_one_line_error(capsys, code, "pip install llama-cpp-python", "llama-quantize", "Q4_K_M")


def test_a_failed_quantisation_keeps_the_f16_file_and_says_so(tmp_path, wide_model, capsys, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp")
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *args: 1)
    code = main(["convert", "gguf", str(wide_model), str(tmp_path / "m.gguf"), "--type", "q4_k_m"])
    assert_one_line_error(capsys, code, "could not quantise", "f16 file is kept")
    assert (tmp_path / "m.f16.gguf").is_file() and not (tmp_path / "m.gguf").exists()


def test_a_file_where_the_f16_source_goes_is_refused_before_loading(tmp_path, wide_model, capsys, monkeypatch):
    """OUT.f16.gguf is written and removed by the quantisation: a file of that name already there (an f16 export of
    the user's, a failed quantisation's) is named, and kept as it is."""
    pytest.importorskip("llama_cpp")
    mine = tmp_path / "m.f16.gguf"
    mine.write_bytes(b"the user's f16 export")
    monkeypatch.setattr("tunelab.model.load.load_causal_lm", lambda *a, **k: pytest.fail("loaded the model"))
    code = main(["convert", "gguf", str(wide_model), str(tmp_path / "m.gguf"), "--type", "q4_k_m"])
    assert_one_line_error(capsys, code, f"{mine} exists", "name another output file")
    assert mine.read_bytes() == b"the user's f16 export" and not (tmp_path / "m.gguf").exists()


def test_an_unknown_type_lists_every_type(tmp_path, wide_model, capsys):
    code = main(["convert", "gguf", str(wide_model), str(tmp_path / "m.gguf"), "--type", "q3_k"])
    assert_one_line_error(capsys, code, "--type 'q3_k'", "q8_0", "q4_k_m")
