"""Plausible user mistakes and accidents that used to end in a bare traceback, or silently do the wrong thing."""

from __future__ import annotations

import json

import pytest

from tunelab.cli.main import main
from tunelab.config.schema import TrainConfig
from tunelab.data.dataset import build_datasets
from tunelab.errors import TunelabError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


def test_train_with_a_non_number_nproc_per_node_names_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = tmp_path / "c.py"
    cfg.write_text("method = 'lora'\n")
    assert main(["train", str(cfg), "--nproc-per-node", "two"]) == 2
    assert "--nproc-per-node = 'two': expected a whole number" in capsys.readouterr().err


def test_resume_survives_a_log_line_cut_short_by_a_crash(tmp_path):
    from tunelab.train.progress import TrainingMonitor, read_log

    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 1.5}) + "\n"
                   + '{"step": 3, "lo')  # killed mid-write
    monitor = TrainingMonitor(tmp_path, total_steps=4, start_step=2)
    monitor.write({"step": 3, "loss": 1.2})
    monitor.close()
    assert [r["step"] for r in read_log(log)] == [1, 2, 3]
    assert all(json.loads(line) for line in log.read_text().splitlines())  # the torn line is gone


def test_plan_on_a_config_without_llama_fields_names_the_missing_key(tmp_path):
    from tunelab.model.memory import model_shape

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "num_layers": 2, "hidden_size": 8,
                                                      "padded_vocab_size": 10, "ffn_hidden_size": 16}))
    with pytest.raises(TunelabError, match=r"config\.json: no 'num_attention_heads', so `plan` cannot tell"):
        model_shape(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(TunelabError, match=r"config\.json: not valid JSON"):
        model_shape(str(tmp_path))


def _fake_adapter(directory):
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}))
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


def test_merge_refuses_to_write_over_its_local_base_model(tmp_path):
    from tunelab.export.convert import merge

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    adapter = _fake_adapter(tmp_path / "adapter")
    with pytest.raises(TunelabError, match="is the input"):
        merge(str(base), str(adapter), str(base), device="cpu")
    assert (base / "config.json").read_text() == "{}"


def test_broken_tunelab_json_names_the_file(tmp_path):
    from tunelab.train.layout import read_meta

    (tmp_path / "tunelab.json").write_text('{"base_model": ')
    with pytest.raises(TunelabError, match=r"tunelab\.json: not valid JSON"):
        read_meta(tmp_path)


def test_skip_invalid_skips_a_first_record_whose_format_cannot_be_told(tmp_path, tiny_tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join([json.dumps({"foo": 1}),
                               json.dumps({"instruction": "Hi", "output": "Hello"}),
                               json.dumps({"instruction": "Bye", "output": "See you"})]) + "\n")
    cfg = TrainConfig(data_path=str(data), prompt_template="qwen_chat", max_length=128, skip_invalid=True,
                      pack_to_max_length=False)
    bundle = build_datasets(cfg, tiny_tokenizer, log=lambda m: None)
    assert bundle.stats.skipped_invalid == 1 and bundle.stats.samples == 2
    assert "line 1: cannot tell the data format" in bundle.stats.invalid[0]
    assert bundle.stats.sources[0]["format"] == "alpaca"


@pytest.mark.parametrize("flag, value, expected", [
    ("--top-p", "0", "--top-p 0.0: must be above 0 and at most 1"),
    ("--temperature", "-1", "--temperature -1.0: must be 0 (greedy) or more"),
    ("--repetition-penalty", "0", "--repetition-penalty 0.0: must be above 0"),
])
def test_chat_rejects_sampling_settings_out_of_range_before_loading(tmp_path, capsys, flag, value, expected):
    assert main(["chat", str(tmp_path / "no_model"), flag, value, "--prompt", "hi"]) == 2
    assert expected in capsys.readouterr().err


def test_a_device_name_that_is_not_one_is_a_tunelab_error():
    from tunelab.model.load import check_device

    with pytest.raises(TunelabError, match="'gpu': not a device name; use cpu, cuda or cuda:N"):
        check_device("gpu")


def test_a_raw_deepspeed_checkpoint_says_how_to_read_it(tmp_path):
    from tunelab.train.layout import resolve_checkpoint

    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(TunelabError, match="raw deepspeed checkpoint.*load_consolidated_state_dict"):
        resolve_checkpoint(tmp_path)
