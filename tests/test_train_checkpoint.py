"""Never lose work: resume reproduces the loss curve, a kill during a save leaves the previous checkpoint as the
last one, SIGTERM stops after saving, out-of-memory is reported with the last checkpoint intact, old checkpoints
are pruned to save_total_limit."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from transformers import AutoTokenizer

from tests.train_helpers import tiny_cfg, varied_rows
from tunelab.errors import TunelabError
from tunelab.train import checkpoint as ckpt
from tunelab.train import layout, resume, run_status
from tunelab.train.loop import train
from tunelab.train.strategy import SingleProcess


@pytest.fixture(scope="module")
def rows(tiny_llama_dir):
    return varied_rows(AutoTokenizer.from_pretrained(tiny_llama_dir), 11)


def _cfg(model_dir, **overrides):
    # LoRA with dropout: resume must restore the RNG too. 11 rows, batch 2 x accumulation 2: 3 steps per epoch,
    # the last with a single micro-batch of a single row, so resume must find its place inside an epoch.
    settings = dict(method="lora", lora_dropout=0.1, batch_size=2, accumulative_counts=2, max_epochs=3,
                    lr=1e-2, warmup_ratio=0.2, lr_scheduler="cosine", save_steps=2, save_total_limit=-1)
    settings.update(overrides)
    return tiny_cfg(model_dir, **settings)


def _fail_on_call(monkeypatch, n: int, action):
    """Make the n-th micro-batch forward run `action` (raise, send a signal...) before computing the loss."""
    calls = {"n": 0}
    original = SingleProcess.forward_loss

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return original(*args, **kwargs)

    monkeypatch.setattr(SingleProcess, "forward_loss", wrapper)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, rows, tmp_path_factory):
    """The uninterrupted run: 9 steps over 3 epochs."""
    result = train(_cfg(tiny_llama_dir), tmp_path_factory.mktemp("reference"), train_rows=rows, device="cpu")
    assert result.step == 9
    return result.losses


def test_resume_after_crash_reproduces_the_loss_curve(tiny_llama_dir, rows, reference, tmp_path, monkeypatch,
                                                      capsys):
    class Crash(Exception):
        pass

    def crash():
        raise Crash

    # 2 micro-batches per step: call 11 is step 6's first forward, after iter_4 was saved (save_steps=2).
    _fail_on_call(monkeypatch, 11, crash)
    with pytest.raises(Crash):
        train(_cfg(tiny_llama_dir), tmp_path, train_rows=rows, device="cpu")
    assert layout.last_checkpoint(tmp_path) == tmp_path / "iter_4"
    monkeypatch.undo()

    capsys.readouterr()
    resumed = train(_cfg(tiny_llama_dir), tmp_path, resume="auto", train_rows=rows, device="cpu")
    assert sorted(resumed.losses) == list(range(5, 10))
    # the epoch counted as the log counts it: step 4 at 3 steps an epoch (6 micro-batches) is epoch 1.33, not "epoch 1"
    assert f"resumed from {tmp_path / 'iter_4'} (step 4, epoch 1.33)" in capsys.readouterr().out
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step
    # The log holds each step once: what the crashed run logged after iter_4 was replaced.
    steps = [r["step"] for r in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 10))


def test_sigterm_saves_then_stops_and_resume_continues(tiny_llama_dir, rows, reference, tmp_path, monkeypatch):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _fail_on_call(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))  # during step 3 (not a save step)
    stopped = train(_cfg(tiny_llama_dir), tmp_path, train_rows=rows, device="cpu")
    assert stopped.interrupted and stopped.step == 3
    assert stopped.last_checkpoint == tmp_path / "iter_3" and layout.last_checkpoint(tmp_path) == tmp_path / "iter_3"
    for sig, handler in before.items():  # the handlers the run found, not left pointing at the finished loop
        assert signal.getsignal(sig) is handler, sig
    monkeypatch.undo()

    resumed = train(_cfg(tiny_llama_dir), tmp_path, resume="auto", train_rows=rows, device="cpu")
    assert not resumed.interrupted and resumed.step == 9
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step


def _ctrl_c_twice():
    os.kill(os.getpid(), signal.SIGINT)  # the first asks for a save after this step
    os.kill(os.getpid(), signal.SIGINT)  # the second stops at once


def test_a_second_ctrl_c_stops_at_once_and_says_what_survives(tiny_llama_dir, rows, tmp_path, monkeypatch):
    """Stopping without saving must not leave the user guessing: the message names the checkpoint that is kept."""
    _fail_on_call(monkeypatch, 11, _ctrl_c_twice)  # during step 6, after iter_4 was saved
    with pytest.raises(KeyboardInterrupt) as info:
        train(_cfg(tiny_llama_dir), tmp_path, train_rows=rows, device="cpu")
    message = str(info.value)
    assert "without saving" in message and "iter_4" in message and "--resume auto" in message, message
    assert layout.last_checkpoint(tmp_path) == tmp_path / "iter_4"
    # run.json (and the board) tell it from a stop that saved its step ("stopped")
    assert run_status.read_status(tmp_path)["state"] == "interrupted"


def test_ctrl_c_before_the_first_checkpoint_says_nothing_is_saved(tiny_llama_dir, rows, tmp_path, monkeypatch,
                                                                 capsys):
    from tests.train_helpers import write_config
    from tunelab.cli.main import main

    _fail_on_call(monkeypatch, 1, _ctrl_c_twice)
    config = write_config(tmp_path, tiny_llama_dir)
    code = main(["train", str(config), "--work-dir", str(tmp_path / "work"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert "interrupted" in err and "no checkpoint was saved yet" in err, err


def test_kill_during_save_keeps_previous_checkpoint_as_last(tiny_llama_dir, rows, tmp_path, monkeypatch):
    original = layout.write_meta
    saves = {"n": 0}

    def write_meta_then_die(directory, meta):
        saves["n"] += 1
        if saves["n"] == 2:  # the second save: weights and state are written, the metadata is not
            raise KeyboardInterrupt("killed during save")
        original(directory, meta)

    monkeypatch.setattr(layout, "write_meta", write_meta_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_llama_dir), tmp_path, train_rows=rows, device="cpu")
    assert (tmp_path / "iter_4.tmp" / "training_state.pt").is_file()  # the half-written save
    assert not (tmp_path / "iter_4").exists()
    assert layout.last_checkpoint(tmp_path) == tmp_path / "iter_2"
    monkeypatch.undo()

    resumed = train(_cfg(tiny_llama_dir, max_epochs=2), tmp_path, resume="auto", train_rows=rows, device="cpu")
    assert min(resumed.losses) == 3 and resumed.step == 6
    assert not (tmp_path / "iter_4.tmp").exists()


class _Killed(Exception):
    """A kill -9 at that point: nothing after it runs (not caught as a failed save)."""


def _kill_when_renamed_to(monkeypatch, name: str):
    """Make renaming a finished save (iter_N.tmp) to `name` die: a kill right before that rename."""
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp") and os.path.basename(dst) == name:
            raise _Killed
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)


def test_a_checkpoint_named_past_its_step_is_never_saved_over(tiny_llama_dir, rows, tmp_path, monkeypatch):
    """Saves go to iter_<step>. A checkpoint renamed by hand to a later step than it holds (iter_4 moved to iter_6)
    is where a resumed run would save again: it used to be moved aside (iter_6.old, which nothing reads) for the new
    one, so a kill between the two renames lost the checkpoint the run had resumed from."""
    train(_cfg(tiny_llama_dir, max_steps=4, save_steps=4), tmp_path, train_rows=rows, device="cpu")
    os.rename(tmp_path / "iter_4", tmp_path / "iter_6")
    _kill_when_renamed_to(monkeypatch, "iter_6")
    with pytest.raises(TunelabError, match=r"iter_6 holds step 4.*Rename it iter_4"):
        train(_cfg(tiny_llama_dir, max_steps=8), tmp_path, resume="auto", overwrite=True, train_rows=rows,
              device="cpu")
    monkeypatch.undo()
    assert [p.name for p in layout.list_checkpoints(tmp_path)] == ["iter_6"] and not list(tmp_path.glob("*.old"))
    assert resume._problem(tmp_path / "iter_6") is None and layout.resolve_checkpoint(tmp_path) == tmp_path / "iter_6"
    os.rename(tmp_path / "iter_6", tmp_path / "iter_4")  # as the message says: then the run goes on from it
    resumed = train(_cfg(tiny_llama_dir, max_steps=8), tmp_path, resume="auto", train_rows=rows, device="cpu")
    assert min(resumed.losses) == 5 and resumed.step == 8


def test_a_save_refuses_a_name_taken_during_the_run(tiny_llama_dir, rows, tmp_path, monkeypatch):
    """Past the start's checks (a folder made by hand while the run trained), a save stops rather than move the
    checkpoint there aside: two renames cannot swap folders atomically, and a kill between them would lose it."""
    train(_cfg(tiny_llama_dir, max_steps=2), tmp_path, train_rows=rows, device="cpu")
    manifest = (tmp_path / "iter_2" / layout.MANIFEST_FILE).read_text()
    monkeypatch.setattr(resume, "_choose_on_main", lambda *args, **kwargs: None)  # as if iter_2 appeared later
    with pytest.raises(TunelabError, match=r"iter_2 already exists"):
        train(_cfg(tiny_llama_dir, max_steps=2, seed=1), tmp_path, train_rows=rows, device="cpu")
    assert (tmp_path / "iter_2" / layout.MANIFEST_FILE).read_text() == manifest  # the first run's, untouched
    assert not (tmp_path / "iter_2.tmp").exists()


def test_export_of_a_work_dir_takes_the_checkpoint_resume_takes(tiny_llama_dir, rows, tmp_path, monkeypatch):
    """A kill between renaming iter_4 into place and updating `last_checkpoint` leaves the pointer on iter_2: resume
    goes on from iter_4, and export and chat of the work dir must use iter_4 too, not the older one silently."""
    original, saves = layout.write_pointer, {"n": 0}

    def killed_before_the_second_pointer(work_dir, checkpoint):
        saves["n"] += 1
        if saves["n"] == 2:
            raise _Killed
        original(work_dir, checkpoint)

    monkeypatch.setattr(layout, "write_pointer", killed_before_the_second_pointer)
    with pytest.raises(_Killed):
        train(_cfg(tiny_llama_dir, max_steps=6), tmp_path, train_rows=rows, device="cpu")
    monkeypatch.undo()
    assert (tmp_path / layout.POINTER_FILE).read_text().strip() == "iter_2"
    assert resume.resolve_resume("auto", tmp_path) == tmp_path / "iter_4"
    assert layout.resolve_checkpoint(tmp_path) == tmp_path / "iter_4"  # what convert and chat read
    assert layout.resolve_checkpoint(tmp_path / layout.POINTER_FILE) == tmp_path / "iter_4"


def test_out_of_memory_is_reported_and_checkpoint_kept(tiny_llama_dir, rows, tmp_path, monkeypatch):
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _fail_on_call(monkeypatch, 9, oom)  # step 5, after iter_4
    with pytest.raises(TunelabError) as info:
        train(_cfg(tiny_llama_dir, batch_size=2), tmp_path, train_rows=rows, device="cpu")
    message = str(info.value)
    assert "out of memory at step 5" in message and "batch_size = 1" in message and "--resume auto" in message
    assert layout.last_checkpoint(tmp_path) == tmp_path / "iter_4"


@pytest.mark.parametrize("limit, kept", [(2, [8, 9]), (-1, list(range(1, 10)))])
def test_save_total_limit(limit, kept, tiny_llama_dir, rows, tmp_path):
    train(_cfg(tiny_llama_dir, method="full", save_steps=1, save_total_limit=limit), tmp_path, train_rows=rows,
          device="cpu")
    assert [p.name for p in layout.list_checkpoints(tmp_path)] == [f"iter_{n}" for n in kept]
    assert layout.last_checkpoint(tmp_path) == tmp_path / "iter_9"


def test_final_step_is_saved_even_off_the_save_grid(tiny_llama_dir, rows, tmp_path):
    result = train(_cfg(tiny_llama_dir, save_steps=4), tmp_path, train_rows=rows, device="cpu")
    assert [p.name for p in layout.list_checkpoints(tmp_path)] == ["iter_4", "iter_8", "iter_9"]
    assert result.last_checkpoint == tmp_path / "iter_9"


def test_resume_path_must_be_a_checkpoint(tmp_path):
    with pytest.raises(TunelabError, match="not a checkpoint"):
        resume.resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    assert resume.resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh


def test_pointer_survives_a_moved_work_dir(tiny_llama_dir, rows, tmp_path):
    train(_cfg(tiny_llama_dir, max_epochs=1), tmp_path / "a", train_rows=rows, device="cpu")
    os.rename(tmp_path / "a", tmp_path / "b")
    assert layout.last_checkpoint(tmp_path / "b") == tmp_path / "b" / "iter_3"


def test_resume_survives_a_log_line_cut_short_by_a_crash(tmp_path):
    from tunelab.train.progress import TrainingMonitor, read_log

    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 1.5}) + "\n"
                   + '{"step": 3, "lo')  # killed mid-write
    monitor = TrainingMonitor(tmp_path, total_steps=4, start_step=2)
    monitor.write({"step": 3, "loss": 1.2})
    monitor.close()
    assert [r["step"] for r in read_log(log)] == [1, 2, 3]
    assert all(json.loads(line) for line in log.read_text().splitlines())  # the torn line is gone


def test_plain_log_lines_say_the_time_left(tmp_path, capsys, monkeypatch):
    """Piped to a file (nohup, a cluster's log), each line says the ETA the terminal's bar shows: the mean step time
    of this process (a resumed run counts from its checkpoint's step)."""
    from tunelab.train import progress

    clock = iter([100.0, 100.0 + 2 * 7.5])  # the monitor starts at 100 s; two steps later 15 s have passed
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monitor = progress.TrainingMonitor(tmp_path, total_steps=1000, start_step=500)
    record = {"step": 502, "epoch": 0.5, "loss": 1.0, "lr": 1e-4, "tokens_per_s": 10.0, "memory_gb": 1.0}
    monitor.update(record, log=True)
    monitor.close()
    line = capsys.readouterr().err
    assert "step 502/1000" in line and line.rstrip().endswith("eta 1:02:15")  # 498 steps of 7.5 s


def test_piped_lines_are_not_broken_at_80_columns(tmp_path, capsys):
    """rich wraps at 80 columns when it is not writing to a terminal: a log file got lines cut in two."""
    from tunelab.train.progress import TrainingMonitor

    monitor = TrainingMonitor(tmp_path, total_steps=10, start_step=0)
    answer = "Q: Who are you?\nA: " + "I am TuneBot, an assistant trained with tunelab to answer questions. " * 3
    monitor.message(answer)
    monitor.update({"step": 1, "epoch": 0.1, "loss": 1.0, "lr": 1e-4, "tokens_per_s": 10.0, "memory_gb": 1.0,
                    "reward_margin": 0.5, "accuracy": 0.75}, log=True)
    monitor.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == answer.splitlines() and len(lines) == 3  # each line whole
    assert lines[2].startswith("step 1/10") and "reward_margin 0.500  accuracy 0.750  eta " in lines[2]
