"""Preference pairs and KTO samples become rows of whole units: chosen and rejected share their prompt's tokens,
only the final reply is trained, packing never splits a unit, and collate tells which sequence each trained token
belongs to."""

import pytest
import torch

from tunelab.data.collate import collate
from tunelab.data.encode_preference import (CHOSEN, DESIRABLE, KL, REJECTED, UNDESIRABLE, encode_kto, encode_pairs,
                                            row_capacity, unpaired, with_kl_completions)
from tunelab.data.packing import TokenRows, pack_rows
from tunelab.data.preference import normalise_kto, normalise_preference
from tunelab.data.templates import get_template


def _pair(i, chosen="Sure, here it is. DONE", rejected="no"):
    return normalise_preference({"prompt": [{"role": "user", "content": f"Question {i}?"},
                                            {"role": "assistant", "content": "An earlier answer."},
                                            {"role": "user", "content": "And now?"}],
                                 "chosen": [{"role": "assistant", "content": chosen}],
                                 "rejected": [{"role": "assistant", "content": rejected * (1 + i % 3)}]})


def _sequences(row):
    pos = row["position_ids"]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [{k: row[k][a:b] for k in ("input_ids", "labels")} for a, b in zip(starts, starts[1:])]


def test_a_pair_is_two_sequences_sharing_the_prompt_with_only_the_final_reply_trained(tiny_tokenizer):
    template = get_template("qwen_chat")
    [enc] = encode_pairs(template, tiny_tokenizer, [_pair(0)], max_length=128)
    row = enc.row
    assert row["sequence_kind"] == [CHOSEN, REJECTED]
    chosen, rejected = _sequences(row)
    for seq, reply in ((chosen, "Sure, here it is. DONE"), (rejected, "no")):
        messages = _pair(0)["prompt"] + [{"role": "assistant", "content": reply}]
        # the ids are the tokenizer's for the whole text the template renders
        assert seq["input_ids"] == tiny_tokenizer(template.render(messages), add_special_tokens=False).input_ids
        trained = tiny_tokenizer.decode([t for t in seq["labels"] if t != -100])
        assert trained.startswith(reply) and "earlier answer" not in trained
    first_trained = [next(i for i, t in enumerate(s["labels"]) if t != -100) for s in (chosen, rejected)]
    assert first_trained[0] == first_trained[1]
    assert chosen["input_ids"][:first_trained[0]] == rejected["input_ids"][:first_trained[1]]


def test_a_pair_whose_prompt_fills_max_length_is_dropped_and_a_long_reply_is_cut(tiny_tokenizer):
    template = get_template("qwen_chat")
    long_prompt = normalise_preference({"prompt": "word " * 200, "chosen": "a", "rejected": "b"})
    long_reply = normalise_preference({"prompt": "hi", "chosen": "word " * 200, "rejected": "b"})
    dropped, cut = encode_pairs(template, tiny_tokenizer, [long_prompt, long_reply], max_length=64)
    assert dropped.row is None
    chosen, rejected = _sequences(cut.row)
    assert len(chosen["input_ids"]) == 64 and cut.truncated
    assert len(rejected["input_ids"]) < 64


def test_packing_keeps_units_whole_and_collate_maps_tokens_to_sequences(tiny_tokenizer, tmp_path):
    template = get_template("qwen_chat")
    units = [e.row for e in encode_pairs(template, tiny_tokenizer, [_pair(i) for i in range(9)], max_length=128)]
    rows = pack_rows(units, row_capacity(128))
    assert len(rows) < len(units)
    assert sum(len(r["sequence_kind"]) for r in rows) == 2 * len(units)
    for r in rows:
        assert r["sequence_kind"] == [CHOSEN, REJECTED] * (len(r["sequence_kind"]) // 2)
        assert len(_sequences(r)) == len(r["sequence_kind"])  # every listed sequence starts at position 0
    stored = TokenRows.from_rows(rows)
    stored.save(tmp_path / "rows")
    loaded = TokenRows.load(tmp_path / "rows")
    assert [loaded[i] for i in range(len(loaded))] == rows

    batch = collate([loaded[0], loaded[1]], pad_token_id=0)
    kinds = batch["sequence_kind"].tolist()
    assert kinds == rows[0]["sequence_kind"] + rows[1]["sequence_kind"]
    width = batch["input_ids"].shape[1]
    # each trained position's sequence, recomputed by walking the rows
    owner, k = {}, 0
    for r_i, r in enumerate(rows[:2]):
        pos = r["position_ids"]
        starts = [i for i, p in enumerate(pos) if p == 0]
        for s_i, start in enumerate(starts):
            end = starts[s_i + 1] if s_i + 1 < len(starts) else len(pos)
            for p in range(start, end):
                owner[r_i * width + p] = k
            assert batch["sequence_last"][k].item() == r_i * width + end - 1
            k += 1
    assert batch["loss_sequence"].tolist() == [owner[i] for i in batch["loss_index"].tolist()]
    assert batch["sequence_tokens"].sum().item() == batch["loss_index"].numel()


def test_kto_units_pair_each_reply_with_a_mismatched_one_for_the_kl_estimate(tiny_tokenizer):
    template = get_template("qwen_chat")
    samples = [normalise_kto({"prompt": f"Q{i}", "completion": f"answer number {i}", "label": i % 2 == 0})
               for i in range(3)]
    samples = with_kl_completions(samples)
    assert [s["kl_completion"]["content"] for s in samples] == ["answer number 1", "answer number 2",
                                                                 "answer number 0"]
    # a prompt's replies listed together (LLaMA-Factory's KTO data often is): the partner answers another prompt
    same = [normalise_kto({"prompt": p, "completion": c, "label": c == "good"})
            for p, c in [("A", "good"), ("A", "bad"), ("B", "good B"), ("A", "bad again")]]
    assert [s["kl_completion"]["content"] for s in with_kl_completions(same)] == ["good B", "good B", "bad again",
                                                                                 "good B"]
    one_prompt = [normalise_kto({"prompt": "A", "completion": c, "label": True}) for c in ("x", "y")]
    assert [s["kl_completion"]["content"] for s in with_kl_completions(one_prompt)] == ["y", "x"]
    units = [u for per_sample in encode_kto(template, tiny_tokenizer, samples, max_length=64) for u in per_sample]
    assert [u.row["sequence_kind"] for u in units] == [[DESIRABLE, KL], [UNDESIRABLE, KL], [DESIRABLE, KL]]
    own, kl = _sequences(units[0].row)
    assert "Q0" in tiny_tokenizer.decode(kl["input_ids"])
    assert tiny_tokenizer.decode([t for t in kl["labels"] if t != -100]).startswith("answer number 1")


def test_a_pair_trained_by_kto_becomes_a_desirable_and_an_undesirable_unit(tiny_tokenizer):
    template = get_template("qwen_chat")
    [[good, bad], [good2, bad2]] = encode_kto(template, tiny_tokenizer, [unpaired(_pair(0)), unpaired(_pair(1))], 64)
    assert good.row["sequence_kind"] == [DESIRABLE, KL] and bad.row["sequence_kind"] == [UNDESIRABLE, KL]
    replies = [tiny_tokenizer.decode([t for t in _sequences(u.row)[0]["labels"] if t != -100]) for u in (good, bad)]
    assert replies[0].startswith("Sure, here it is. DONE") and replies[1].startswith("no")


def test_collate_carries_precomputed_reference_logps(tiny_tokenizer):
    [enc] = encode_pairs(get_template("qwen_chat"), tiny_tokenizer, [_pair(0)], max_length=64)
    batch = collate([{**enc.row, "reference_logps": [-3.5, -7.25]}], pad_token_id=0)
    assert batch["reference_logps"].tolist() == pytest.approx([-3.5, -7.25])
    assert batch["reference_logps"].dtype == torch.float32


# --- reading preference files as training reads them ------------------------------------------------

ECO = __import__("pathlib").Path(__file__).parent / "fixtures" / "ecosystem"


def _bundle(data_path, tokenizer, objective, tmp_path, monkeypatch, **kw):
    from tunelab.config.schema import TrainConfig
    from tunelab.data.dataset import build_datasets

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(data_path=data_path, objective=objective, **{"prompt_template": "qwen_chat", "max_length": 512,
                                                                    "pack_to_max_length": False, **kw})
    return build_datasets(cfg, tokenizer, log=lambda m: None)


def _replies(tokenizer, row):
    return [tokenizer.decode([t for t in s["labels"] if t != -100]) for s in _sequences(row)]


@pytest.mark.parametrize("path", ["llamafactory/dpo_en_demo.json", "llamafactory/v1_dpo_demo.jsonl",
                                  "openai/dpo.jsonl", "xtuner/preference.jsonl"])
def test_public_preference_files_train_their_chosen_and_rejected_replies(path, tiny_tokenizer, tmp_path, monkeypatch):
    import json

    file = ECO / path
    text = file.read_text(encoding="utf-8")
    records = json.loads(text) if file.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l]
    bundle = _bundle(str(file), tiny_tokenizer, "dpo", tmp_path, monkeypatch)
    assert bundle.stats.samples == len(records) and bundle.stats.skipped_invalid == 0
    assert [f["formats"] for f in bundle.stats.files] == [{"preference": len(records)}]
    row = bundle.train_rows[0]
    assert row["sequence_kind"] == [CHOSEN, REJECTED]
    pair = normalise_preference(records[0])
    chosen, rejected = _replies(tiny_tokenizer, row)
    assert chosen.startswith(pair["chosen"]["content"][:40]) and rejected.startswith(pair["rejected"]["content"][:40])


def test_llamafactory_registry_entries_of_ranking_and_kto_data_read_for_their_objectives(tiny_tokenizer, tmp_path,
                                                                                         monkeypatch):
    import json

    registry = str(ECO / "llamafactory" / "dataset_info.json")
    pairs = _bundle([{"path": registry, "dataset": "dpo_en_demo"}], tiny_tokenizer, "dpo", tmp_path, monkeypatch)
    assert pairs.train_rows[0]["sequence_kind"] == [CHOSEN, REJECTED]
    kto = _bundle([{"path": registry, "dataset": "kto_en_demo"}], tiny_tokenizer, "kto", tmp_path, monkeypatch)
    labels = [r["label"] for r in json.loads((ECO / "llamafactory" / "kto_en_demo.json").read_text())]
    assert [kto.train_rows[i]["sequence_kind"][0] for i in range(len(kto.train_rows))] == \
        [DESIRABLE if good else UNDESIRABLE for good in labels]
    # pairs train KTO too: each pair a desirable and an undesirable reply
    unpaired_rows = _bundle(str(ECO / "llamafactory" / "dpo_en_demo.json"), tiny_tokenizer, "kto", tmp_path,
                            monkeypatch).train_rows
    assert sorted(r["sequence_kind"][0] for r in unpaired_rows) == [DESIRABLE] * (len(unpaired_rows) // 2) + \
        [UNDESIRABLE] * (len(unpaired_rows) // 2)


def test_a_preference_run_names_what_is_wrong_with_other_data(tiny_tokenizer, tmp_path, monkeypatch):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match=r"objective = 'dpo' trains on pairs .*has none.*'chosen'"):
        _bundle(str(ECO / "llamafactory" / "alpaca_en_demo.json"), tiny_tokenizer, "dpo", tmp_path, monkeypatch)
    with pytest.raises(TunelabError, match=r"KTO data .*objective = 'orpo'.*Set objective = 'kto'"):
        _bundle(str(ECO / "llamafactory" / "kto_en_demo.json"), tiny_tokenizer, "orpo", tmp_path, monkeypatch)


def test_system_and_fields_not_read_are_reported(tiny_tokenizer, tmp_path, monkeypatch):
    import json

    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}", "chosen": "good", "rejected": "bad", "score": 3})
                              for i in range(3)))
    bundle = _bundle(str(path), tiny_tokenizer, "simpo", tmp_path, monkeypatch, SYSTEM="Be brief.")
    assert "Be brief." in tiny_tokenizer.decode(bundle.train_rows[0]["input_ids"])
    assert any("'score' not used (3 records" in w for w in bundle.stats.reading_warnings())


def test_a_pair_cut_at_max_length_before_its_replies_differ_is_dropped_and_counted(tiny_tokenizer, tmp_path,
                                                                                   monkeypatch):
    import json

    # the replies differ only in their last word: a cut before it leaves the same tokens twice, which no pair
    # objective can prefer (DPO stays at ln 2 and counts it as wrong), as a pair of the same reply
    same_start = "Here is a helpful answer about the topic, and it is " * 3
    pair = normalise_preference({"prompt": "Tell me.", "chosen": same_start + "good.", "rejected": same_start + "bad."})
    [whole] = encode_pairs(get_template("qwen_chat"), tiny_tokenizer, [pair], max_length=512)
    [cut] = encode_pairs(get_template("qwen_chat"), tiny_tokenizer, [pair], max_length=60)
    assert whole.row is not None and cut.row is None and cut.full_length > 60
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}", "chosen": same_start + "good.",
                                          "rejected": ("No. " if i == 0 else "") + same_start + "bad."})
                              for i in range(3)))  # the first pair differs at its start: kept, cut
    bundle = _bundle(str(path), tiny_tokenizer, "dpo", tmp_path, monkeypatch, max_length=60)
    assert (bundle.stats.dropped, bundle.stats.truncated, bundle.stats.samples) == (2, 1, 1)
    # read for KTO, such a pair would train one sequence as desirable and as undesirable at once: both halves go
    other = normalise_preference({"prompt": "Other.", "chosen": "Yes.", "rejected": "No."})
    cut_halves, kept = encode_kto(get_template("qwen_chat"), tiny_tokenizer, [unpaired(pair), unpaired(other)], 60)
    assert [u.row for u in cut_halves] == [None, None] and all(u.row is not None for u in kept)
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}", "chosen": same_start + f"good {i}.",
                                          "rejected": ("No. " if i == 0 else "") + same_start + "bad."})
                              for i in range(3)))  # replies of their own: each has a KL partner
    bundle = _bundle(str(path), tiny_tokenizer, "kto", tmp_path, monkeypatch, max_length=60)
    assert (bundle.stats.dropped, bundle.stats.samples) == (4, 2), bundle.stats


def test_preview_names_each_sequence_and_shows_the_kl_reply_as_not_trained(tiny_tokenizer, tmp_path):
    import io
    import json

    from tunelab.config.schema import TrainConfig
    from tunelab.data.inspect import preview

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Q", "chosen": "Good", "rejected": "Bad"}) + "\n")
    out = io.StringIO()
    preview(TrainConfig(data_path=str(pairs), objective="dpo", prompt_template="qwen_chat"), tiny_tokenizer, 1,
            color=False, stream=out)
    text = out.getvalue()
    assert text.index("[chosen]") < text.index("⟦Good") < text.index("[rejected]") < text.index("⟦Bad")
    kto = tmp_path / "kto.jsonl"
    kto.write_text("\n".join(json.dumps({"prompt": f"Q{i}", "completion": reply, "label": i == 0})
                             for i, reply in enumerate(["Good", "Bad"])))
    out = io.StringIO()
    preview(TrainConfig(data_path=str(kto), objective="kto", prompt_template="qwen_chat"), tiny_tokenizer, 2,
            color=False, stream=out)
    first, second = out.getvalue().split("--- sample 1")
    # the KL sequence (the prompt with the other sample's reply) is scored without gradient: never trained
    assert "[desirable]" in first and "⟦Good" in first and "[KL" in first and "⟦Bad" not in first and "Bad" in first
    assert "[undesirable]" in second and "⟦Bad" in second
    out = io.StringIO()  # one sample shown: its KL partner is still another sample's reply
    preview(TrainConfig(data_path=str(kto), objective="kto", prompt_template="qwen_chat"), tiny_tokenizer, 1,
            color=False, stream=out)
    assert "sample 1" not in out.getvalue() and out.getvalue().split("[KL")[1].count("Bad") == 1
    # a pair read for KTO: both its halves, the chosen desirable and the rejected undesirable
    out = io.StringIO()
    preview(TrainConfig(data_path=str(pairs), objective="kto", prompt_template="qwen_chat"), tiny_tokenizer, 1,
            color=False, stream=out)
    assert "[desirable]" in out.getvalue() and "[undesirable]" in out.getvalue()
