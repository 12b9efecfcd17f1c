"""Every data format and source kind becomes the same trained text; mixing, relative paths and the cache."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tunelab.config.schema import TrainConfig
from tunelab.data.dataset import build_datasets
from tunelab.data.formats import normalise

QA = ("What is the capital of China?", "Beijing is the capital.")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


def _cfg(path, **kw):
    return TrainConfig(**{"data_path": str(path), "prompt_template": "qwen_chat", "max_length": 256,
                          "pack_to_max_length": False, **kw})


def _texts(bundle, tokenizer):
    """(full text, trained text) of each row."""
    out = []
    for row in bundle.train_rows:
        trained = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
        out.append((tokenizer.decode(row["input_ids"]), tokenizer.decode(trained)))
    return out


RECORDS = {
    "alpaca": {"instruction": QA[0], "input": "", "output": QA[1]},
    "messages": {"messages": [{"role": "user", "content": QA[0]}, {"role": "assistant", "content": QA[1]}]},
    "sharegpt": {"conversations": [{"from": "human", "value": QA[0]}, {"from": "gpt", "value": QA[1]}]},
    "conversation": {"conversation": [{"input": QA[0], "output": QA[1]}]},
}


@pytest.mark.parametrize("fmt", sorted(RECORDS))
@pytest.mark.parametrize("declared", ["auto", "explicit"])
def test_chat_formats_train_on_the_answer(tmp_path, tiny_tokenizer, fmt, declared):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[fmt]) + "\n")
    bundle = build_datasets(_cfg(path, data_format=fmt if declared == "explicit" else "auto"), tiny_tokenizer,
                            log=lambda m: None)
    assert _texts(bundle, tiny_tokenizer) == [(
        f"<|im_start|>user\n{QA[0]}<|im_end|>\n<|im_start|>assistant\n{QA[1]}<|im_end|>\n", f"{QA[1]}<|im_end|>")]
    assert bundle.stats.sources[0]["format"] == fmt


def test_multi_turn_system_and_cfg_system(tmp_path, tiny_tokenizer):
    records = [{"conversation": [{"system": "Be brief.", "input": "Hi", "output": "Hello!"},
                                 {"input": "Who are you?", "output": "An assistant."}]},
               {"instruction": "Hi", "output": "Hello!"}]
    (tmp_path / "a.json").write_text(json.dumps(records[:1]))
    (tmp_path / "b.json").write_text(json.dumps(records[1:]))
    cfg = _cfg(tmp_path, SYSTEM="You are tunelab.")  # a directory of files, two formats
    texts = _texts(build_datasets(cfg, tiny_tokenizer, log=lambda m: None), tiny_tokenizer)
    assert texts[0][0].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert texts[0][1] == "Hello!<|im_end|>An assistant.<|im_end|>"
    assert texts[1][0].startswith("<|im_start|>system\nYou are tunelab.<|im_end|>")


def test_alpaca_input_is_appended_to_instruction(tmp_path, tiny_tokenizer):
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "Translate", "input": "Hello", "output": "Bonjour"}]))
    full, _ = _texts(build_datasets(_cfg(tmp_path / "d.json"), tiny_tokenizer, log=lambda m: None), tiny_tokenizer)[0]
    assert "user\nTranslate\nHello<|im_end|>" in full


def test_text_pretraining_trains_every_token(tmp_path, tiny_tokenizer):
    (tmp_path / "corpus.txt").write_text("The quick brown fox.\n\nHello world.\n")
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "Beijing is the capital."}) + "\n")
    bundle = build_datasets(_cfg(tmp_path), tiny_tokenizer, log=lambda m: None)
    texts = sorted(_texts(bundle, tiny_tokenizer))
    assert [t[0] for t in texts] == ["<s>Beijing is the capital.</s>", "<s>Hello world.</s>",
                                     "<s>The quick brown fox.</s>"]
    assert all(full[len("<s>"):] == trained for full, trained in texts)  # all but the first token


def test_agent_tool_results_are_not_trained(tmp_path, tiny_tokenizer):
    openai_style = {"messages": [
        {"role": "system", "content": "Tools: get_weather(city)"},
        {"role": "user", "content": "Weather in Beijing?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Beijing\"}"}}]},
        {"role": "tool", "content": "sunny, 25C"},
        {"role": "assistant", "content": "It is sunny."}]}
    ms_agent = {"conversations": [
        {"from": "system", "value": "You can call tools."}, {"from": "user", "value": "Weather?"},
        {"from": "assistant", "value": "Calling.<|startofexec|>sunny<|endofexec|>It is sunny."}]}
    (tmp_path / "a.jsonl").write_text(json.dumps(openai_style) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(ms_agent) + "\n")
    # a template that writes tool calls (plain ChatML has no way to: see test_data_reporting)
    bundle = build_datasets(_cfg(tmp_path / "a.jsonl", prompt_template="qwen2_5_chat"), tiny_tokenizer,
                            log=lambda m: None)
    assert bundle.stats.sources[0]["format"] == "agent"
    (full1, trained1), = _texts(bundle, tiny_tokenizer)
    assert "sunny, 25C" in full1 and "25C" not in trained1 and trained1.endswith("It is sunny.<|im_end|>")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Beijing"}}\n</tool_call>' in trained1
    bundle = build_datasets(_cfg(tmp_path / "b.jsonl"), tiny_tokenizer, log=lambda m: None)
    (full2, trained2), = _texts(bundle, tiny_tokenizer)
    assert "<|im_start|>tool\nsunny<|im_end|>" in full2 and trained2 == "Calling.<|im_end|>It is sunny.<|im_end|>"
    # the call reaches the template as a structured tool call (rendered in the template's own tool format)
    call = normalise(openai_style, "agent", "a.jsonl line 1")["messages"][2]
    assert call["tool_calls"] == [{"type": "function", "function": {"name": "get_weather",
                                                                    "arguments": {"city": "Beijing"}}}]


def test_parquet_csv_and_saved_datasets(tmp_path, tiny_tokenizer):
    import datasets
    import pandas as pd

    frame = pd.DataFrame([RECORDS["alpaca"]] * 3)
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    for path in ("d.parquet", "d.csv", "saved"):
        bundle = build_datasets(_cfg(tmp_path / path), tiny_tokenizer, log=lambda m: None)
        assert bundle.stats.samples == 3 and _texts(bundle, tiny_tokenizer)[0][1] == QA[1] + "<|im_end|>", path


def test_mixing_with_ratios_and_relative_paths(tmp_path, tiny_tokenizer, monkeypatch):
    conf = tmp_path / "configs"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "self.json").write_text(json.dumps([{"instruction": f"q{i}", "output": "me"} for i in range(20)]))
    (conf / "data" / "general.jsonl").write_text(
        "\n".join(json.dumps({"instruction": f"g{i}", "output": "gen"}) for i in range(10)))
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("", data_path=[{"path": "data/self.json", "ratio": 0.5}, {"path": "data/general.jsonl", "ratio": 2}])
    bundle = build_datasets(cfg, tiny_tokenizer, config_dir=str(conf), log=lambda m: None)
    trained = [t for _, t in _texts(bundle, tiny_tokenizer)]
    assert trained.count("me<|im_end|>") == 10 and trained.count("gen<|im_end|>") == 20
    assert [s["samples"] for s in bundle.stats.sources] == [10, 20]


def test_eval_split_is_held_out(tmp_path, tiny_tokenizer):
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]))
    bundle = build_datasets(_cfg(tmp_path / "d.json", eval_split_ratio=0.1), tiny_tokenizer, log=lambda m: None)
    assert (bundle.stats.samples, bundle.stats.eval_samples, len(bundle.eval_rows)) == (36, 4, 4)
    train = {tuple(r["input_ids"]) for r in bundle.train_rows}
    assert not train & {tuple(r["input_ids"]) for r in bundle.eval_rows}


def test_eval_split_with_too_few_samples_to_hold_one_out_is_warned_of(tmp_path, tiny_tokenizer):
    """One sample cannot be split (it stays for training): the warning names eval_split_ratio and the count, from the
    cache too, instead of a bare '0 eval samples' in the summary."""
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    for cached in (False, True):
        logged = []
        cfg = _cfg(tmp_path / "d.json", eval_split_ratio=0.2)
        bundle = build_datasets(cfg, tiny_tokenizer, log=logged.append)
        assert bundle.stats.from_cache is cached and (bundle.stats.samples, bundle.stats.eval_samples) == (1, 0)
        warning = [m for m in logged if "eval_split_ratio" in m]
        assert len(warning) == 1 and warning[0].startswith("data: warning: eval_split_ratio = 0.2 holds out nothing")
        assert "1 training sample" in warning[0] and "set eval_split_ratio = 0" in warning[0]
        assert [w for w in bundle.stats.warnings(cfg) if "eval_split_ratio" in w]  # with the stats, as the run says
    logged = []
    build_datasets(_cfg(tmp_path / "d.json"), tiny_tokenizer, log=logged.append)  # no split asked: no warning
    assert not any("eval_split_ratio" in m for m in logged)


def test_cache_reused_and_invalidated(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(2000)))
    cfg = _cfg(path, pack_to_max_length=True)
    first = build_datasets(cfg, tiny_tokenizer, log=lambda m: None)
    second = build_datasets(cfg, tiny_tokenizer, log=lambda m: None)
    assert second.stats.from_cache  # read back, not tokenised again (a timing here would flake on a slow machine)
    assert [r["input_ids"] for r in second.train_rows] == [r["input_ids"] for r in first.train_rows]
    assert not build_datasets(replace(cfg, max_length=128), tiny_tokenizer, log=lambda m: None).stats.from_cache
    assert not build_datasets(replace(cfg, prompt_template="llama3_chat"), tiny_tokenizer,
                              log=lambda m: None).stats.from_cache
    path.write_text(json.dumps({"instruction": "changed", "output": "a"}))
    changed = build_datasets(cfg, tiny_tokenizer, log=lambda m: None)
    assert not changed.stats.from_cache and changed.stats.samples == 1


def test_dataset_map_fn_converts_custom_records(tmp_path, tiny_tokenizer):
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": QA[0], "a": QA[1]}) + "\n" + json.dumps({"q": "skip"}))

    def to_alpaca(rec):
        return {"instruction": rec["q"], "output": rec["a"]} if "a" in rec else None

    bundle = build_datasets(_cfg(tmp_path / "d.jsonl", dataset_map_fn=to_alpaca), tiny_tokenizer, log=lambda m: None)
    assert [t for _, t in _texts(bundle, tiny_tokenizer)] == [QA[1] + "<|im_end|>"]


def test_preprocess_with_several_processes_matches_one(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": "a " * (i % 9)}) for i in range(2500)))
    one = build_datasets(_cfg(path), tiny_tokenizer, log=lambda m: None, use_cache=False)
    two = build_datasets(_cfg(path), tiny_tokenizer, log=lambda m: None, use_cache=False, num_proc=2)
    assert [r["input_ids"] for r in one.train_rows] == [r["input_ids"] for r in two.train_rows]
    assert [r["labels"] for r in one.train_rows] == [r["labels"] for r in two.train_rows]
