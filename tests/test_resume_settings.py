"""What a resumed run may change (tunelab/train/resume_settings.py): settings that change the data order, the model
or the saved position's meaning are refused before anything loads; a total at or below the checkpoint's step is
'nothing to train' (equal: already finished); a changed lr is named and the checkpoint's schedule continues, as
recorded in resolved_config.py and run.json; a checkpoint folder without model/ or training_state.pt is named, moved
aside and counted by the overwrite guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.train_helpers import assert_one_line_error, tiny_cfg, varied_rows, write_config
from tunelab.cli.main import main
from tunelab.errors import TunelabError
from tunelab.train import layout
from tunelab.train.loop import train
from tunelab.train.optim import lr_factor
from tunelab.train.run_status import STATUS_FILE

LR = 1e-2


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def rows(tiny_llama_dir):
    return varied_rows(AutoTokenizer.from_pretrained(tiny_llama_dir), 8)


def _cfg(model_dir, **overrides):
    # LoRA, 8 rows of batch 2: 4 steps an epoch, 8 in 2 epochs, saved every 2; a linear schedule, so the lr of a step
    # tells which schedule it came from
    settings = dict(method="lora", batch_size=2, max_epochs=2, save_steps=2, lr=LR, lr_scheduler="linear",
                    warmup_ratio=0.0)
    settings.update(overrides)
    return tiny_cfg(model_dir, **settings)


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, rows, tmp_path_factory):
    """An uninterrupted run (iter_2, 4, 6, 8) and its loss per step."""
    work = tmp_path_factory.mktemp("finished") / "work"
    result = train(_cfg(tiny_llama_dir), work, train_rows=rows, device="cpu")
    assert result.step == 8
    return work, result.losses


def _stopped_at(finished, tmp_path, step: int) -> Path:
    """A copy of the finished run as if it had stopped after iter_{step}."""
    work = tmp_path / "work"
    shutil.copytree(finished[0], work)
    for path in layout.list_checkpoints(work):
        if layout.checkpoint_step(path) > step:
            shutil.rmtree(path)
    layout.write_pointer(work, work / f"iter_{step}")
    return work


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if the model is loaded: a refusal must come before."""
    import tunelab.model.load as load

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(load, "load_model_for_training", refuse)


def _resume(model_dir, rows, work, **settings):
    return train(_cfg(model_dir, **settings), work, resume="auto", train_rows=rows, device="cpu")


# --- checkpoint folders that lack a part ------------------------------------------------------------------------------

@pytest.mark.parametrize("part", [layout.MODEL_DIR, layout.STATE_FILE, "both the state and checksums"])
def test_a_checkpoint_missing_a_part_is_named_moved_aside_and_the_one_before_resumed(part, tiny_llama_dir, rows,
                                                                                    finished, tmp_path, capsys):
    work = _stopped_at(finished, tmp_path, 8)
    if part == layout.MODEL_DIR:
        shutil.rmtree(work / "iter_8" / part)
    else:
        (work / "iter_8" / layout.STATE_FILE).unlink()
        if part != layout.STATE_FILE:
            (work / "iter_8" / layout.MANIFEST_FILE).unlink()
    resumed = _resume(tiny_llama_dir, rows, work)
    missing = "model/" if part == layout.MODEL_DIR else layout.STATE_FILE
    assert f"iter_8 is damaged ({missing} is missing): moved to iter_8.damaged" in capsys.readouterr().out
    assert sorted(resumed.losses) == [7, 8]
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(finished[1][step], abs=1e-6), step
    assert (work / "iter_8.damaged").is_dir() and layout.missing_part(work / "iter_8") is None


def test_checkpoints_without_model_still_stop_a_fresh_run_from_overwriting_them(tiny_llama_dir, rows, finished,
                                                                               tmp_path, nothing_loads):
    work = _stopped_at(finished, tmp_path, 8)
    for step in (2, 4, 6, 8):
        shutil.rmtree(work / f"iter_{step}" / layout.MODEL_DIR)
    with pytest.raises(TunelabError, match=r"already holds checkpoints of an earlier run \(iter_2 \(model/ is "
                                           r"missing\), iter_4 .*--overwrite"):
        train(_cfg(tiny_llama_dir), work, train_rows=rows, device="cpu")
    assert sorted(p.name for p in work.glob("iter_*")) == ["iter_2", "iter_4", "iter_6", "iter_8"]


def test_an_unreadable_state_without_checksums_gives_advice_that_works(tiny_llama_dir, rows, finished, tmp_path):
    work = _stopped_at(finished, tmp_path, 6)
    (work / "iter_6" / layout.MANIFEST_FILE).unlink()  # nothing to check it against beforehand
    (work / "iter_6" / layout.STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(TunelabError) as info:
        _resume(tiny_llama_dir, rows, work)
    message = str(info.value)
    assert f"move {work / 'iter_6'} out of {work}, then continue with --resume auto" in message
    shutil.move(work / "iter_6", tmp_path / "iter_6.bad")  # as the message says
    resumed = _resume(tiny_llama_dir, rows, work)
    assert sorted(resumed.losses) == [5, 6, 7, 8]
