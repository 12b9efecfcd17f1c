"""Preference, reward and KTO data say what is wrong with a record, and nothing in it is dropped without a word
(findings of a fuzzing session over the preference data handling)."""

from __future__ import annotations

import json
import re

import pytest

from tunelab.config.schema import TrainConfig
from tunelab.data.dataset import DataStats, build_datasets
from tunelab.data.preference import read_for_objective, record_kind
from tunelab.data.sources import collect_samples
from tunelab.errors import TunelabError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def _read(data_path, objective, **kw):
    stats = DataStats()
    return collect_samples(TrainConfig(data_path=data_path, objective=objective, **kw), stats)[0], stats


def _build(data_path, tokenizer, objective, **kw):
    cfg = TrainConfig(**{"data_path": data_path, "objective": objective, "prompt_template": "qwen_chat",
                         "max_length": 128, "pack_to_max_length": False, **kw})
    return build_datasets(cfg, tokenizer, log=lambda m: None)


# --- 1. KTO labels as text ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, label", [("true", True), ("false", False), ("True", True), ("FALSE", False),
                                        (True, True), (False, False)])
def test_a_kto_label_given_as_text_reads_as_kto_sample(raw, label):
    record = {"prompt": "q", "completion": "a", "label": raw}
    assert record_kind(record) == "kto"
    assert read_for_objective(record, "kto", "f.jsonl line 1")["label"] is label


def test_a_kto_csv_whose_cells_are_text_trains(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nWhat is 2+2?,4,true\nWhat is 2+2?,5,false\n")
    samples, stats = _read(str(path), "kto")
    assert [s["label"] for s in samples] == [True, False] and stats.skipped_invalid == 0


@pytest.mark.parametrize("raw", [1, 0, "yes", "no", None, "1"])
def test_a_kto_label_of_another_value_is_named(raw):
    with pytest.raises(TunelabError, match=r"^f\.jsonl line 3: 'label' is " + re.escape(repr(raw)) +
                       r"\. Use true .* or false"):
        read_for_objective({"prompt": "q", "completion": "a", "label": raw}, "kto", "f.jsonl line 3")


def test_a_supervised_record_with_a_label_of_its_own_stays_supervised():
    # a classification label is not a KTO label: a supervised run reads the record (and reports 'label' unused)
    assert record_kind({"messages": [{"role": "user", "content": "q"}], "label": "positive"}) is None
    assert record_kind({"messages": [{"role": "user", "content": "q"}], "label": "false"}) == "kto"


# --- 4. errors about one side of a pair name that side, as the record has it -------------------------------------

U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a", "rejected": []}, "'rejected' is an empty list. Give 'rejected' as the reply's "
                                                     "text"),
    ({"prompt": "q", "chosen": "a", "rejected": {}}, "rejected needs 'role' and 'content'"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt"},
      "rejected": {"from": "gpt", "value": "b"}}, "chosen needs 'from' and 'value'"),
    ({"prompt": "q", "chosen": {"from": "gpt"}, "rejected": "b"}, "'chosen' has 'from' but no 'value'"),
    ({"prompt": "q", "chosen": [A, U], "rejected": "b"}, "'chosen' does not end with an assistant reply. Give"),
    ({"prompt": "q", "chosen": [{"role": "tool", "content": "x"}], "rejected": "b"}, r"chosen\[0\] is 'tool' but"),
    ({"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}, r"prompt\[0\] has role 'bot'"),
    ({"prompt": [U, A], "chosen": "a", "rejected": "b"}, r"the prompt ends with an assistant turn \(prompt\[1\]\). "
                                                         r"A prompt ends with the user's question .* 'chosen' and "
                                                         r"'rejected'"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "the prompt is empty"),
    ({"system": "s", "prompt": [{"role": "system", "content": "t"}, U], "chosen": "a", "rejected": "b"},
     "prompt: two system prompts: the top-level 'system' and the system message prompt"),
    ({"chosen": [U, A], "rejected": [U]}, "'rejected' does not end with an assistant reply. Make 'rejected' the "
                                          "whole conversation"),
    ({"chosen_messages": [U, A], "rejected_messages": [U, {"rol": "assistant"}]},
     r"rejected_messages\[1\] needs 'role'"),
    ({"input": {"messages": [U]}, "preferred_output": [A], "non_preferred_output": []},
     "'non_preferred_output' is an empty list"),
    ({"input": {"messages": [{"role": "usr", "content": "q"}]}, "preferred_output": [A],
      "non_preferred_output": [A]}, r"input.messages\[0\] has role 'usr'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "q"}],
      "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
     r"conversations\[1\].from is 'robot'"),
])
def test_an_error_in_a_pair_names_the_side_and_the_field_as_the_record_has_them(record, message):
    with pytest.raises(TunelabError, match=r"^pairs.jsonl line 2: " + message) as caught:
        read_for_objective(record, "dpo", "pairs.jsonl line 2")
    assert "preference training, not this run" not in str(caught.value)
    assert "messages[" not in str(caught.value).replace("input.messages[", "").replace("rejected_messages[", "")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "completion": [], "label": True}, "'completion' is an empty list"),
    ({"prompt": "q", "completion": {}, "label": False}, "completion needs 'role' and 'content'"),
    ({"messages": [U], "label": True}, "'messages' does not end with an assistant reply. A KTO sample's last "
                                       "message is the reply its label marks"),
])
def test_an_error_in_a_kto_sample_is_worded_for_kto(record, message):
    with pytest.raises(TunelabError, match=r"^kto.jsonl line 2: " + message) as caught:
        read_for_objective(record, "kto", "kto.jsonl line 2")
    assert "preference training, not this run" not in str(caught.value)


# --- 2. and 3. pairs whose replies are the same, empty replies -------------------------------------------------

def test_a_pair_whose_replies_are_the_same_is_left_out_and_reported(tmp_path, tiny_tokenizer):
    records = [{"prompt": f"Q{i}", "chosen": "good", "rejected": "good" if i % 2 else "bad"} for i in range(6)]
    path = _write(tmp_path / "pairs.jsonl", records)
    bundle = _build(path, tiny_tokenizer, "dpo")
    stats = bundle.stats
    assert stats.samples == 3 and stats.left_out == 3
    [warning] = [w for w in stats.reading_warnings() if "the same" in w]
    assert warning.startswith(f"{path}: 3 pairs whose chosen and rejected reply are the same ({path} line 2, "
                              f"{path} line 4, {path} line 6): left out")
    assert "3 left out" in stats.summary()


def test_a_pair_trained_by_kto_whose_replies_are_the_same_is_left_out(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": "x"},
                                             {"prompt": "Q", "chosen": "x", "rejected": "y"}])
    samples, stats = _read(path, "kto")
    assert len(samples) == 1 and stats.left_out == 1


def test_a_source_of_only_tied_pairs_says_why_nothing_is_usable(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(TunelabError, match=r"no usable record \(of its 1: 1 left out \(the same chosen and rejected"):
        _read(path, "dpo")


def test_empty_replies_of_pairs_are_reported_and_an_empty_chosen_one_is_left_out(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "Q1", "chosen": "", "rejected": "bad"},
                                             {"prompt": "Q2", "chosen": "good", "rejected": " "},
                                             {"prompt": "Q3", "chosen": "good", "rejected": "bad"}])
    bundle = _build(path, tiny_tokenizer, "dpo")
    assert bundle.stats.samples == 2 and bundle.stats.left_out == 1
    warnings = bundle.stats.reading_warnings()
    assert any(w.startswith(f"{path}: 1 record with an empty chosen (desirable) reply ({path} line 1): left out")
               for w in warnings)
    assert any(w.startswith(f"{path}: 1 record with an empty rejected (undesirable) reply ({path} line 2): trained")
               for w in warnings)


def test_empty_kto_completions_are_reported(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "kto.jsonl", [{"prompt": "Q1", "completion": "", "label": True},
                                           {"prompt": "Q2", "completion": "", "label": False},
                                           {"prompt": "Q3", "completion": "fine", "label": True}])
    samples, stats = _read(path, "kto")
    assert [s["label"] for s in samples] == [False, True] and stats.left_out == 1
    warnings = stats.reading_warnings()
    assert any("1 record with an empty chosen (desirable) reply" in w and "line 1" in w for w in warnings)
    assert any("1 record with an empty rejected (undesirable) reply" in w and "line 2" in w for w in warnings)


def test_check_dataset_shows_the_pairs_left_out(tmp_path, tiny_tokenizer):
    from tunelab.data.inspect import check_dataset

    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": "x"},
                                             {"prompt": "Q", "chosen": "x", "rejected": "y"}])
    lines = []
    check_dataset(TrainConfig(data_path=path, objective="dpo"), out=lines.append)
    assert any("left out 1 (see the warnings)" in line for line in lines)
    assert any(line.startswith("left out:            1") for line in lines)


# --- 5. check-dataset when nothing is left to train -------------------------------------------------------------

def test_check_dataset_fails_when_max_length_drops_every_pair(tmp_path, tiny_tokenizer_dir, capsys):
    from tunelab.cli.main import main

    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "word " * 80, "chosen": "a", "rejected": "b"}] * 3)
    code = main(["check-dataset", path, "--objective", "dpo", "--tokenizer", str(tiny_tokenizer_dir), "--template",
                 "qwen_chat", "--max-length", "32"])
    out = capsys.readouterr().out
    assert code == 1
    assert "0 kept for training" in out and "OK: every record is valid" not in out
    assert "Nothing will train: none of the 3 encoded samples is left (max_length=32: 3 dropped after the cut" in out


def test_check_dataset_fails_when_every_pair_is_left_out(tmp_path, capsys):
    from tunelab.cli.main import main

    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 2)
    assert main(["check-dataset", path, "--objective", "dpo"]) == 1
    out = capsys.readouterr().out
    assert "Nothing will train: no record is usable" in out and "OK:" not in out


# --- 6. pictures in preference data; preference data in a run with a vision tower ------------------------------

@pytest.mark.parametrize("objective, record", [
    ("dpo", {"prompt": "<image>What is this?", "chosen": "A cat.", "rejected": "A dog.", "images": ["cat.png"]}),
    ("kto", {"prompt": "<image>What is this?", "completion": "A cat.", "label": True, "image": "cat.png"}),
    ("kto", {"prompt": "<image>What is this?", "chosen": "A cat.", "rejected": "A dog.", "images": ["cat.png"]}),
])
def test_pictures_in_preference_data_are_refused_in_a_text_only_run(tmp_path, objective, record):
    path = _write(tmp_path / "pairs.jsonl", [record])
    with pytest.raises(TunelabError, match=r"line 1: the record has '(images|image)' \(a multimodal sample\)\. "
                                           r"tunelab trains preference and KTO objectives on text only"):
        _read(path, objective)


def test_an_image_part_in_a_pair_names_the_side_and_the_preference_fix():
    record = {"input": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                                                  {"type": "text", "text": "What?"}]}]},
              "preferred_output": [{"role": "assistant", "content": "a"}],
              "non_preferred_output": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(TunelabError, match=r"f line 1: input.messages\[0\].content\[0\] is an image .*text only") \
            as caught:
        read_for_objective(record, "dpo", "f line 1")
    assert "LLaVA" not in str(caught.value)


@pytest.mark.parametrize("record, objective", [({"prompt": "q", "chosen": "a", "rejected": "b"}, "'dpo'"),
                                               ({"prompt": "q", "completion": "a", "label": "false"}, "'kto'")])
def test_preference_data_in_a_run_with_a_vision_tower_points_at_a_text_only_run(tmp_path, record, objective):
    path = _write(tmp_path / "pairs.jsonl", [record])
    with pytest.raises(TunelabError, match=r"A run with a vision tower trains supervised data only .* text-only "
                                           r"model with objective = " + objective) as caught:
        _read(path, "sft", visual_encoder_name_or_path="openai/clip-vit-large-patch14-336")
    assert "Train it with objective" not in str(caught.value)
    with pytest.raises(TunelabError, match=r"Train it with objective = " + objective):
        _read(path, "sft")


def test_a_ranking_registry_entry_in_a_run_with_a_vision_tower_points_at_a_text_only_run():
    from pathlib import Path

    registry = str(Path(__file__).parent / "fixtures" / "ecosystem" / "llamafactory" / "dataset_info.json")
    with pytest.raises(TunelabError, match=r"dpo_en_demo.*A run with a vision tower trains supervised data only"):
        _read([{"path": registry, "dataset": "dpo_en_demo"}], "sft",
              visual_encoder_name_or_path="openai/clip-vit-large-patch14-336")


# --- 7. KTO needs another sample's reply for its KL estimate ----------------------------------------------------

@pytest.mark.parametrize("records", [
    [{"prompt": "q", "completion": "a", "label": True}],
    [{"prompt": "q", "chosen": "a", "rejected": "b"}],  # a pair read for KTO: its two halves, one prompt
    [{"prompt": f"q{i}", "completion": "same", "label": i % 2 == 0} for i in range(3)],
])
def test_kto_with_a_single_reply_is_refused(tmp_path, tiny_tokenizer, records):
    path = _write(tmp_path / "kto.jsonl", records)
    with pytest.raises(TunelabError, match=r"objective = 'kto' needs at least 2 samples with different replies"):
        _build(path, tiny_tokenizer, "kto")
    from tunelab.data.inspect import check_dataset

    for tokenizer in (None, tiny_tokenizer):  # check-dataset says so as its verdict, after the records
        lines = []
        stats = check_dataset(TrainConfig(data_path=path, objective="kto", prompt_template="qwen_chat"), tokenizer,
                              out=lines.append)
        assert stats.samples == 0 and "Nothing will train: objective = 'kto' needs at least 2 samples" in lines[-1]


def test_check_dataset_shows_the_invalid_kto_record_that_leaves_a_single_reply(tmp_path, tiny_tokenizer_dir, capsys):
    from tunelab.cli.main import main

    path = _write(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": None},
                                           {"prompt": "p", "completion": "b", "label": False}])
    code = main(["check-dataset", path, "--objective", "kto", "--tokenizer", str(tiny_tokenizer_dir), "--template",
                 "qwen_chat"])
    out = capsys.readouterr().out
    assert code == 1
    assert "kto.jsonl line 1: 'label' is None. Use true" in out  # the cause, before the verdict it leads to
    assert "Nothing will train: objective = 'kto' needs at least 2 samples with different replies, and the data " \
           "has 1 sample" in out


def test_kto_with_two_replies_trains(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                           {"prompt": "p", "completion": "b", "label": False}])
    assert _build(path, tiny_tokenizer, "kto").stats.samples == 2


# --- 8. tunelab reward: its flags, a missing file, pairs it cannot tell apart ------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--data", "nope.json"], "--data nope.json: no such file"),
    (["--data", "."], "--data .: a folder"),
    (["--data", "x.jsonl", "-n", "-1"], "argument -n: expected a positive whole number"),
    (["--data", "x.jsonl", "--batch-size", "0"], "argument --batch-size: expected a positive whole number"),
    (["--data", "x.jsonl", "--batch-size", "-2"], "argument --batch-size: expected a positive whole number"),
    (["--data", "x.jsonl", "--max-length", "-5"], "argument --max-length: expected a positive whole number"),
    (["--data", "x.jsonl", "--max-length", "0"], "argument --max-length: expected a positive whole number"),
])
def test_reward_refuses_bad_flags_and_a_missing_file_in_one_line(tmp_path, monkeypatch, capsys, flags, says):
    from tunelab.cli.main import main

    monkeypatch.chdir(tmp_path)
    try:
        code = main(["reward", str(tmp_path / "no_model"), *flags])
    except SystemExit as exc:  # argparse's usage error
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err


def _reward_model(tiny_llama_dir, out):
    """The tiny Llama with a fresh score head (an untrained reward model) and its tokenizer, saved at `out`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1, dtype=torch.float32)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama_dir / name).exists():
            (out / name).write_bytes((tiny_llama_dir / name).read_bytes())


def test_reward_leaves_pairs_it_cannot_tell_apart_out_of_the_accuracy(tmp_path, tiny_llama_dir, capsys):
    from tunelab.cli.main import main

    _reward_model(tiny_llama_dir, tmp_path / "rm")
    data = _write(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "good answer", "rejected": "bad"},
                                             {"prompt": "word " * 60, "chosen": "good", "rejected": "bad"},
                                             {"prompt": "hi", "chosen": "same", "rejected": "same"}])
    assert main(["reward", str(tmp_path / "rm"), "--data", data, "--device", "cpu", "--prompt-template",
                 "qwen_chat", "--max-length", "48"]) == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [r.get("skipped") for r in lines] == [None, "cut at max_length=48 before their replies differ (a long "
                                                       "prompt)", "with the same chosen and rejected reply"]
    assert lines[1]["chosen"] == lines[1]["rejected"] and lines[1]["correct"] is None
    assert "of 1 pairs score the chosen reply higher" in out.err
    assert "2 pairs not counted in the accuracy" in out.err and "Raise --max-length" in out.err


def test_an_image_placeholder_without_an_image_in_a_pair_is_warned_about_with_the_preference_fix(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "<image>What?", "chosen": "a", "rejected": "b"}])
    _, stats = _read(path, "dpo")
    [warning] = [w for w in stats.reading_warnings() if "<image>" in w]
    assert "trained as plain text. tunelab trains preference and KTO objectives on text only" in warning
    assert "LLaVA" not in warning


# --- fields the record's shape does not read ---------------------------------------------------------------------

_Q = [{"role": "user", "content": "Q"}]
_A, _B = [{"role": "assistant", "content": "A"}], [{"role": "assistant", "content": "B"}]


@pytest.mark.parametrize("record, unread", [
    ({"prompt": "P", "messages": _Q, "chosen": "A", "rejected": "B"}, ["messages"]),  # TRL reads the prompt
    ({"instruction": "I", "prompt": "P", "chosen": "A", "rejected": "B"}, ["prompt"]),  # alpaca reads instruction
    ({"input": "context", "prompt": "P", "chosen": "A", "rejected": "B"}, ["input"]),  # TRL has no input
    ({"chosen": _Q + _A, "rejected": _Q + _B, "system": "S"}, ["system"]),  # whole conversations: theirs only
    ({"chosen_messages": _Q + _A, "rejected_messages": _Q + _B, "system": "S"}, ["system"]),
    ({"input": {"messages": _Q}, "preferred_output": _A, "non_preferred_output": _B, "tools": []}, ["tools"]),
    ({"prompt": [{**_Q[0], "name": "bob"}], "chosen": _A, "rejected": _B}, ["prompt[].name"]),
    ({"prompt": "Q", "completion": "A", "label": True, "kto_tag": False}, ["kto_tag"]),  # the label is read
    ({"prompt": "P", "messages": _Q + _A, "label": True}, ["prompt"]),  # KTO reads the conversation
    ({"prompt": "P", "chosen": "A", "rejected": "B", "system": "S",
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, []),
    # a training switch: a pair trains its final replies, whatever it says
    ({"prompt": _Q + [{**_A[0], "weight": 1}] + _Q, "chosen": [{**_A[0], "weight": 0}], "rejected": _B},
     ["chosen[].weight", "prompt[].weight"]),
    ({"messages": _Q + [{**_A[0], "loss": False}], "label": True}, ["messages[].loss"]),
    ({"instruction": "I", "input": "x", "system": "S", "history": [], "chosen": "A", "rejected": "B"}, []),
])
def test_a_field_the_records_shape_does_not_read_is_reported(record, unread):
    from tunelab.data.preference_fields import unused_preference_fields

    assert unused_preference_fields(record) == unread


def test_check_dataset_names_a_field_beside_the_one_read(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [{"instruction": "I", "prompt": "P", "chosen": "A", "rejected": "B"}])
    warnings = _read(path, "dpo")[1].reading_warnings()
    assert any("field 'prompt' not used (1 record" in w and "'instruction'" in w for w in warnings), warnings


def test_reward_reads_the_data_before_the_model_and_words_a_missing_reply_for_scoring(tmp_path, capsys):
    from tunelab.cli.main import main

    data = _write(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "Q"}]}])
    assert main(["reward", str(tmp_path / "no_model"), "--data", data]) == 2  # the model is never looked for
    err = capsys.readouterr().err
    assert "chats.jsonl line 1: the conversation does not end with an assistant reply. `tunelab reward` scores a " \
           "conversation's last reply" in err
    assert "preference training, not this run" not in err and "no_model" not in err


def test_reward_says_what_the_model_given_is_when_it_is_not_a_reward_model(tmp_path, tiny_llama_dir, capsys):
    from tunelab.cli.main import main

    data = _write(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    assert main(["reward", str(tmp_path / "no_model"), "--data", data]) == 2
    assert "no_model' does not exist" in capsys.readouterr().err  # not "its tunelab.json says objective = 'sft'"
    assert main(["reward", str(tiny_llama_dir), "--data", data]) == 2
    err = capsys.readouterr().err
    assert "is not a reward model: its config.json names LlamaForCausalLM (a chat or base model) and no " \
           "tunelab.json says objective = 'reward'" in err


def test_sharegpt_replies_given_as_lists_of_turns_are_read_as_turns():
    # LLaMA-Factory's ranking data has one turn each; a list of turns (a reply with tool calls and results, or a
    # single turn in a list) reads as TRL's message lists do, instead of failing as a content part of type None
    from tunelab.data.preference import normalise_preference

    record = {"conversations": [{"from": "human", "value": "Q"}], "chosen": [{"from": "gpt", "value": "A"}],
              "rejected": [{"from": "gpt", "value": "B"}]}
    pair = normalise_preference(record)
    assert (pair["chosen"]["content"], pair["rejected"]["content"]) == ("A", "B") and len(pair["prompt"]) == 1
    with pytest.raises(TunelabError, match=r"rejected\[0\]\.from is 'robot'"):
        normalise_preference({**record, "rejected": [{"from": "robot", "value": "B"}]}, "r")


def test_chat_with_a_reward_adapter_points_at_the_reward_command_that_works(tmp_path, tiny_llama_dir, capsys):
    from tunelab.cli.main import main

    adapter = tmp_path / "hf_rm"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    (adapter / "tunelab.json").write_text(json.dumps({"objective": "reward", "base_model": str(tiny_llama_dir)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")  # refused before it is read
    assert main(["chat", str(tiny_llama_dir), "--adapter", str(adapter), "--prompt", "hi"]) == 2
    # before: `tunelab reward BASE --data FILE`, which refuses the base as not a reward model
    assert f"Score with `tunelab reward {tiny_llama_dir} --adapter {adapter} --data FILE`" in capsys.readouterr().err


def test_gguf_of_a_reward_adapter_or_work_dir_names_it_not_its_base(tmp_path, tiny_llama_dir, capsys):
    from tunelab.cli.main import main

    adapter = tmp_path / "hf_rm"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    (adapter / "tunelab.json").write_text(json.dumps({"objective": "reward", "base_model": str(tiny_llama_dir)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert main(["convert", "gguf", str(tiny_llama_dir), str(tmp_path / "rm.gguf"), "--adapter", str(adapter)]) == 2
    assert f"error: {adapter} is a reward model" in capsys.readouterr().err  # before: the base was named


def test_a_supervised_format_in_a_preference_run_is_refused_not_ignored(tmp_path):
    # a preference run reads each record's own shape: data_format = 'text' (or an entry's 'format') was ignored
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    with pytest.raises(TunelabError, match=r"^data_format = 'text' with objective = 'dpo': .*Set data_format = 'auto'"):
        _read(path, "dpo", data_format="text")
    with pytest.raises(TunelabError, match=r"^data_path\[0\]: 'format' = 'sharegpt' with objective = 'kto'"):
        _read([{"path": path, "format": "sharegpt"}], "kto")
    assert len(_read(path, "orpo", data_format="auto")[0]) == 1


def test_reasoning_a_template_does_not_write_is_reported(tmp_path):
    # qwen_chat writes no reasoning: a chosen reply's reasoning_content (and a supervised one's) was dropped without a
    # word, and a pair whose replies differ only in their reasoning trained as the same tokens twice
    reasoned = {"role": "assistant", "content": "A", "reasoning_content": "Think first."}
    pair = _write(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": [reasoned], "rejected": "B"}])
    chat = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Q"}, reasoned]}])
    from tunelab.data.templates import get_template, tool_support

    for path, objective in ((pair, "dpo"), (chat, "sft")):
        stats = DataStats()
        cfg = TrainConfig(data_path=path, objective=objective, prompt_template="qwen_chat")
        collect_samples(cfg, stats, tools=tool_support(get_template("qwen_chat")))
        warnings = stats.reading_warnings()
        writers = "(deepseek_r1, qwen3_chat, qwen3_nothink_chat)"  # every template that writes it, found by probing
        assert any("field 'reasoning_content' not used (1 record" in w and writers in w for w in warnings), warnings
        stats = DataStats()  # a template that writes it: nothing to say
        collect_samples(TrainConfig(data_path=path, objective=objective, prompt_template="qwen3_chat"), stats,
                        tools=tool_support(get_template("qwen3_chat")))
        assert not stats.reading_warnings()


def _registry(tmp_path):
    """A dataset_info.json in LLaMA-Factory's own layout (data/dataset_info.json: dpo_en_demo, kto_en_demo), its
    columns under other names than tunelab reads, and the same data as plain TRL records."""
    user, good, bad = ({"role": r, "content": c} for r, c in (("user", "Q2"), ("assistant", "A2"), ("assistant", "B")))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "pairs_renamed": {"file_name": "pairs.json", "ranking": True,
                          "columns": {"prompt": "question", "query": "context", "chosen": "better",
                                      "rejected": "worse", "system": "sys"}},
        "dpo_en_demo": {"file_name": "dpo_en_demo.json", "formatting": "sharegpt", "ranking": True,
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                        "columns": {"messages": "messages", "kto_tag": "label"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant"}},
    }))
    (tmp_path / "pairs.json").write_text(json.dumps([
        {"question": "Q1", "context": "more", "better": "A1", "worse": "B", "sys": "Be brief.", "id": 7}]))
    (tmp_path / "dpo_en_demo.json").write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Q2"}], "chosen": {"from": "gpt", "value": "A2"},
         "rejected": {"from": "gpt", "value": "B"}}]))
    (tmp_path / "kto_en_demo.json").write_text(json.dumps([{"messages": [user, good], "label": True}]))
    trl = _write(tmp_path / "trl.jsonl", [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1\nmore"}],
         "chosen": "A1", "rejected": "B"},
        {"prompt": "Q2", "chosen": "A2", "rejected": "B"},
        {"prompt": "Q2", "completion": "A2", "label": True}])
    return tmp_path / "dataset_info.json", trl


def test_reward_reads_a_dataset_registry_through_its_columns_as_training_does(tmp_path):
    # `tunelab reward` refused a dataset_info.json and pointed at its files, which it then read without the entry's
    # columns ('question' / 'better' / 'worse': "not a conversation or a preference pair")
    from tunelab.chat.reward import read_scored

    registry, trl = _registry(tmp_path)
    warnings = []
    scored = read_scored(registry, dataset="pairs_renamed,dpo_en_demo,kto_en_demo", warn=warnings.append)
    assert scored == read_scored(trl)
    trained, _ = _read([{"path": str(registry), "dataset": "pairs_renamed,dpo_en_demo"}], "reward")
    assert trained == scored[:2]  # the pairs training reads, read the same way
    assert [w for w in warnings if "field 'id' not used" in w and "pairs.json" in w and "not mapped by dataset "
            "'pairs_renamed'" in w] and len(warnings) == 1
    assert read_scored(registry, 1, "dpo_en_demo,kto_en_demo") == scored[1:2]


def test_reward_reads_a_registry_entrys_num_samples_as_training_does(tmp_path):
    # `tunelab reward` scored every record of an entry with num_samples, while training reads that many samples
    from tunelab.chat.reward import read_scored

    pairs = [{"prompt": f"Q{i}", "chosen": f"A{i}", "rejected": "B"} for i in range(6)]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    columns = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "fewer": {"file_name": "pairs.json", "ranking": True, "columns": columns, "num_samples": 4},
        "more": {"file_name": "pairs.json", "ranking": True, "columns": columns, "num_samples": 9}}))
    registry = tmp_path / "dataset_info.json"
    for names, count in (("fewer", 4), ("more", 9), ("fewer,more", 13)):
        trained, _ = _read([{"path": str(registry), "dataset": names}], "reward")
        scored = read_scored(registry, dataset=names)
        assert len(scored) == count and scored == trained, names
        assert read_scored(registry, 3, names) == trained[:3]


@pytest.mark.parametrize("args, says", [
    ([], r"--data .*dataset_info\.json: a LLaMA-Factory dataset registry \(dataset_info\.json\); name the datasets "
         r"to score with --dataset NAME \(its datasets: pairs_renamed, dpo_en_demo, kto_en_demo\)"),
    (["--dataset", "dpo_en_dem"], r"has no dataset 'dpo_en_dem'\. Did you mean 'dpo_en_demo'"),
])
def test_reward_on_a_dataset_registry_asks_for_its_dataset_names(tmp_path, capsys, args, says):
    from tunelab.cli.main import main

    registry, trl = _registry(tmp_path)
    assert main(["reward", str(tmp_path / "no_model"), "--data", str(registry), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(says, err) and "no_model" not in err, err
    assert main(["reward", str(tmp_path / "no_model"), "--data", trl, "--dataset", "x"]) == 2
    assert "--dataset 'x' names datasets of a LLaMA-Factory dataset_info.json, but --data" in capsys.readouterr().err


def test_reward_scores_a_registry_dataset_as_the_same_records_written_plainly(tmp_path, tiny_llama_dir, capsys):
    from tunelab.cli.main import main

    _reward_model(tiny_llama_dir, tmp_path / "rm")
    registry, trl = _registry(tmp_path)
    flags = ["--device", "cpu", "--prompt-template", "qwen_chat", "--max-length", "64"]
    assert main(["reward", str(tmp_path / "rm"), "--data", str(registry), "--dataset",
                 "pairs_renamed,dpo_en_demo,kto_en_demo", *flags]) == 0
    from_registry = capsys.readouterr()
    assert main(["reward", str(tmp_path / "rm"), "--data", trl, *flags]) == 0
    plain = capsys.readouterr()
    assert len(from_registry.out.splitlines()) == 3 and from_registry.out == plain.out
    assert "warning: " in from_registry.err and "field 'id' not used" in from_registry.err
