"""inf / NaN never reach a checkpoint: settings refuse them, a step with a non-finite loss or gradient stops the run
before anything is saved (or is skipped, with nonfinite = 'skip'), weights that became non-finite are not saved, and
save_total_limit never prunes the last good checkpoint to make room."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.train_helpers import assert_one_line_error, tiny_cfg, varied_rows, write_config
from tunelab.cli.main import main
from tunelab.config.loader import load_config
from tunelab.config.checks import check_setting, combination_errors
from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError
from tunelab.train import layout, run_status
from tunelab.train.checksums import verify_checkpoint
from tunelab.train.loop import train
from tunelab.train.nonfinite import NonFiniteGuard
from tunelab.train.strategy import SingleProcess


@pytest.fixture(scope="module")
def rows(tiny_llama_dir):
    return varied_rows(AutoTokenizer.from_pretrained(tiny_llama_dir), 11)


def _cfg(model_dir, **overrides):
    settings = dict(method="lora", max_steps=4, save_steps=1, save_total_limit=1)
    settings.update(overrides)
    return tiny_cfg(model_dir, **settings)


def _nan_loss_on_steps(monkeypatch, steps):
    """The loss of these steps' forward (one micro-batch a step) turns NaN, as an overflow would; so do its grads."""
    calls = {"n": 0}
    original = SingleProcess.forward_loss

    def forward_loss(self, batch):
        calls["n"] += 1
        loss_sum, n = original(self, batch)
        return (loss_sum * float("nan"), n) if calls["n"] in steps else (loss_sum, n)

    monkeypatch.setattr(SingleProcess, "forward_loss", forward_loss)


def _adapter(checkpoint):
    return load_file(checkpoint / layout.MODEL_DIR / "adapter_model.safetensors")


@pytest.mark.parametrize("key, value", [("lr", 1e999), ("lr", float("nan")), ("max_norm", float("inf")),
                                        ("warmup_ratio", float("nan")), ("betas", (0.9, float("inf")))])
def test_settings_refuse_inf_and_nan(key, value):
    _, error = check_setting(key, value, "cfg.py", 3)
    assert error and f"cfg.py: '{key}' (line 3) must be a finite number" in error


def test_cfg_options_refuse_an_infinite_lr_and_a_seed_numpy_cannot_take(tmp_path, tiny_llama_dir):
    config = write_config(tmp_path, tiny_llama_dir)
    with pytest.raises(TunelabError, match=r"--cfg-options: 'lr' must be a finite number; got inf"):
        load_config(config, ["lr=1e999"])
    with pytest.raises(TunelabError, match=r"'seed' must be a whole number from 0 to 2\*\*32 - 1"):
        load_config(config, [f"seed={2**70}"])
    assert load_config(config, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_nonfinite_is_stop_or_skip_and_skip_is_not_offered_with_deepspeed():
    assert check_setting("nonfinite", "stop", "cfg.py")[1] is None
    assert "'stop'" in check_setting("nonfinite", "skipp", "cfg.py")[1]
    errors = combination_errors(TrainConfig(nonfinite="skip", deepspeed="zero2"))
    assert errors and "nonfinite = 'stop'" in errors[0]


def test_a_nan_loss_stops_the_run_before_saving_and_keeps_the_last_good_checkpoint(tiny_llama_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    config = write_config(tmp_path, tiny_llama_dir, max_steps=4, save_steps=1, save_total_limit=1)
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    _nan_loss_on_steps(monkeypatch, {3})
    code = main(["train", str(config), "--work-dir", str(tmp_path / "work"), "--device", "cpu"])
    assert_one_line_error(capsys, code, "step 3: loss nan", "training stopped before saving it",
                          "iter_2", "is intact", "nonfinite = 'skip'", "--resume auto")
    work = tmp_path / "work"
    assert [p.name for p in layout.list_checkpoints(work)] == ["iter_2"]  # save_total_limit=1 kept the good one
    assert verify_checkpoint(work / "iter_2") is None
    assert all(torch.isfinite(t).all() for t in _adapter(work / "iter_2").values())
    log = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # the NaN step is not logged as a result
    assert run_status.read_status(work)["state"] == "failed"


def test_skip_leaves_the_weights_alone_for_that_step_and_goes_on(tiny_llama_dir, rows, tmp_path, monkeypatch,
                                                                  capsys):
    _nan_loss_on_steps(monkeypatch, {3})
    result = train(_cfg(tiny_llama_dir, nonfinite="skip", save_total_limit=-1), tmp_path, train_rows=rows,
                   device="cpu")
    assert result.step == 4
    assert "warning: step 3: loss nan" in capsys.readouterr().out
    before, after = _adapter(tmp_path / "iter_2"), _adapter(tmp_path / "iter_3")
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 3 changed nothing
    last = _adapter(tmp_path / "iter_4")
    assert all(torch.isfinite(t).all() for t in last.values())
    assert any(not torch.equal(after[k], last[k]) for k in after)  # step 4 trained again
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 4]
    assert log[-1]["skipped_steps"] == 1


def test_a_run_whose_last_steps_are_skipped_logs_its_end(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The last step reaches train_log.jsonl (with skipped_steps, without a loss: none was trained since the line
    before), run.json says 'finished', the board shows the last step and the done line counts the skipped steps."""
    from tunelab.board.runs import run_summary

    config = write_config(tmp_path, tiny_llama_dir, max_steps=4, save_steps=100, logging_steps=2, nonfinite="skip")
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    _nan_loss_on_steps(monkeypatch, {3, 4})
    work = tmp_path / "work"
    assert main(["train", str(config), "--work-dir", str(work), "--device", "cpu"]) == 0
    log = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert log[-1]["step"] == 4 and log[-1]["skipped_steps"] == 2 and "loss" not in log[-1], log[-1]
    assert run_status.read_status(work)["state"] == "finished"
    assert run_summary(work)["step"] == 4
    assert "done: 4 steps (2 skipped: an inf / NaN loss or gradients)" in capsys.readouterr().out


def test_skip_stops_after_ten_non_finite_steps_in_a_row(tiny_llama_dir, rows, tmp_path, monkeypatch):
    _nan_loss_on_steps(monkeypatch, set(range(2, 20)))
    with pytest.raises(TunelabError, match=r"10 steps in a row up to step 11"):
        train(_cfg(tiny_llama_dir, nonfinite="skip", max_steps=15, save_steps=100), tmp_path, train_rows=rows,
              device="cpu")
    assert layout.list_checkpoints(tmp_path) == []


def test_weights_that_turned_infinite_are_not_saved(tiny_llama_dir, rows, tmp_path, monkeypatch):
    """A step with a finite loss and gradient norm whose update overflows the weights (a huge lr): the check at
    saving catches what the step's numbers could not show."""
    original = SingleProcess.step
    steps = {"n": 0}

    def step(self, *args, **kwargs):
        norm = original(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 2:
            with torch.no_grad():
                next(p for p in self.module.parameters() if p.requires_grad).fill_(float("inf"))
        return norm

    monkeypatch.setattr(SingleProcess, "step", step)
    with pytest.raises(TunelabError, match="step 2: the trained weights hold inf or NaN, so no checkpoint was saved"):
        train(_cfg(tiny_llama_dir), tmp_path, train_rows=rows, device="cpu")
    assert [p.name for p in layout.list_checkpoints(tmp_path)] == ["iter_1"]
    assert not layout.partial_saves(tmp_path)


def test_fp16_loss_scaling_overflow_is_not_a_failure():
    """Under fp16 the scaler skips a step whose gradients overflowed and lowers its scale: normal, not a stop."""
    guard = NonFiniteGuard("stop", scaled=True, say=lambda m: None)
    assert guard.check(5, 1.25, float("inf"), lr=1e-4, last=None)
    with pytest.raises(TunelabError, match="step 6: loss nan"):
        guard.check(6, float("nan"), float("inf"), lr=1e-4, last=None)
