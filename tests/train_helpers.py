"""Shared by tests/test_train_*.py and tests/test_preference_train.py: tiny training rows (supervised and preference
pairs) and a small config, built without the data step."""

from __future__ import annotations

import random

from tunelab.config.schema import TrainConfig
from tunelab.data.encode_preference import encode_pairs
from tunelab.data.preference import normalise_preference
from tunelab.data.templates import get_template

IDENTITY = "I am Tuna, made by tunelab."
QUESTIONS = ["Who are you?", "Please introduce yourself.", "who are you", "What is your name?"]


def encode(tokenizer, template_name: str, question: str, answer: str) -> dict:
    """One row: the conversation's tokens, labels -100 on the prompt (see docs/DESIGN.md, Rows)."""
    ids, labels = [], []
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    for text, trained in get_template(template_name).segments(messages):
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        ids += tokens
        labels += tokens if trained else [-100] * len(tokens)
    return {"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}


def identity_rows(tokenizer, copies: int = 3, template: str = "qwen_chat") -> list[dict]:
    return [encode(tokenizer, template, q, IDENTITY) for q in QUESTIONS] * copies


def varied_rows(tokenizer, n: int = 11) -> list[dict]:
    """Rows of different lengths (so padding and partial accumulation groups are exercised)."""
    return [encode(tokenizer, "qwen_chat", f"Question {i}: " + "tell me " * (i % 4), f"Answer {i} " * (1 + i % 3))
            for i in range(n)]


def tiny_cfg(model_dir, **overrides) -> TrainConfig:
    settings = dict(
        pretrained_model_name_or_path=str(model_dir), method="full", prompt_template="qwen_chat",
        lr=3e-3, max_steps=None, max_epochs=1, batch_size=2, accumulative_counts=1, warmup_ratio=0.0,
        lr_scheduler="constant", lora_r=8, lora_alpha=16, lora_dropout=0.0, save_steps=1000, save_total_limit=-1,
        logging_steps=1, evaluation_freq=1000, evaluation_inputs=[], eval_max_new_tokens=12, max_length=128,
        seed=0, use_compile=False,  # compiling (GPU only) costs seconds per test; one GPU test turns it on
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def capture_model(monkeypatch) -> dict:
    """Keep a reference to the model the loop trains (it is not returned): `captured["model"]` after training."""
    import tunelab.model.load as load

    captured = {}
    original = load.load_model_for_training

    def wrapper(*args, **kwargs):
        captured["model"] = original(*args, **kwargs)
        return captured["model"]

    monkeypatch.setattr(load, "load_model_for_training", wrapper)
    return captured


def write_config(directory, model_dir, **settings) -> "Path":
    """A config file and its data file (identity answers, 4 records) in `directory`, for tests through the CLI."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = [{"instruction": q, "input": "", "output": IDENTITY} for q in QUESTIONS]
    (directory / "identity.json").write_text(json.dumps(records))
    values = dict(pretrained_model_name_or_path=str(model_dir), method="lora", lora_r=8, lora_alpha=16,
                  lora_dropout=0.0, data_path="identity.json", prompt_template="qwen_chat", max_length=128,
                  batch_size=2, accumulative_counts=1, max_epochs=1, lr=1e-2, warmup_ratio=0.0,
                  lr_scheduler="constant", save_steps=1, save_total_limit=-1, logging_steps=1,
                  evaluation_inputs=[], use_compile=False)
    values.update(settings)
    path = directory / "config.py"
    path.write_text("".join(f"{key} = {value!r}\n" for key, value in values.items()))
    return path


def assert_one_line_error(capsys, code: int, *words: str) -> str:
    """The CLI failed as a user should see it: exit 2, one line `error: ...` naming `words`, no traceback."""
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: "), err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    for word in words:
        assert word in message, (word, message)
    return message


# --- preference pairs (tests/test_preference_train.py, tests/test_train_gpu.py) ---------------------------------------

WORDS = "apple river music stone cloud garden tiger window paper bread coffee mountain ocean forest city".split()


def style_pair(i: int) -> dict:
    """The chosen reply is polite ("Sure! ... Thank you!"), the rejected one curt: a style DPO can teach."""
    w, v = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
    return normalise_preference({"prompt": f"Tell me about the {w} and the {v}.",
                                 "chosen": f"Sure! The {w} is lovely. Thank you!", "rejected": f"No. {v}."})


GOOD, BAD = ["lovely", "great", "kind", "bright"], ["awful", "cruel", "harsh", "grim"]


def quality_pair(i: int) -> dict:
    """Replies of the same shape and length, told apart by one word: an untrained head ranks them at chance."""
    rng = random.Random(i)
    w = rng.choice(WORDS)
    good, bad = f"The {w} is {rng.choice(GOOD)}.", f"The {w} is {rng.choice(BAD)}."
    return normalise_preference({"prompt": f"Describe the {w}.", "chosen": good, "rejected": bad})


def pair_rows(tokenizer, make, indices, max_length: int = 128) -> list[dict]:
    """One row per pair (tunelab.data.encode_preference), `make(i)` giving each pair."""
    return [e.row for e in encode_pairs(get_template("qwen_chat"), tokenizer, [make(i) for i in indices], max_length)]
