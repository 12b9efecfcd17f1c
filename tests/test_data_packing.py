"""Labels, truncation and packing: the rows contract of docs/DESIGN.md."""

from __future__ import annotations

import json

import pytest

from tunelab.config.schema import TrainConfig
from tunelab.data.collate import collate
from tunelab.data.dataset import build_datasets
from tunelab.data.encode import encode_messages
from tunelab.data.packing import pack_rows
from tunelab.data.templates import get_template


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


def _chat(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_labels_cover_assistant_reply_and_end_token_only(tiny_tokenizer):
    template = get_template("qwen_chat")
    row = encode_messages(template, tiny_tokenizer, _chat("Who are you?", "I am an AI assistant."), 512, "assistant")
    trained = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
    assert tiny_tokenizer.decode(trained) == "I am an AI assistant.<|im_end|>"
    assert row["labels"][0] == -100 and row["position_ids"] == list(range(len(row["input_ids"])))
    all_row = encode_messages(template, tiny_tokenizer, _chat("Who are you?", "I am."), 512, "all")
    assert all_row["labels"][1:] == all_row["input_ids"][1:] and all_row["labels"][0] == -100


def test_truncation_that_leaves_nothing_trained_drops_the_sample(tiny_tokenizer):
    template = get_template("qwen_chat")
    long_question = "The quick brown fox jumps over the lazy dog. " * 20
    assert encode_messages(template, tiny_tokenizer, _chat(long_question, "Yes."), 32, "assistant") is None
    cut = encode_messages(template, tiny_tokenizer, _chat("Hi", "The quick brown fox " * 30), 32, "assistant")
    assert len(cut["input_ids"]) == 32 and any(l != -100 for l in cut["labels"])


def test_build_counts_truncated_and_dropped(tmp_path, tiny_tokenizer):
    data = [{"instruction": "The quick brown fox jumps. " * 30, "output": "ok"},  # dropped
            {"instruction": "Hi", "output": "The quick brown fox jumps. " * 30},  # truncated
            {"instruction": "Hi", "output": "Hello!"}]
    (tmp_path / "d.json").write_text(json.dumps(data))
    cfg = TrainConfig(data_path=str(tmp_path / "d.json"), prompt_template="qwen_chat", max_length=48,
                      pack_to_max_length=False)
    stats = build_datasets(cfg, tiny_tokenizer, log=lambda m: None).stats
    assert (stats.records_read, stats.dropped, stats.truncated, stats.samples) == (3, 1, 1, 2)


def test_packed_rows_restart_positions_and_keep_every_sample(tmp_path, tiny_tokenizer):
    data = [{"instruction": f"Question {i}", "output": "Answer " * (i % 7 + 1)} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in data))
    cfg = TrainConfig(data_path=str(tmp_path / "d.jsonl"), prompt_template="internlm2_chat", max_length=64)
    bundle = build_datasets(cfg, tiny_tokenizer, log=lambda m: None)
    rows = bundle.train_rows
    assert len(rows) < 40 and bundle.stats.samples == 40
    starts = 0
    for row in rows:
        assert len(row["input_ids"]) <= 64
        pos = row["position_ids"]
        assert pos[0] == 0
        for i, p in enumerate(pos):
            if p == 0:
                starts += 1
                assert row["labels"][i] == -100  # first token of every sample
            else:
                assert p == pos[i - 1] + 1
    assert starts == 40
    # seeded shuffle: same seed, same rows; another seed, another order
    again = build_datasets(cfg, tiny_tokenizer, log=lambda m: None, use_cache=False).train_rows
    assert [r["input_ids"] for r in again] == [r["input_ids"] for r in rows]
    from dataclasses import replace
    other = build_datasets(replace(cfg, seed=1), tiny_tokenizer, log=lambda m: None).train_rows
    assert [r["input_ids"] for r in other] != [r["input_ids"] for r in rows]


def _sample(tag: int, n: int) -> dict:
    return {"input_ids": [tag] * n, "labels": [tag] * n, "position_ids": list(range(n))}


def test_best_fit_puts_each_sample_in_the_tightest_row():
    # in order, 60 | 50 40 | 50 would take three rows of 100; best fit puts the 40 beside the 60 (room 40, tightest)
    # and the second 50 beside the first
    rows = pack_rows([_sample(1, 60), _sample(2, 50), _sample(3, 40), _sample(4, 50)], 100)
    assert [r["input_ids"] for r in rows] == [[1] * 60 + [3] * 40, [2] * 50 + [4] * 50]
    assert rows[0]["position_ids"] == list(range(60)) + list(range(40))


def test_best_fit_fills_rows_of_instruction_lengths():
    import random

    rng = random.Random(0)
    samples = [_sample(i, rng.randint(72, 669)) for i in range(800)]
    rows = pack_rows(samples, 2048)
    tokens = sum(len(s["input_ids"]) for s in samples)
    assert sum(len(r["input_ids"]) for r in rows) == tokens and all(len(r["input_ids"]) <= 2048 for r in rows)
    # every sample whole, in one row, once
    seen = sorted((r["input_ids"][i - 1], r["position_ids"][i - 1] + 1)  # (tag, length) at each sample end
                  for r in rows for i in range(1, len(r["input_ids"]) + 1)
                  if i == len(r["input_ids"]) or r["position_ids"][i] == 0)
    assert seen == sorted((i, len(s["input_ids"])) for i, s in enumerate(samples))
    # filling one row at a time leaves ~10% of these rows empty (half a sample each); best fit under 3%
    assert tokens / (len(rows) * 2048) > 0.97
    assert pack_rows([], 2048) == []


def test_packed_logits_equal_each_sample_alone(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    template = get_template("llama3_chat")
    samples = [encode_messages(template, tokenizer, _chat(q, a), 128, "assistant")
               for q, a in [("Who are you?", "I am an AI assistant."), ("Hello", "Hi! How can I help you today?"),
                            ("What is the capital of China?", "Beijing is the capital.")]]
    (packed,) = pack_rows(samples, 128)
    batch = collate([packed], pad_token_id=0)
    with torch.no_grad():
        # use_cache=False: transformers only derives the block-diagonal mask when no KV cache is made
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        offset = 0
        for s in samples:
            alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            n = len(s["input_ids"])
            torch.testing.assert_close(logits[offset:offset + n], alone, atol=1e-5, rtol=0)
            offset += n


def test_collate_pads_as_its_own_segment():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]},
            {"input_ids": [8], "labels": [-100], "position_ids": [0]}]
    batch = collate(rows, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist()[1] == [-100, -100, -100]
    assert batch["position_ids"].tolist()[1] == [0, 0, 1]


@pytest.mark.parametrize("cut", ["one_over", "thirds", "small"])
def test_a_long_text_is_split_with_every_token_trained_once(tiny_tokenizer, cut):
    """A text longer than max_length: each piece after the first starts with the previous piece's last token as
    context, so every token after BOS is trained exactly once, and no piece is a lone token with nothing to train
    (one max_length + 1 tokens long used to leave its EOS alone, counted as a sample 'without a trained reply')."""
    from tunelab.data.encode import encode_batch

    text = "hello world, the quick brown fox " * 6
    full = [tiny_tokenizer.bos_token_id, *tiny_tokenizer(text, add_special_tokens=False)["input_ids"],
            tiny_tokenizer.eos_token_id]
    max_length = {"one_over": len(full) - 1, "thirds": len(full) // 3, "small": 4}[cut]
    pieces = encode_batch(None, tiny_tokenizer, [{"text": text}], max_length, "all")[0]
    assert all(p.row is not None for p in pieces)  # nothing dropped
    trained = [t for p in pieces for t in p.row["labels"] if t != -100]
    assert trained == full[1:]  # every token but BOS, once, in order
    assert all(len(p.row["input_ids"]) <= max_length for p in pieces)
    assert all(p.row["input_ids"][0] == prev.row["input_ids"][-1] for prev, p in zip(pieces, pieces[1:]))
