"""Nothing in the user's data is dropped without a word: wrappers, skipped files, two system prompts, records a
dataset_map_fn drops, sources a ratio empties, CSV columns read as text, empty replies, special tokens' text,
keys given twice (findings of a fuzzing session)."""

from __future__ import annotations

import json

import pytest

from tunelab.config.schema import TrainConfig
from tunelab.data.dataset import DataStats, build_datasets
from tunelab.data.files import RECORD_KEYS
from tunelab.data.formats import _READ
from tunelab.data.sources import collect_samples
from tunelab.errors import TunelabError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


def _read(data_path, **kw):
    stats = DataStats()
    return collect_samples(TrainConfig(data_path=data_path, **kw), stats)[0], stats


def _build(data_path, tokenizer, **kw):
    cfg = TrainConfig(**{"data_path": data_path, "prompt_template": "qwen_chat", "max_length": 128,
                         "pack_to_max_length": False, **kw})
    return build_datasets(cfg, tokenizer, log=lambda m: None)


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


# --- 1. a .json object: one record, or a wrapper whose other keys are reported --------------------------------

def test_a_single_record_with_a_history_list_is_one_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"input": "hi", "output": "yo", "history": [["q1", "a1"]]}))
    samples, stats = _read(str(path))
    assert [m["content"] for m in samples[0]["messages"]] == ["q1", "a1", "hi", "yo"]
    assert stats.reading_warnings() == []


def test_every_top_level_field_a_format_reads_makes_an_object_one_record():
    assert set().union(*_READ.values()) <= set(RECORD_KEYS)


@pytest.mark.parametrize("wrapper, beside", [
    ({"version": "1.0", "data": [{"instruction": "a", "output": "b"}]}, ["version"]),
    ({"meta": {"source": "x"}, "records": [{"instruction": "a", "output": "b"}], "notes": "keep me"},
     ["meta", "notes"]),
])
def test_keys_beside_a_wrapped_list_are_reported(tmp_path, wrapper, beside):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps(wrapper))
    samples, stats = _read(str(path))
    assert len(samples) == 1
    warnings = stats.reading_warnings()
    for key in beside:
        assert any(f"field {key!r} not used" in w and str(path) in w and "beside the list" in w for w in warnings)
    assert len(warnings) == len(beside)


# --- 2. a folder: files of types not read are reported ----------------------------------------------------------

def test_files_a_folder_holds_that_are_not_read_are_reported(tmp_path):
    good = json.dumps({"instruction": "a", "output": "b"}) + "\n"
    (tmp_path / "a.jsonl").write_text(good)
    (tmp_path / "b.ndjson").write_text(good)  # JSON Lines by another name: read
    (tmp_path / "c.tsv").write_text("instruction\toutput\nq\t7\n")  # read, tab-separated
    (tmp_path / "d.jsonl.gz").write_bytes(b"\x1f\x8b")
    (tmp_path / "README.md").write_text("notes")
    samples, stats = _read(str(tmp_path))
    assert len(samples) == 3 and samples[2]["messages"][-1]["content"] == "7"
    lines = [w for w in stats.reading_warnings() if "not read" in w]
    assert len(lines) == 1 and "2 files" in lines[0] and "README.md" in lines[0] and "d.jsonl.gz" in lines[0]


def test_a_folder_of_files_none_readable_names_them(tmp_path):
    (tmp_path / "d.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(TunelabError, match=r"holds no data file.*d\.jsonl\.gz"):
        _read(str(tmp_path))


# --- 3. two system prompts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("record", [
    {"messages": [{"role": "system", "content": "A"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "yo"}], "system": "B"},
    {"conversations": [{"from": "system", "value": "A"}, {"from": "human", "value": "hi"},
                       {"from": "gpt", "value": "yo"}], "system": "B"},
])
def test_a_top_level_system_and_a_system_message_is_an_invalid_record(tmp_path, record):
    good = {k: v for k, v in record.items() if k != "system"}
    path = _write(tmp_path / "d.jsonl", [good, record])
    with pytest.raises(TunelabError, match=r"d\.jsonl line 2: two system prompts.*[Kk]eep one"):
        _read(path)
    samples, stats = _read(path, skip_invalid=True)
    assert len(samples) == 1 and stats.skipped_invalid == 1 and "two system prompts" in stats.invalid[0]


# --- 4. dataset_map_fn: records it drops are counted; it returns a record -------------------------------------

def test_records_a_map_fn_drops_are_counted(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "qa.jsonl", [{"q": "a", "a": "b"}, {"q": "skip", "a": "c"}, {"q": "x"}])

    def keep(r):
        return None if r["q"] == "skip" or "a" not in r else {"instruction": r["q"], "output": r["a"]}

    bundle = _build(path, tiny_tokenizer, dataset_map_fn=keep)
    assert bundle.stats.filtered == 2 and bundle.stats.files[0]["filtered"] == 2
    assert "2 dropped by dataset_map_fn" in bundle.stats.summary()


def test_a_map_fn_returning_a_list_names_the_record(tmp_path):
    path = _write(tmp_path / "qa.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(TunelabError, match=r"qa\.jsonl line 1: dataset_map_fn must return a dict \(a record\) or "
                                           r"None, got list"):
        _read(path, dataset_map_fn=lambda r: [r])


# --- 5. a ratio that leaves a source no sample -------------------------------------------------------------------

def test_a_ratio_that_rounds_a_source_to_nothing_is_warned(tmp_path):
    big = _write(tmp_path / "big.jsonl", [{"instruction": str(i), "output": "x"} for i in range(10)])
    small = _write(tmp_path / "small.jsonl", [{"instruction": "q", "output": "a"}] * 3)
    samples, stats = _read([big, {"path": small, "ratio": 0.1}])
    assert len(samples) == 10
    warnings = stats.reading_warnings()
    assert any("small.jsonl" in w and "ratio 0.1" in w and "no sample" in w for w in warnings)


@pytest.mark.parametrize("ratio", [1e30, 20_000])
def test_a_ratio_that_repeats_each_sample_past_reason_names_the_source(tmp_path, ratio):
    # 1e30 was an OverflowError, 20,000 a list of 60,000 copies built in memory: neither is a mix anyone means
    small = _write(tmp_path / "small.jsonl", [{"instruction": "q", "output": "a"}] * 3)
    with pytest.raises(TunelabError, match=r"small\.jsonl: ratio .* repeats each of its 3 samples .* at most 10000"):
        _read([{"path": small, "ratio": ratio}])


def test_num_samples_that_repeat_each_sample_past_reason_name_the_dataset(tmp_path):
    _write(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}] * 3)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.jsonl", "num_samples": 10**30}}))
    with pytest.raises(TunelabError, match=r"num_samples 10+ of dataset 'a' repeats each of its 3 samples .* "
                                           r"Lower num_samples"):
        _read([{"path": str(tmp_path / "dataset_info.json"), "dataset": "a"}])

# --- 6. CSV columns are text ---------------------------------------------------------------------------------------

def test_csv_columns_are_text_and_empty_cells_stay_empty(tmp_path):
    # an all-numeric column is text as written (pandas would guess int: 7, not "007"); an empty cell stays ""
    (tmp_path / "num.csv").write_text("instruction,input,output\nAdd 1+1,,2\nSay 007,,007\nSay 1.50,x,1.50\n")
    samples, _ = _read(str(tmp_path / "num.csv"))
    assert [s["messages"][-1]["content"] for s in samples] == ["2", "007", "1.50"]
    assert [s["messages"][0]["content"] for s in samples] == ["Add 1+1", "Say 007", "Say 1.50\nx"]


# --- 7. an empty reply is not trained as "stop at once" ------------------------------------------------------------


def test_empty_pretraining_texts_are_left_out_and_warned(tmp_path, tiny_tokenizer):
    """An empty or blank text would train BOS -> EOS, a document that ends at once: it is left out, counted, and the
    warning names the records (a .txt file's blank lines are no samples: one sample a non-empty line)."""
    path = _write(tmp_path / "t.jsonl", [{"text": "Beijing is the capital."}, {"text": ""}, {"text": " \n "},
                                         {"text": "Paris too."}])
    bundle = _build(path, tiny_tokenizer)
    stats = bundle.stats
    assert stats.samples == 2 and stats.left_out == 2 and stats.untrained == 0
    warnings = [w for w in stats.reading_warnings() if "empty text" in w]
    assert len(warnings) == 1 and "2 records" in warnings[0] and "t.jsonl line 2" in warnings[0] \
        and "line 3" in warnings[0]
    assert "pairs" not in stats.summary()
    only_empty = _write(tmp_path / "e.jsonl", [{"text": ""}])
    with pytest.raises(TunelabError, match=r"no usable record \(of its 1: 1 left out \(an empty text"):
        _build(only_empty, tiny_tokenizer)


def test_a_pretraining_text_longer_than_max_length_is_reported_as_split_not_as_fitting(tmp_path, tiny_qwen2_dir,
                                                                                         capsys):
    """A one-line book in a .txt file: check-dataset said "longer than max_length: 0" and "1 record, N samples"
    without a word of why. The text is split into max_length pieces (nothing cut): the report says so."""
    from tunelab.cli.main import main

    (tmp_path / "book.txt").write_text("Beijing is the capital of China. " * 200 + "\nParis too.\n")
    assert main(["check-dataset", str(tmp_path / "book.txt"), "--tokenizer", str(tiny_qwen2_dir),
                 "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    pieces = int(out.split("samples:")[1].split()[0]) - 1  # every sample but "Paris too."'s is a piece of the book
    assert pieces > 10
    assert f"texts longer than max_length=64: 1, split into {pieces} samples (nothing cut)" in out


def test_empty_replies_are_not_trained_and_are_warned(tmp_path, tiny_tokenizer):
    alpaca = _write(tmp_path / "d.jsonl", [
        {"instruction": "a", "output": ""},
        {"instruction": "b", "output": "fine"},
        {"instruction": "c", "output": "d", "history": [["q", " "]]},
    ])
    chat = _write(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "1"},
            {"role": "assistant", "content": "one"}]},
    ])
    bundle = _build([alpaca, chat], tiny_tokenizer, prompt_template="qwen2_5_chat")  # a template that writes calls
    stats = bundle.stats
    # the two samples with no other reply have nothing left to train on: counted as without a trained reply
    assert stats.untrained == 2 and stats.samples == 3
    warnings = [w for w in stats.reading_warnings() if "empty reply" in w]
    assert len(warnings) == 2
    assert "2 samples" in warnings[0] and "d.jsonl line 1" in warnings[0] and "line 3" in warnings[0]
    assert "1 sample " in warnings[1] and "m.jsonl line 1" in warnings[1]  # a tool call's empty text is no empty reply


def test_tool_calls_a_template_cannot_write_are_refused_and_definitions_reported(tmp_path, tiny_tokenizer, capsys):
    """Most families' templates (plain ChatML, Llama 3, Gemma, Mistral v1 ...) have no way to write a tool call: the
    turn would train as an empty reply. Such a record is invalid, naming templates that write calls; a definition
    list such a template cannot show is a field not used."""
    call = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
                         {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "18C, sunny."}]}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    plain = {"messages": call["messages"][:1] + [{"role": "assistant", "content": "Ask a weather site."}],
             "tools": tools}
    path = _write(tmp_path / "d.jsonl", [plain, call])
    with pytest.raises(TunelabError, match=r"d\.jsonl line 2: the record has tool calls, which template 'llama3_chat' "
                       r"does not write.*empty replies.*llama3_1_chat"):
        _build(path, tiny_tokenizer, prompt_template="llama3_chat")
    stats = _build(path, tiny_tokenizer, prompt_template="llama3_chat", skip_invalid=True).stats
    assert stats.skipped_invalid == 1 and stats.samples == 1
    assert any("tools" in w and "no place for tool definitions" in w and "d.jsonl line 1" in w
               for w in stats.reading_warnings())
    # a template that writes them trains the call, and reads the definitions
    rows = _build(path, tiny_tokenizer, prompt_template="llama3_1_chat").train_rows
    trained = [tiny_tokenizer.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100])
               for r in (rows[i] for i in range(len(rows)))]
    assert any('"city": "Paris"' in text for text in trained)



def _calling(calls, content=""):
    return {"messages": [{"role": "user", "content": "Weather in Paris and Rome?"},
                         {"role": "assistant", "content": content, "tool_calls": [
                             {"type": "function", "function": {"name": "weather", "arguments": {"city": c}}}
                             for c in calls]},
                         *({"role": "tool", "content": "18C"} for _ in calls),
                         {"role": "assistant", "content": "18C."}]}


@pytest.mark.parametrize("template", ["llama3_1_chat", "glm4_chat"])
def test_several_calls_in_one_reply_on_a_template_that_writes_one_are_refused(tmp_path, tiny_tokenizer, template):
    """Llama 3.1 / 3.2 and GLM-4 write one call per reply: a reply with two was refused by Llama's template naming no
    record, and GLM-4 trained the first call alone. The record is invalid, named with its file and line."""
    path = _write(tmp_path / "d.jsonl", [_calling(["Paris"]), _calling(["Paris", "Rome"])])
    with pytest.raises(TunelabError, match=rf"d\.jsonl line 2: reply 1 holds 2 tool calls \(weather, weather\), and "
                       rf"template {template!r} writes one call per reply.*qwen2_5_chat"):
        _build(path, tiny_tokenizer, prompt_template=template)
    stats = _build(path, tiny_tokenizer, prompt_template=template, skip_invalid=True).stats
    assert stats.skipped_invalid == 1 and stats.samples == 1
    assert _build(path, tiny_tokenizer, prompt_template="qwen2_5_chat").stats.samples == 2


def test_text_beside_a_call_that_the_template_drops_is_reported(tmp_path, tiny_tokenizer):
    """Llama 3.1 and Mistral v3 write a reply that calls a tool as the call alone (as their vendors' templates do):
    the text beside the call was dropped without a word."""
    path = _write(tmp_path / "d.jsonl", [_calling(["Paris"]), _calling(["Paris"], "Let me look.")])
    for template in ("llama3_1_chat", "mistral_v3"):
        warnings = _build(path, tiny_tokenizer, prompt_template=template).stats.reading_warnings()
        assert any("'content beside tool_calls' not used (1 record, first at " in w and "d.jsonl line 2" in w and
                   f"template {template!r} writes a reply that calls a tool as its calls alone" in w
                   for w in warnings), warnings
    warnings = _build(path, tiny_tokenizer, prompt_template="qwen2_5_chat").stats.reading_warnings()
    assert not any("beside tool_calls" in w for w in warnings)


# --- 8. the text of special tokens, which the tokenizer turns into those tokens ---------------------------------

def test_special_token_text_in_the_data_is_warned_with_its_record(tmp_path, tiny_tokenizer):
    assert "<|im_end|>" in tiny_tokenizer.all_special_tokens + [
        t.content for t in tiny_tokenizer.added_tokens_decoder.values() if t.special]
    path = _write(tmp_path / "d.jsonl", [
        {"instruction": "a", "output": "plain"},
        {"instruction": "say <|im_end|>\n<|im_start|>assistant\nfoo", "output": "bar"},
        {"instruction": "b", "output": "x <|im_end|> y"},
    ])
    bundle = _build(path, tiny_tokenizer)
    (warning,) = [w for w in bundle.stats.reading_warnings() if "special tokens" in w]
    assert "2 samples" in warning and "d.jsonl line 2" in warning
    assert "'<|im_end|>'" in warning and "'<|im_start|>'" in warning
    # the text does become the control token (what the warning is about): two more than the same data without it
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain = _build(_write(tmp_path / "p.jsonl", [
        {"instruction": "a", "output": "plain"}, {"instruction": "say x\ny\nfoo", "output": "bar"},
        {"instruction": "b", "output": "x y"}]), tiny_tokenizer)

    def count(b):
        return sum(list(r["input_ids"]).count(end) for r in b.train_rows)

    assert count(bundle) == count(plain) + 2
    clean = _build(_write(tmp_path / "c.jsonl", [{"instruction": "a <b> c", "output": "</d>"}]), tiny_tokenizer)
    assert not [w for w in clean.stats.reading_warnings() if "special tokens" in w]
    one = _build(_write(tmp_path / "o.jsonl", [{"instruction": "say <|im_end|>", "output": "x"}]), tiny_tokenizer)
    assert [w for w in one.stats.reading_warnings() if "1 sample holds the text of the tokenizer's special" in w]


# --- 9. a key given twice in one object: JSON keeps the last value -------------------------------------------------

def test_a_key_given_twice_is_reported_with_its_record(tmp_path):
    lines = ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": "first", "output": "second"}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "d.json").write_text("[" + ", ".join(lines) + "]")
    for name, where in (("d.jsonl", "d.jsonl line 2"), ("d.json", "d.json")):
        samples, stats = _read(str(tmp_path / name))
        assert samples[1]["messages"][-1]["content"] == "second"  # what JSON keeps
        (warning,) = stats.reading_warnings()
        assert "'output (the first of two)' not used (1 record" in warning and where in warning, warning


def test_the_summary_counts_one_in_the_singular():
    """The data line of every run: '1 eval sample', '1 row', not '1 eval samples', '1 rows'."""
    one = DataStats(records_read=1, samples=1, rows=1, tokens=1, trained_tokens=1, eval_samples=1, images=1)
    text = one.summary()
    assert "1 record read" in text and "1 train sample in 1 row, 1 token (1 trained, 1 image); 1 eval sample" in text
    assert "0 skipped as invalid" in text  # the counts that read as before
