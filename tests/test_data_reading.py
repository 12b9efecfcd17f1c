"""Reading records: robust files, per-message switches, content parts, tool calls, and check-dataset numbers that
agree with each other."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.train_helpers import child_env
from tunelab.cli.main import main
from tunelab.config.schema import TrainConfig
from tunelab.data.dataset import DataStats, build_datasets
from tunelab.data.formats import normalise
from tunelab.data.inspect import length_histogram
from tunelab.data.sources import collect_samples
from tunelab.errors import TunelabError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


def _read(path, **kw):
    stats = DataStats()
    return collect_samples(TrainConfig(data_path=str(path), **kw), stats)[0], stats


def _chat(*turns, **extra):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, **t} if isinstance(t, dict) else {"role": r, "content": t}
                         for r, t in zip(roles, turns)], **extra}


def _count(line: str) -> int:
    return int(re.search(r"(\d+)(  > max_length, [a-z ]+)?$", line).group(1))


# --- files --------------------------------------------------------------------------------------------

def test_jsonl_strings_with_unicode_line_separators_are_one_record(tmp_path):
    texts = ["line\u2028separator", "next\x85line", "para\u2029graph", "form\x0cfeed", "file\x1csep"]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(_chat("q", t), ensure_ascii=False) for t in texts) +
                                      "\r\n", encoding="utf-8")
    samples, stats = _read(tmp_path / "d.jsonl")
    assert [s["messages"][1]["content"] for s in samples] == texts and stats.records_read == 5


@pytest.mark.parametrize("name, content, header", [("d.csv", "hello,world\n", "hello,world"),
                                                  ("d.tsv", "instruction\toutput\n", "instruction\toutput")])
def test_a_table_of_one_line_says_that_line_is_read_as_the_column_names(tmp_path, name, content, header):
    """A .csv without a header row ('hello,world') said only "the file holds no rows"."""
    (tmp_path / name).write_text(content)
    with pytest.raises(TunelabError) as info:
        _read(tmp_path / name)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / name}: no rows: its first line ({header!r}) is read as the column names")
    assert "instruction, input, output" in message and "prompt, chosen, rejected" in message


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "d.jsonl").write_text(json.dumps(_chat("q", "a")) + "\n" + deep + "\n")
    with pytest.raises(TunelabError, match=r"d\.jsonl line 2: the JSON is nested too deeply"):
        _read(tmp_path / "d.jsonl")
    samples, stats = _read(tmp_path / "d.jsonl", skip_invalid=True)
    assert len(samples) == 1 and stats.skipped_invalid == 1
    (tmp_path / "e.json").write_text(deep)
    with pytest.raises(TunelabError, match=r"e\.json: the JSON is nested too deeply"):
        _read(tmp_path / "e.json")


# --- per-message switches -------------------------------------------------------------------------------

@pytest.mark.parametrize("switch", [{"loss": False}, {"loss": "false"}, {"loss_weight": 0}, {"loss_weight": 0.0},
                                    {"weight": 0}])
def test_switches_mark_a_reply_as_context(switch):
    messages = normalise(_chat("q1", {"content": "a1", **switch}, "q2", "a2"), "messages", "r")["messages"]
    assert messages[1]["train"] is False and "train" not in messages[3]


@pytest.mark.parametrize("switch, words", [
    ({"loss_weight": 0.5}, r"messages\[1\]\.loss_weight is 0\.5: tunelab's loss weighs every trained token the "
                           r"same.*Use loss_weight 1 \(trained\) or 0"),
    ({"weight": 2}, r"messages\[1\]\.weight is 2"),
    ({"loss": "maybe"}, r"messages\[1\]\.loss is 'maybe'"),
])
def test_switches_we_cannot_honour_are_errors(tmp_path, switch, words):
    (tmp_path / "d.jsonl").write_text(json.dumps(_chat("q", {"content": "a", **switch})) + "\n")
    with pytest.raises(TunelabError, match=r"d\.jsonl line 1: " + words):
        _read(tmp_path / "d.jsonl")


def test_a_switch_that_trains_a_user_message_is_an_error():
    record = {"messages": [{"role": "user", "content": "q", "loss": True}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(TunelabError, match=r"messages\[0\]\.loss asks to train on a 'user' message"):
        normalise(record, "messages", "r")
    record["messages"][0] = {"role": "user", "content": "q", "loss_weight": 0.0}  # LLaMA-Factory v1 writes this
    assert normalise(record, "messages", "r")["messages"][0] == {"role": "user", "content": "q"}


def test_xtuner_output_with_loss_and_sharegpt_weight():
    conversation = {"conversation": [{"input": "q1", "output": "a1", "output_with_loss": False},
                                     {"input": "q2", "output": "a2"}]}
    assert normalise(conversation, "conversation", "r")["messages"][1]["train"] is False
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "weight": 0},
                                  {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}
    assert [m.get("train", True) for m in normalise(sharegpt, "sharegpt", "r")["messages"]] == [True, False,
                                                                                               True, True]


# --- content and tools ------------------------------------------------------------------------------

def test_openai_text_parts_and_refusal():
    record = _chat([{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
                   {"content": None, "refusal": "I can't help with that."})
    messages = normalise(record, "messages", "r")["messages"]
    assert messages == [{"role": "user", "content": "Hello there"},
                        {"role": "assistant", "content": "I can't help with that."}]


@pytest.mark.parametrize("content, words", [
    ([{"type": "audio_url", "value": "a.mp3"}], r"content\[0\] is a 'audio_url' part.*text and images only"),
    ([{"type": "chart", "value": "x"}], r"content\[0\] has type 'chart'"),
    ([{"type": "text"}], r"content\[0\] has no text"),
])
def test_unknown_content_parts_are_errors(content, words):
    with pytest.raises(TunelabError, match=words):
        normalise(_chat(content, "a"), "messages", "r")


def test_reasoning_on_a_user_message_is_an_error():
    with pytest.raises(TunelabError, match=r"messages\[0\]\.content\[0\] is a 'reasoning' part in a 'user'"):
        normalise(_chat([{"type": "reasoning", "value": "hmm"}], "a"), "messages", "r")


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_a_reasoning_field_on_a_user_message_is_an_error_not_dropped(key):
    """Each name an assistant's reasoning is read under is refused on a user message, never left out unread."""
    record = {"messages": [{"role": "user", "content": "Weather?", key: "hmm"},
                           {"role": "assistant", "content": "Sunny."}]}
    with pytest.raises(TunelabError, match=rf"messages\[0\]\.{key} on a 'user' message"):
        normalise(record, "messages", "r")


def test_a_reply_logged_from_a_server_that_names_its_reasoning_twice_trains_it_once():
    """`tunelab serve` (and vLLM for a while) sends the reasoning as both reasoning_content and reasoning, the same
    text: a conversation logged from it trains that reasoning once, not twice."""
    reply = {"content": "Sunny.", "reasoning_content": "Look outside.", "reasoning": "Look outside."}
    messages = normalise(_chat("Weather?", reply), "messages", "r")["messages"]
    assert messages[1] == {"role": "assistant", "content": "Sunny.", "reasoning_content": "Look outside."}


def test_openai_legacy_functions_and_function_call():
    record = {"messages": [{"role": "user", "content": "Weather?"},
                           {"role": "assistant", "content": None,
                            "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                           {"role": "function", "name": "get_weather", "content": "sunny"},
                           {"role": "assistant", "content": "Sunny."}],
              "functions": [{"name": "get_weather", "parameters": {"type": "object"}}]}
    sample = normalise(record, "messages", "r")
    assert sample["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                  "arguments": {"city": "Paris"}}
    assert sample["messages"][2] == {"role": "tool", "content": "sunny", "name": "get_weather"}
    assert sample["tools"] == [{"type": "function", "function": {"name": "get_weather",
                                                                 "parameters": {"type": "object"}}}]


def test_parallel_sharegpt_calls_and_results_named_in_order():
    record = {"conversations": [
        {"from": "human", "value": "Weather in Paris and Rome?"},
        {"from": "function_call", "value": json.dumps([{"name": "weather", "arguments": {"city": "Paris"}},
                                                        {"name": "time", "arguments": {"city": "Rome"}}])},
        {"from": "observation", "value": "sunny"}, {"from": "observation", "value": "noon"},
        {"from": "gpt", "value": "Sunny in Paris; noon in Rome."}]}
    messages = normalise(record, "sharegpt", "r")["messages"]
    assert [c["function"]["name"] for c in messages[1]["tool_calls"]] == ["weather", "time"]
    assert [m.get("name") for m in messages[2:4]] == ["weather", "time"]


def test_bad_tool_call_json_names_the_field(tmp_path):
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{name: x"},
                                {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "d.json").write_text(json.dumps([record]))
    with pytest.raises(TunelabError, match=r"d\.json record 0: conversations\[1\]\.value is not valid JSON"):
        _read(tmp_path / "d.json")


def test_several_user_messages_in_a_row_are_allowed():
    messages = normalise({"messages": [{"role": "user", "content": "Look:"}, {"role": "user", "content": "this"},
                                       {"role": "assistant", "content": "ok"}]}, "messages", "r")["messages"]
    assert [m["role"] for m in messages] == ["user", "user", "assistant"]


# --- reporting ---------------------------------------------------------------------------------------

def test_data_path_entries_are_checked(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(_chat("q", "a")) + "\n")
    with pytest.raises(TunelabError, match=r"data_path\[0\]: unknown key\(s\) 'placeholder'"):
        collect_samples(TrainConfig(data_path=[{"path": str(tmp_path / "d.jsonl"), "placeholder": {}}]),
                        DataStats())
    with pytest.raises(TunelabError, match=r"'dataset' names datasets of a LLaMA-Factory dataset_info\.json"):
        collect_samples(TrainConfig(data_path=[{"path": str(tmp_path / "d.jsonl"), "dataset": "x"}]), DataStats())


def test_image_placeholders_without_images_and_many_unused_fields_are_reported(tmp_path):
    lines = [{**_chat("<image>\nWhat is this?", "A cat."), **{f"meta{i}": i for i in range(j % 15)}}
             for j in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    warnings = _read(tmp_path / "d.jsonl")[1].reading_warnings()
    assert any("30 samples with <image> but no image" in w and "plain text" in w for w in warnings)
    assert "field 'meta0' not used (28 records" in warnings[0] and "4 more fields not used" in warnings[10]


def test_check_dataset_numbers_agree(tmp_path, tiny_tokenizer_dir, capsys):
    words = "alpha beta gamma delta " * 40
    records = [_chat(f"question {i}", "answer " * (i * 7)) for i in range(1, 25)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n" +
                                      json.dumps({"text": words}) + "\n")
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": words}) + "\n")
    code = main(["check-dataset", str(tmp_path), "--tokenizer", str(tiny_tokenizer_dir), "--template",
                 "qwen_chat", "--max-length", "64"])
    out = capsys.readouterr().out
    assert code == 1  # the text record is of another format than the file's first record: listed, not trained
    cfg = TrainConfig(data_path=str(tmp_path), prompt_template="qwen_chat", max_length=64, skip_invalid=True,
                      pack_to_max_length=False)
    from transformers import AutoTokenizer

    bundle = build_datasets(cfg, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), log=lambda m: None)
    s, lengths = bundle.stats, bundle.sample_lengths
    assert s.encoded == len(lengths) == s.samples + s.dropped + s.untrained
    assert s.truncated + s.dropped == int((lengths > 64).sum()) > 0
    assert s.tokens_before_truncation == int(lengths.sum()) and s.tokens == sum(len(r["input_ids"])
                                                                                 for r in bundle.train_rows)
    histogram = length_histogram(lengths, 64)
    assert sum(_count(line) for line in histogram) == s.encoded
    assert sum(_count(line) for line in histogram if "> max_length" in line) == s.truncated + s.dropped
    assert f"longer than max_length=64: {s.truncated + s.dropped} ({s.truncated} cut there, {s.dropped} dropped" in out
    assert f"samples:             {s.encoded} encoded, {s.samples} kept" in out
    assert f"tokens:              {s.tokens_before_truncation} in the encoded samples, {s.tokens} in the kept" in out
    assert sum(f["truncated"] + f["dropped"] for f in s.files) == s.truncated + s.dropped


def test_length_histogram_edges():
    lines = length_histogram(np.array([10, 20, 64, 65, 200]), 64)
    assert sum(_count(line) for line in lines) == 5
    assert sum(_count(line) for line in lines if "> max_length" in line) == 2
    assert all("> max_length" not in l for l in length_histogram(np.array([5, 5, 5]), 64))


def test_histogram_labels_the_samples_past_max_length_as_what_happened_to_them(tmp_path, tiny_tokenizer_dir, capsys):
    """max_length = 1 keeps no reply: the buckets past it hold dropped samples, not cut ones."""
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(_chat(f"question {i}", "answer " * i)) for i in range(1, 9)))
    code = main(["check-dataset", str(tmp_path / "d.jsonl"), "--tokenizer", str(tiny_tokenizer_dir), "--template",
                 "qwen_chat", "--max-length", "1"])
    out = capsys.readouterr().out
    past = [line for line in out.splitlines() if "> max_length" in line]
    assert code == 1 and "0 cut there, 8 dropped" in out and sum(_count(line) for line in past) == 8
    assert past and all(line.endswith("> max_length, dropped") for line in past)
    lengths = np.array([10, 20, 64, 65, 200])
    flagged = [line for line in length_histogram(lengths, 64, past="cut or dropped") if "> max_length" in line]
    assert flagged and all(line.endswith("> max_length, cut or dropped") for line in flagged)
    assert all(line.endswith("> max_length, cut") for line in length_histogram(lengths, 64) if "> max_length" in line)


def test_check_dataset_without_a_tokenizer_and_closed_pipes(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({**_chat(f"q{i}", "a"), f"x{i}": 1})
                                                for i in range(400)))
    env = child_env()
    done = subprocess.run(f"{sys.executable} -m tunelab check-dataset {tmp_path / 'd.jsonl'} | head -2",
                          shell=True, capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.startswith("file ") and len(done.stdout.splitlines()) == 2
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "tunelab", "check-dataset", str(tmp_path / "d.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "records read:        400" in done.stdout
    assert "pass --tokenizer DIR for token lengths" in done.stdout


def test_check_dataset_on_a_config_whose_model_is_not_here(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text(json.dumps(_chat("q", "a")) + "\n")
    (tmp_path / "cfg.py").write_text("pretrained_model_name_or_path = '/nowhere/model'\ndata_path = 'd.jsonl'\n")
    assert main(["check-dataset", str(tmp_path / "cfg.py")]) == 0
    captured = capsys.readouterr()
    assert "checking the records without token statistics" in captured.err and "records read:        1" in \
        captured.out
