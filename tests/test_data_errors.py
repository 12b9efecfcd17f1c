"""Bad input: every mistake is a TunelabError naming the file, line/record and field, with a fix."""

from __future__ import annotations

import json
import os

import pytest

from tunelab.cli.main import main
from tunelab.config.schema import TrainConfig
from tunelab.data.dataset import build_datasets
from tunelab.errors import TunelabError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


def _build(path, tokenizer, **kw):
    cfg = TrainConfig(**{"data_path": str(path), "prompt_template": "qwen_chat", "max_length": 128, **kw})
    return build_datasets(cfg, tokenizer, log=lambda m: None)


GOOD = json.dumps({"instruction": "Hi", "output": "Hello"})


@pytest.mark.parametrize("content, fmt, expected", [
    (GOOD + "\n{\"instruction\": \"Hi\", \"output\": \n" + GOOD, "auto", r"d\.jsonl line 2: not valid JSON"),
    (GOOD + "\n" + json.dumps({"instrution": "Hi", "output": "x"}), "auto",
     r"d\.jsonl line 2: missing field 'instruction'.*Did you mean to call 'instrution' 'instruction'"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}), "auto",
     r"line 1: message 0 is 'assistant' but system or user should come first"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "auto",
     r"line 1: the conversation does not end with an assistant reply"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}), "alpaca",
     r"line 1: missing field 'instruction'.*looks like the 'messages' format.*a file holds one format"
     r".*set data_format='messages'"),
    (json.dumps({"conversations": [{"from": "robot", "value": "x"}]}), "auto",
     r"line 1: conversations\[0\]\.from is 'robot'"),
    (json.dumps({"question": "x", "answer": "y"}), "auto", r"line 1: cannot tell the data format.*'question'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                 "tools": "not json"}), "auto",
     r"line 1: tools is not valid JSON.*e\.g\. \[\{\"type\": \"function\", \"function\""),  # definitions, not a call
    # a result answering no call: it was given the name of the call in its place, and trained so
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "1"}, {"role": "assistant", "content": "y"}]}), "auto",
     r"line 1: a tool result's tool_call_id 'c2' answers none of the calls before it \('c1'\).*id of the call"),
    # a tool result as a JSON object: 'messages[2].content[0] has type None'
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": {"t": 20}}, {"role": "assistant", "content": "y"}]}), "auto",
     r"line 1: messages\[2\]\.content is a JSON object, not text.*\{\\\"t\\\": 20\}"),
    # OpenAI's free-form "custom" tool call, which a template of function calls writes nowhere: it was 'has no
    # function name'
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "custom", "custom": {"name": "grep", "input": "todo"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"}, {"role": "assistant", "content": "y"}]}), "auto",
     r"line 1: reply 1's tool_calls\[0\] is a free-form \(custom\) call to 'grep', which template 'qwen_chat' does "
     r"not write\. Templates with a place for free-form calls: .*internlm2_chat \('interpreter'\).*\"function\" call"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "custom", "custom": {"name": "grep", "input": ["todo"]}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"}, {"role": "assistant", "content": "y"}]}), "auto",
     r"line 1: messages\[1\]\.tool_calls\[0\]\.custom\.input should be text, found list"),
    # a history that is one number, not a list of pairs: "TypeError: 'int' object is not iterable" before
    (json.dumps({"instruction": "Hi", "output": "x", "history": 3}), "auto",
     r"line 1: 'history' should be a list of \[question, answer\] pairs, found int"),
    # a number longer than Python reads (4300 digits): json's ValueError came out as a traceback
    ('{"instruction": "Hi", "output": "x", "id": 1' + "0" * 5000 + "}", "auto",
     r"d\.jsonl line 1: a number of 5001 digits, more than Python reads from JSON \(4300\).*quotes"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"n": 1' + "0" * 5000 + "}"}}]},
        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "y"}]}), "auto",
     r"line 1: messages\[1\]\.tool_calls\[0\] arguments: a number of 5001 digits, more than Python reads"),
    ("", "auto", r"d\.jsonl: the file is empty"),
    # one JSON list, on one line or pretty-printed, named .jsonl
    (json.dumps([json.loads(GOOD)] * 3), "auto", r"d\.jsonl line 1: the line holds a list of 3 records.*rename it to "
     r"\.json"),
    (json.dumps([json.loads(GOOD)] * 3, indent=2), "auto", r"d\.jsonl: the file is one JSON document spread over "
     r"several lines.*rename it to \.json"),
])
def test_bad_jsonl_records_name_line_and_field(tmp_path, tiny_tokenizer, content, fmt, expected):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(TunelabError, match=expected):
        _build(tmp_path / "d.jsonl", tiny_tokenizer, data_format=fmt)


_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}


@pytest.mark.parametrize("record, counts", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [_CALL]},
                   {"role": "tool", "content": "18C"}, {"role": "tool", "content": "Sunny, light wind"},
                   {"role": "assistant", "content": "y"}]}, r"makes 1 tool call \(get_weather\) and 2 tool results"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [dict(_CALL, id="c1")]},
                   {"role": "tool", "tool_call_id": "c1", "content": "18C"},
                   {"role": "tool", "tool_call_id": "c1", "content": "Sunny, light wind"},
                   {"role": "assistant", "content": "y"}]}, r"makes 1 tool call \(get_weather\) and 2 tool results"),
    ({"conversations": [{"from": "human", "value": "x"},  # LLaMA-Factory's glaive shape, an observation too many
                        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {}},
                                                                       {"name": "get_time", "arguments": {}}])},
                        {"from": "observation", "value": "18C"}, {"from": "observation", "value": "12:00"},
                        {"from": "observation", "value": "Sunny, light wind"}, {"from": "gpt", "value": "y"}]},
     r"makes 2 tool calls \(get_weather, get_time\) and 3 tool results follow it: result 3"),
])
def test_a_tool_result_past_the_calls_of_its_reply_is_an_invalid_record(tmp_path, tiny_tokenizer, record, counts):
    # the extra result answered no call: it trained as an answer without a function name (Mistral numbered it as a
    # call never made)
    good = {"conversations": [{"from": "human", "value": "fine"}, {"from": "gpt", "value": "ok"}]} \
        if "conversations" in record else {"messages": [{"role": "user", "content": "fine"},
                                                        {"role": "assistant", "content": "ok"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(TunelabError, match=r"^\S*d\.jsonl line 2: an assistant reply " + counts +
                       r".*\('Sunny, light wind'\) answers no call\. Give each call one result: remove the extra "
                       r"result, or add the call it answers to the reply\."):
        _build(tmp_path / "d.jsonl", tiny_tokenizer, prompt_template="qwen2_5_chat")
    stats = _build(tmp_path / "d.jsonl", tiny_tokenizer, prompt_template="qwen2_5_chat", skip_invalid=True).stats
    assert stats.skipped_invalid == 1 and stats.samples == 1


def test_tool_results_after_a_reply_without_structured_calls_read_as_written():
    # a ReAct reply holds its call in its text: the result answers it, with no function to name
    from tunelab.data.formats import normalise

    record = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "Action: get_weather"},
                                {"from": "observation", "value": "18C"}, {"from": "gpt", "value": "y"}]}
    assert normalise(record, "sharegpt", "r")["messages"][2] == {"role": "tool", "content": "18C"}


def test_bad_json_file_names_line_and_column(tmp_path, tiny_tokenizer):
    (tmp_path / "d.json").write_text('[\n {"instruction": "Hi", "output": "x"},\n {"instruction": "Hi" "output": 1}\n]')
    with pytest.raises(TunelabError, match=r"d\.json line 3 column .*not valid JSON"):
        _build(tmp_path / "d.json", tiny_tokenizer)
    (tmp_path / "e.json").write_text(json.dumps([{"instruction": "Hi", "output": 3}]))
    with pytest.raises(TunelabError, match=r"e\.json record 0: field 'output' should be text"):
        _build(tmp_path / "e.json", tiny_tokenizer)


def test_non_utf8_bytes(tmp_path, tiny_tokenizer):
    (tmp_path / "d.jsonl").write_bytes((GOOD + "\n").encode() + '{"instruction": "你好", "output": "x"}'.encode("gbk"))
    with pytest.raises(TunelabError, match=r"d\.jsonl line 2: bytes that are not UTF-8.*iconv"):
        _build(tmp_path / "d.jsonl", tiny_tokenizer)


def test_a_non_utf8_line_is_an_invalid_record(tmp_path, tiny_tokenizer):
    """One line of other bytes in a UTF-8 .jsonl (a record pasted from a Latin-1 or GBK file) is that line's invalid
    record: skip_invalid skips it and check-dataset lists it with the other bad records, as docs/DATA.md says."""
    from tunelab.data.inspect import check_dataset

    (tmp_path / "d.jsonl").write_bytes("\n".join([GOOD, "{broken", GOOD]).encode() + b"\n"
                                      + '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1") + b"\n"
                                      + GOOD.encode())
    stats = _build(tmp_path / "d.jsonl", tiny_tokenizer, skip_invalid=True).stats
    assert (stats.records_read, stats.skipped_invalid, stats.samples) == (5, 2, 3)
    assert "line 4: bytes that are not UTF-8" in stats.invalid[1] and "iconv" in stats.invalid[1]
    cfg = TrainConfig(data_path=str(tmp_path / "d.jsonl"), prompt_template="qwen_chat", max_length=128)
    lines: list[str] = []
    stats = check_dataset(cfg, tiny_tokenizer, out=lines.append)
    assert stats.skipped_invalid == 2 and "d.jsonl line 4: bytes that are not UTF-8" in "\n".join(lines)


def test_utf16_with_its_byte_order_mark_is_read(tmp_path, tiny_tokenizer):
    """What Windows editors save as "Unicode": read as the same samples as UTF-8."""
    text = GOOD + "\n" + json.dumps({"instruction": "你好", "output": "x"}, ensure_ascii=False) + "\n"
    (tmp_path / "u8.jsonl").write_text(text, encoding="utf-8")
    (tmp_path / "u16.jsonl").write_bytes(text.encode("utf-16"))  # with the BOM, little-endian here
    (tmp_path / "u16be.jsonl").write_bytes(b"\xfe\xff" + text.encode("utf-16-be"))
    bundles = [_build(tmp_path / name, tiny_tokenizer) for name in ("u8.jsonl", "u16.jsonl", "u16be.jsonl")]
    assert [b.stats.samples for b in bundles] == [2, 2, 2]
    ids = [[r["input_ids"] for r in b.train_rows] for b in bundles]
    assert ids[0] == ids[1] == ids[2]


def test_missing_path_and_bad_mix_entry(tmp_path, tiny_tokenizer):
    with pytest.raises(TunelabError, match="not found"):
        _build(tmp_path / "nope.json", tiny_tokenizer)
    with pytest.raises(TunelabError, match=r"data_path\[0\].*ratio"):
        _build("", tiny_tokenizer, data_path=[{"path": str(tmp_path), "ratio": 0}])


def test_missing_relative_path_names_each_place_once(tmp_path, tiny_tokenizer, monkeypatch):
    """A config in the current folder naming a missing data/x.jsonl: the one place looked at, as a full path."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(data_path="data/nope.jsonl", prompt_template="qwen_chat", max_length=128)
    with pytest.raises(TunelabError) as info:
        build_datasets(cfg, tiny_tokenizer, config_dir=".", log=lambda m: None)
    assert f"(looked at {tmp_path / 'data' / 'nope.jsonl'})" in str(info.value)
    (tmp_path / "cfgs").mkdir()
    with pytest.raises(TunelabError) as info:  # a config elsewhere: its folder first, then the current one
        build_datasets(cfg, tiny_tokenizer, config_dir="cfgs", log=lambda m: None)
    assert (f"(looked at {tmp_path / 'cfgs' / 'data' / 'nope.jsonl'} and {tmp_path / 'data' / 'nope.jsonl'})"
            in str(info.value))


@pytest.mark.parametrize("make, kind", [(lambda tmp: "/dev/null", "a character device"),
                                         (lambda tmp: os.mkfifo(tmp / "pipe") or tmp / "pipe", "a named pipe")],
                         ids=["dev-null", "fifo"])
def test_check_dataset_on_a_device_or_pipe_says_what_it_is_not_a_directory(tmp_path, capsys, make, kind):
    """/dev/null and a FIFO were called "the directory holds no data file"."""
    path = make(tmp_path)
    code = main(["check-dataset", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}: {kind}, not a regular file or a folder" in err and "directory" not in err
    assert "Save the data to a file" in err


def test_skip_invalid_counts_and_reports(tmp_path, tiny_tokenizer):
    lines = [GOOD, "{broken", json.dumps({"instruction": "Hi"}), GOOD]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    stats = _build(tmp_path / "d.jsonl", tiny_tokenizer, skip_invalid=True).stats
    assert (stats.records_read, stats.skipped_invalid, stats.samples) == (4, 2, 2)
    assert "line 2" in stats.invalid[0] and "line 3" in stats.invalid[1] and "'output'" in stats.invalid[1]


def test_cli_prints_error_without_traceback(tmp_path, tiny_tokenizer_dir, capsys):
    (tmp_path / "d.jsonl").write_text(GOOD + "\n" + json.dumps({"instruction": "Hi", "outptu": "x"}))
    code = main(["preview", str(tmp_path / "d.jsonl"), "--tokenizer", str(tiny_tokenizer_dir), "--template",
                 "qwen_chat", "-n", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "d.jsonl line 2" in err and "'output'" in err and "Traceback" not in err


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


def test_a_system_prompt_that_fills_max_length_is_named_with_its_token_count(tmp_path, tiny_tokenizer):
    """SYSTEM longer than max_length leaves no room for a reply in any sample that gets it: the error (and
    check-dataset's verdict) names SYSTEM and its tokens, not only 'Raise max_length'; where other samples bring their
    own system prompt and train, the dropped ones are warned of with the same cause."""
    from tunelab.data.inspect import check_dataset

    system = "You are a careful assistant who answers every question in full sentences. " * 4
    n_system = len(tiny_tokenizer(system, add_special_tokens=False)["input_ids"])
    (tmp_path / "d.jsonl").write_text("\n".join([GOOD] * 3))
    with pytest.raises(TunelabError) as info:
        _build(tmp_path / "d.jsonl", tiny_tokenizer, SYSTEM=system, max_length=32)
    message = str(info.value)
    assert f"SYSTEM (the config's system prompt, given to the 3 samples that start with it) is {n_system} tokens" \
        in message and "max_length = 32" in message and "Shorten SYSTEM" in message
    lines: list[str] = []
    cfg = TrainConfig(data_path=str(tmp_path / "d.jsonl"), prompt_template="qwen_chat", max_length=32, SYSTEM=system)
    check_dataset(cfg, tiny_tokenizer, out=lines.append)
    verdict = [line for line in lines if line.startswith("Nothing will train")]
    assert len(verdict) == 1 and f"is {n_system} tokens" in verdict[0] and "Raise max_length (see" not in verdict[0]
    # a short SYSTEM: the prompts themselves are too long, and the message says so as before
    (tmp_path / "long.jsonl").write_text(json.dumps({"instruction": "word " * 80, "output": "x"}))
    message = str(pytest.raises(TunelabError, _build, tmp_path / "long.jsonl", tiny_tokenizer, SYSTEM="Be brief.",
                                max_length=32).value)
    assert "Raise max_length" in message and "SYSTEM" not in message
    # some samples bring their own (short) system prompt and train: the others are dropped, and warned of
    own = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}]}
    (tmp_path / "mixed.jsonl").write_text("\n".join([json.dumps({"messages": own["messages"][1:]}), json.dumps(own)]))
    logged: list[str] = []
    cfg = TrainConfig(data_path=str(tmp_path / "mixed.jsonl"), prompt_template="qwen_chat", max_length=32,
                      SYSTEM=system)
    assert build_datasets(cfg, tiny_tokenizer, log=logged.append).stats.samples == 1
    assert any(m.startswith("data: warning: SYSTEM (the config's system prompt, given to the 1 sample that starts "
                            f"with it) is {n_system} tokens") for m in logged)


@pytest.mark.parametrize("record, objective, field", [
    ({"messages": [{"role": "user", "content": "Hi \ud83d"}, {"role": "assistant", "content": "Hello"}]}, "sft",
     r"messages\[0\] \(user\)"),
    ({"prompt": "Hi", "chosen": "Sure \ud83d", "rejected": "No"}, "dpo", "'chosen'"),
    ({"prompt": "Hi", "completion": "Sure", "label": True, "system": "Be \udc4d"}, "kto", r"prompt\[0\] \(system\)"),
])
def test_half_an_emoji_is_an_invalid_record_naming_where(record, objective, field, tmp_path, tiny_tokenizer):
    # a lone UTF-16 surrogate (an emoji cut in two by a scraper) is valid in a JSON string, but is no character: the
    # tokenizer cannot encode it, and its TypeError named neither the file nor the record
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record).replace("\\ud83d", "").replace("\\udc4d", "") + "\n"
                    + json.dumps({**record, "completion": "Other"} if objective == "kto" else record)
                    .replace("\\ud83d", "x").replace("\\udc4d", "y") + "\n")
    with pytest.raises(TunelabError, match=rf"d\.jsonl line 1: {field} holds half of a UTF-16 surrogate pair"):
        _build(path, tiny_tokenizer, objective=objective)
    stats = _build(path, tiny_tokenizer, objective=objective, skip_invalid=True).stats
    assert stats.skipped_invalid == 1


def test_tunelab_reward_names_half_an_emoji_too(tmp_path):
    from tunelab.chat.reward import read_scored

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "Sure", "rejected": "No \ud83d"}) + "\n")
    with pytest.raises(TunelabError, match=r"pairs\.jsonl line 1: 'rejected' holds half of a UTF-16 surrogate pair"):
        read_scored(path)
