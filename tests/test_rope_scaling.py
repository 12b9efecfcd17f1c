"""rope_scaling: training past a model's context stretches its RoPE positions (tunelab.model.rope), and every later
use of the trained model (chat on the adapter, merge, GGUF export, resume) computes with the same positions: a LoRA
adapter's base gets the recorded scaling back from tunelab.json, a merged or fully trained model carries it in its
config.json, where transformers and llama.cpp read it."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.train_helpers import assert_one_line_error, write_config
from tunelab.cli.main import main
from tunelab.errors import TunelabError
from tunelab.model.rope import scaling_for
from tunelab.train.layout import read_meta

CONTEXT = 32  # the tiny bases' max_position_embeddings here; the runs train rows of 64


def _cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("kind,params", [
    ("linear", {"rope_type": "linear", "factor": 3.0}),
    ("yarn", {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 2048}),
    ("llama3", {"rope_type": "llama3", "factor": 3.0, "original_max_position_embeddings": 2048,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
])
def test_the_factor_is_max_length_over_the_context_rounded_up(kind, params):
    """As LLaMA-Factory scales: ceil(max_length / max_position_embeddings); the new context is the old times that."""
    config = {"model_type": "llama", "max_position_embeddings": 2048, "rope_theta": 10000.0}
    assert scaling_for(kind, 5000, config, "m") == {"rope_parameters": params, "max_position_embeddings": 6144}


def test_nothing_is_scaled_when_max_length_fits_and_the_warning_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        assert scaling_for("linear", 2048, {"max_position_embeddings": 2048}, "m") is None
    assert "not applied: max_length = 2048 fits m's context of 2048" in caplog.text


@pytest.mark.parametrize("config,says", [
    ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "scales RoPE already ('llama3'"),  # Llama 3.1, transformers 4's layout
    ({"max_position_embeddings": 32768, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     "scales RoPE already ('yarn'"),  # transformers 5's layout
    ({"max_position_embeddings": 32768, "model_type": "internlm2", "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "scales RoPE already ('dynamic'"),  # InternLM2.5's published config
    ({"max_position_embeddings": 2048, "rope_parameters": {"full_attention": {"rope_type": "linear"},
                                                           "sliding_attention": {"rope_type": "default"}}},
     "scales RoPE already ('per-layer'"),  # Gemma 3
    ({"max_position_embeddings": 2048, "model_type": "internlm2"}, "knows 'linear' and 'dynamic' only"),
    ({"hidden_size": 64}, "no max_position_embeddings"),
])
def test_a_scaling_that_cannot_be_added_is_refused_with_the_fix(config, says):
    with pytest.raises(TunelabError, match="rope_scaling = 'yarn'.*" + says.replace("(", r"\(")):
        scaling_for("yarn", 65536, config, "m")


def test_the_config_file_refuses_a_scaling_transformers_does_not_train_with(tmp_path, tiny_llama_dir, capsys):
    """'dynamic' NTK scaling changes with each row's length: a setting for inference, not one to fine-tune with."""
    config = write_config(tmp_path, tiny_llama_dir, rope_scaling="dynamic")
    code = _cli("train", config, "--work-dir", tmp_path / "w", "--device", "cpu")
    assert_one_line_error(capsys, code, "rope_scaling", "'linear'", "'yarn'")


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory):
    """(arch) -> a LoRA run on a tiny base of 32 positions trained on rows of 64 with rope_scaling = 'linear', its
    adapter converted and merged."""
    from tunelab.model.tiny import make_model

    runs = {}

    def run(arch: str) -> dict:
        if arch not in runs:
            root = tmp_path_factory.mktemp(f"rope_{arch}")
            base = make_model(root / "base", arch, max_position_embeddings=CONTEXT)
            config = write_config(root, base, max_length=2 * CONTEXT, rope_scaling="linear", max_steps=2,
                                  dtype="fp32", gradient_checkpointing=False, lr=5e-2)
            paths = dict(base=base, config=config, work=root / "work", hf=root / "hf", merged=root / "merged")
            warnings = logging.Handler(logging.WARNING)  # what the training run warns (caplog is per test)
            warnings.emit, paths["warnings"] = (lambda record: paths["warnings"].append(record.getMessage())), []
            logging.getLogger().addHandler(warnings)
            try:
                assert _cli("train", config, "--work-dir", paths["work"], "--device", "cpu") == 0
            finally:
                logging.getLogger().removeHandler(warnings)
            assert _cli("convert", "pth_to_hf", config, paths["work"], paths["hf"], "--fp32") == 0
            assert _cli("convert", "merge", base, paths["hf"], paths["merged"], "--device", "cpu",
                        "--dtype", "fp32") == 0
            runs[arch] = paths
        return runs[arch]

    return run


@pytest.mark.parametrize("arch", ["llama", "internlm2"])
def test_chat_merge_and_peft_compute_with_the_positions_the_adapter_was_trained_with(arch, scaled_run):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.chat.engine import load_chat_model
    from tunelab.model.load import load_causal_lm

    paths = scaled_run(arch)
    recorded = read_meta(paths["hf"])["rope_scaling"]
    assert recorded["rope_parameters"]["rope_type"] == "linear" and recorded["rope_parameters"]["factor"] == 2.0
    assert recorded["max_position_embeddings"] == 2 * CONTEXT
    ids = list(range(5, 5 + 2 * CONTEXT - 4))  # past the base's own 32 positions
    # what the run trained: the base built with the recorded scaling, the adapter on it through peft
    trained = PeftModel.from_pretrained(load_causal_lm(str(paths["base"]), dtype=torch.float32, device="cpu",
                                                       rope=recorded), paths["hf"])
    unscaled = PeftModel.from_pretrained(load_causal_lm(str(paths["base"]), dtype=torch.float32, device="cpu"),
                                         paths["hf"])
    assert not torch.allclose(_logits(trained, ids), _logits(unscaled, ids), atol=1e-3)  # the scaling matters
    for target in (paths["work"], paths["hf"]):  # chat on the work dir and on the converted adapter
        chat = load_chat_model(str(target), device="cpu", dtype="fp32")
        torch.testing.assert_close(_logits(chat.model, ids), _logits(trained, ids), atol=1e-4, rtol=0)
    # the merged model (InternLM2's in the native Llama layout) in transformers, from its own config.json
    config = AutoConfig.from_pretrained(paths["merged"])
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
    assert config.max_position_embeddings == 2 * CONTEXT
    model = AutoModelForCausalLM.from_pretrained(paths["merged"], dtype=torch.float32)
    torch.testing.assert_close(_logits(model, ids), _logits(trained, ids), atol=1e-4, rtol=0)
    if arch == "internlm2":  # InternLM2's own layout (--format original): its code's rope_scaling, read back
        original = paths["merged"].with_name("merged_original")
        assert _cli("convert", "merge", paths["base"], paths["hf"], original, "--device", "cpu", "--dtype", "fp32",
                    "--format", "original") == 0
        written = json.loads((original / "config.json").read_text())
        assert written["rope_scaling"] == {"type": "linear", "factor": 2.0}
        assert written["max_position_embeddings"] == 2 * CONTEXT
        model = load_causal_lm(str(original), dtype=torch.float32, device="cpu")
        torch.testing.assert_close(_logits(model, ids), _logits(trained, ids), atol=1e-4, rtol=0)


def test_the_gguf_of_base_plus_adapter_carries_the_scaling(scaled_run, tmp_path):
    """llama.cpp reads the scaling from the GGUF's keys (tests/test_gguf.py checks its logits with them)."""
    gguf = pytest.importorskip("gguf")
    paths = scaled_run("llama")
    out = tmp_path / "m.gguf"
    assert _cli("convert", "gguf", paths["base"], out, "--adapter", paths["hf"], "--type", "f32") == 0
    fields = gguf.GGUFReader(out).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == pytest.approx(2.0)
    assert fields["llama.context_length"].contents() == 2 * CONTEXT


def test_the_run_trains_without_the_context_warning_and_resume_holds_the_setting(scaled_run, capsys):
    paths = scaled_run("llama")
    assert not [w for w in paths["warnings"] if "never saw" in w]
    config = paths["config"]
    text = config.read_text().replace("rope_scaling = 'linear'", "rope_scaling = 'yarn'")
    changed = config.with_name("changed.py")
    changed.write_text(text.replace("max_steps = 2", "max_steps = 3"))
    capsys.readouterr()
    code = _cli("train", changed, "--work-dir", paths["work"], "--device", "cpu", "--resume", "auto")
    assert_one_line_error(capsys, code, "rope_scaling was 'linear'")


@pytest.mark.parametrize("recorded", [False, True], ids=["config.json", "tunelab.json"])
def test_a_gguf_of_llama3_scaling_on_another_architecture_is_refused_before_loading(recorded, tmp_path, capsys):
    """llama.cpp reads 'llama3' scaling (a rope_freqs tensor) in its llama architecture only: a qwen2 file holding it
    does not load ("Failed to load model"), so the export refuses it, naming the fix, and writes nothing."""
    from tunelab.export import gguf_convert
    from tunelab.model.tiny import make_model

    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 2.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": CONTEXT}
    base = make_model(tmp_path / "base", "qwen2", max_position_embeddings=CONTEXT,
                      **({} if recorded else {"rope_parameters": llama3}))
    meta = {"rope_scaling": {"rope_parameters": llama3, "max_position_embeddings": 2 * CONTEXT}} if recorded else {}
    config = json.loads((base / "config.json").read_text())
    with pytest.raises(TunelabError, match="RoPE scaling 'llama3' on a qwen2 model.*'yarn' or 'linear'"):
        gguf_convert.check_gguf_rope(config, meta, base)
    if not recorded:
        code = _cli("convert", "gguf", base, tmp_path / "out" / "m.gguf", "--type", "f32")
        assert_one_line_error(capsys, code, "'llama3'", "qwen2")
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_scaling_the_base_cannot_take_stops_the_run_before_the_data_step(tmp_path, capsys):
    """A base that scales its RoPE already: refused before the data is read (here a data file that is not JSON)."""
    from tunelab.model.tiny import make_model

    base = make_model(tmp_path / "base", "llama", max_position_embeddings=CONTEXT,
                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    config = write_config(tmp_path, base, max_length=4 * CONTEXT, rope_scaling="yarn")
    (tmp_path / "identity.json").write_text("not json")
    code = _cli("train", config, "--work-dir", tmp_path / "w", "--device", "cpu")
    assert_one_line_error(capsys, code, "rope_scaling = 'yarn'", "scales RoPE already ('linear'")


def test_the_not_applied_warning_is_said_once_a_run(tmp_path, tiny_llama_dir, caplog):
    config = write_config(tmp_path, tiny_llama_dir, max_length=64, rope_scaling="linear", max_steps=1, dtype="fp32")
    with caplog.at_level(logging.WARNING):
        assert _cli("train", config, "--work-dir", tmp_path / "w", "--device", "cpu") == 0
    assert caplog.text.count("rope_scaling = 'linear' not applied") == 1
    checkpoints = sorted((tmp_path / "w").glob("iter_*"))
    assert checkpoints and "rope_scaling" not in read_meta(checkpoints[-1])  # nothing for chat or merge to put on
