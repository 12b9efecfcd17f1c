"""Preference, reward and KTO data say what is wrong with a record, and nothing in it is dropped without a word
(findings of a fuzzing session over the preference data handling)."""

from __future__ import annotations

import json

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
    with pytest.raises(TunelabError, match=r"^f.jsonl line 3: 'label' is " + repr(raw).replace("'", "'") +
                       r"\. Use true .* or false"):
        read_for_objective({"prompt": "q", "completion": "a", "label": raw}, "kto", "f.jsonl line 3")


def test_a_supervised_record_with_a_label_of_its_own_stays_supervised():
    # a classification label is not a KTO label: a supervised run reads the record (and reports 'label' unused)
    assert record_kind({"messages": [{"role": "user", "content": "q"}], "label": "positive"}) is None
    assert record_kind({"messages": [{"role": "user", "content": "q"}], "label": "false"}) == "kto"
