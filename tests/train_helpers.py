"""Shared by tests/test_train_*.py, tests/test_preference_train.py and the several-process tests: tiny training rows
(supervised and preference pairs) and a small config, built without the data step; `tunelab train` on several CPU
processes, its log, and a copy of a run as if it had stopped after a checkpoint."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

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
    """Keep a reference to the model the loop trains (it is not returned): `captured["model"]` after training, and
    what its fast path did in `captured["fast_path"]`."""
    import tunelab.model.load as load

    captured = {}
    original = load.load_model_for_training

    def wrapper(*args, **kwargs):
        model, fast_path = original(*args, **kwargs)
        captured["model"], captured["fast_path"] = model, fast_path
        return model, fast_path

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


def child_env(**extra: str) -> dict:
    """The environment for a child `python -m tunelab ...` or torchrun: this checkout first on PYTHONPATH, the
    caller's PYTHONPATH kept after it, so a stack laid over the environment that way (another transformers, swanlab
    with its protobuf 6 in scripts/test.sh) reaches the child too, not only the pytest process."""
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def train_on_ranks(config: Path, work_dir: Path, nproc: int = 2, *extra: str,
                   last_step: int = 6) -> subprocess.CompletedProcess:
    """`NPROC_PER_NODE=nproc tunelab train CONFIG --device cpu` (gloo), asserted to have finished."""
    env = child_env(NPROC_PER_NODE=str(nproc), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tunelab", "train", str(config), "--work-dir", str(work_dir), "--device", "cpu",
           *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # gloo on a busy 2-core machine has been seen to abort a rank at shutdown, after the last checkpoint was
    # written; the losses and checkpoints the tests check still tell a real failure from that.
    shutdown_abort = "SIGABRT" in proc.stderr and (work_dir / f"iter_{last_step}" / "tunelab.json").is_file()
    assert proc.returncode == 0 or shutdown_abort, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def logged_steps(work_dir: Path, key: str = "loss") -> dict[int, dict]:
    """{step: train_log.jsonl line} of the lines that carry `key`."""
    rows = [json.loads(line) for line in (work_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if key in r and "step" in r}


def copy_stopped_after(run_dir: Path, copy_dir: Path, step: int, later: int) -> Path:
    """A copy of a finished run as if it had stopped after iter_{step}: iter_{later} gone, last_checkpoint and the
    log back at that step."""
    shutil.copytree(run_dir, copy_dir)
    shutil.rmtree(copy_dir / f"iter_{later}")
    (copy_dir / "last_checkpoint").write_text(str((copy_dir / f"iter_{step}").resolve()))
    log = copy_dir / "train_log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if line.strip() and json.loads(line).get("step", 0) <= step))
    return copy_dir
