"""check-dataset, preview, preprocess and the self-cognition generator, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_helpers import child_env
from tunelab.cli.main import main
from tunelab.config.schema import TrainConfig
from tunelab.data.dataset import build_datasets
from tunelab.data.self_cognition import generate


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


def _config(tmp_path, model_dir, **extra) -> Path:
    (tmp_path / "data.jsonl").write_text("\n".join(
        json.dumps({"instruction": f"Question {i}", "output": "The quick brown fox. " * (i % 4 + 1)})
        for i in range(30)))
    settings = {"pretrained_model_name_or_path": str(model_dir), "data_path": "data.jsonl",
                "prompt_template": "qwen_chat", "max_length": 40, **extra}
    path = tmp_path / "cfg.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return path


def test_check_dataset_reports_counts_and_histogram(tmp_path, tiny_tokenizer_dir, capsys):
    cfg = _config(tmp_path, tiny_tokenizer_dir)
    with (tmp_path / "data.jsonl").open("a") as f:
        f.write("\n" + json.dumps({"instruction": "x"}) + "\n{oops\n")
    code = main(["check-dataset", str(cfg)])
    out = capsys.readouterr().out
    assert code == 1
    assert "records read:        32" in out and "invalid records:     2" in out
    assert "line 31: missing field 'output'" in out and "line 32: not valid JSON" in out
    assert "longer than max_length=40:" in out and "token lengths before truncation" in out and "#" in out


def test_check_dataset_counts_the_rows_training_packs(tmp_path, tiny_tokenizer_dir, capsys):
    cfg = _config(tmp_path, tiny_tokenizer_dir, max_length=128, shuffle_before_pack=False)
    assert main(["check-dataset", str(cfg)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("packing:"))
    train_cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_tokenizer_dir),
                            data_path=str(tmp_path / "data.jsonl"), prompt_template="qwen_chat", max_length=128,
                            shuffle_before_pack=False)
    from transformers import AutoTokenizer

    stats = build_datasets(train_cfg, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), log=lambda m: None).stats
    assert line.startswith(f"packing: about {stats.rows} rows of 128 tokens, ")
    assert f"{stats.tokens / (stats.rows * 128):.1%} full" in line


def test_check_dataset_on_a_data_file(tmp_path, tiny_tokenizer_dir, capsys):
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}] * 5))
    code = main(["check-dataset", str(tmp_path / "d.json"), "--format", "alpaca", "--tokenizer",
                 str(tiny_tokenizer_dir), "--template", "llama3_chat", "--max-length", "512"])
    out = capsys.readouterr().out
    assert code == 0 and "OK: every record is valid" in out and "d.json: records 5, format alpaca (5)" in out


def test_preview_marks_trained_tokens(tmp_path, tiny_tokenizer_dir, capsys):
    cfg = _config(tmp_path, tiny_tokenizer_dir, max_length=2048)
    assert main(["preview", str(cfg), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    assert "<|im_start|>user\nQuestion 0<|im_end|>\n<|im_start|>assistant\n⟦The quick brown fox. <|im_end|>⟧" in out


def test_preview_in_colour(tmp_path, tiny_tokenizer_dir, capsys):
    cfg = _config(tmp_path, tiny_tokenizer_dir)
    assert main(["preview", str(cfg), "-n", "1", "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" in out and "⟦" not in out and "The quick brown fox." in out


def test_preprocess_fills_the_cache_train_reuses_it(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, capsys):
    cfg_path = _config(tmp_path, tiny_tokenizer_dir)
    assert main(["preprocess", str(cfg_path), "--num-proc", "2"]) == 0
    assert "cached at" in capsys.readouterr().out
    from tunelab.config.loader import load_config
    from tunelab.model.tokenizer import load_tokenizer

    cfg = load_config(cfg_path)
    bundle = build_datasets(cfg, load_tokenizer(cfg.pretrained_model_name_or_path), config_dir=str(tmp_path),
                            log=lambda m: None)
    assert bundle.stats.from_cache and bundle.stats.samples == 30


def test_self_cognition_is_varied_and_trains(tmp_path, tiny_tokenizer):
    records = generate("TuneBot", "Alice", n=200)
    questions = {r["conversation"][0]["input"] for r in records}
    answers = {r["conversation"][0]["output"] for r in records}
    assert len(questions) > 40 and len(answers) >= 10
    assert all("TuneBot" in a and "Alice" in a for a in answers)
    assert any("你" in q for q in questions) and any("you" in q for q in questions)
    out = tmp_path / "self.json"
    assert main(["data", "self-cognition", "--name", "TuneBot", "--author", "Alice", "--n", "50", "-o", str(out)]) == 0
    cfg = TrainConfig(data_path=str(out), prompt_template="qwen_chat", max_length=256)
    stats = build_datasets(cfg, tiny_tokenizer, log=lambda m: None).stats
    assert stats.samples == 50 and stats.sources[0]["format"] == "conversation"


def test_subprocess_help_and_generate(tmp_path):
    env = child_env()
    out = tmp_path / "s.json"
    done = subprocess.run([sys.executable, "-m", "tunelab", "data", "self-cognition", "--name", "N", "--author", "A",
                           "--n", "10", "-o", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(out.read_text())) == 10
    helped = subprocess.run([sys.executable, "-m", "tunelab", "check-dataset", "--help"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert "example:" in helped.stdout


def test_cfg_options_apply_to_a_data_file_as_to_a_config(tmp_path, tiny_tokenizer_dir, capsys):
    # --cfg-options on a data file were dropped without a word: the preview showed no SYSTEM, check-dataset no
    # effect of skip_invalid or max_length given that way
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "Good", "rejected": "Bad"}) + "\n")
    flags = ["--tokenizer", str(tiny_tokenizer_dir), "--template", "qwen_chat", "--objective", "dpo"]
    assert main(["preview", str(path), *flags, "--color", "never", "--cfg-options", "SYSTEM=Be brief."]) == 0
    assert capsys.readouterr().out.count("Be brief.") == 2
    assert main(["check-dataset", str(path), *flags, "--cfg-options", "max_length=9"]) == 1
    assert "longer than max_length=9" in capsys.readouterr().out
    assert main(["check-dataset", str(path), *flags, "--cfg-options", "max_lenght=9"]) == 2
    assert "unknown setting 'max_lenght'" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["check-dataset", "preview"])
def test_a_llamafactory_training_yaml_names_our_settings_for_its_keys(verb, tmp_path, capsys):
    # `tunelab check-dataset x.yaml` on a LLaMA-Factory training config answered "unknown file type '.yaml'": it
    # says what `tunelab train x.yaml` says, tunelab's setting for each of its keys
    from tests.train_helpers import assert_one_line_error

    path = tmp_path / "qwen_lora_sft.yaml"
    path.write_text("model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct\nstage: sft\nfinetuning_type: lora\n"
                    "dataset: identity\ndataset_dir: data\ntemplate: qwen\nlearning_rate: 1.0e-4\n")
    assert_one_line_error(capsys, main([verb, str(path)]), "LLaMA-Factory", "tunelab copy-cfg",
                          "learning_rate → lr", "template: qwen → prompt_template = 'qwen2_5_chat'",
                          "data_path = [{'path': 'data/dataset_info.json', 'dataset': 'identity'}]")
    # any other YAML is not a data file tunelab reads, as before
    other = tmp_path / "notes.yaml"
    other.write_text("a: 1\n")
    assert_one_line_error(capsys, main(["check-dataset", str(other)]), "unknown file type '.yaml'")


def test_one_packed_row_is_counted_in_the_singular(tmp_path, tiny_tokenizer_dir, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "Good", "rejected": "Bad"}) + "\n")
    assert main(["check-dataset", str(path), "--tokenizer", str(tiny_tokenizer_dir), "--template", "qwen_chat",
                 "--objective", "dpo"]) == 0
    assert "packing: about 1 row of 4096 tokens, " in capsys.readouterr().out
