"""Preference pairs and KTO samples become rows of whole units: chosen and rejected share their prompt's tokens,
only the final reply is trained, packing never splits a unit, and collate tells which sequence each trained token
belongs to."""

import pytest
import torch

from tunelab.data.collate import collate
from tunelab.data.encode_preference import (CHOSEN, DESIRABLE, KL, REJECTED, UNDESIRABLE, encode_kto, encode_pairs,
                                            row_capacity, unpair, with_kl_completions)
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
    units = encode_kto(template, tiny_tokenizer, samples, max_length=64)
    assert [u.row["sequence_kind"] for u in units] == [[DESIRABLE, KL], [UNDESIRABLE, KL], [DESIRABLE, KL]]
    own, kl = _sequences(units[0].row)
    assert "Q0" in tiny_tokenizer.decode(kl["input_ids"])
    assert tiny_tokenizer.decode([t for t in kl["labels"] if t != -100]).startswith("answer number 1")


def test_pairs_unpair_into_kto_samples():
    samples = unpair([_pair(0), _pair(1)])
    assert [s["label"] for s in samples] == [True, False, True, False]
    assert samples[0]["completion"]["content"] == "Sure, here it is. DONE"


def test_collate_carries_precomputed_reference_logps(tiny_tokenizer):
    [enc] = encode_pairs(get_template("qwen_chat"), tiny_tokenizer, [_pair(0)], max_length=64)
    batch = collate([{**enc.row, "reference_logps": [-3.5, -7.25]}], pad_token_id=0)
    assert batch["reference_logps"].tolist() == pytest.approx([-3.5, -7.25])
    assert batch["reference_logps"].dtype == torch.float32
