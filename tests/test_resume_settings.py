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
from tunelab.train import layout, resume_settings
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


# --- finding 1: a total at or below the checkpoint's step ------------------------------------------------------------

@pytest.mark.parametrize("settings, total", [({"max_steps": 3}, "3 steps in all (max_steps = 3 sets the total"),
                                             ({"max_epochs": 1, "max_steps": None}, "")])
def test_a_run_no_longer_than_the_checkpoint_trains_nothing(settings, total, tiny_llama_dir, rows, finished, tmp_path,
                                                            nothing_loads):
    work = _stopped_at(finished, tmp_path, 4)
    status = (work / STATUS_FILE).read_bytes()
    if total:  # fewer steps than the checkpoint's: an error naming both
        with pytest.raises(TunelabError, match=rf"iter_4: nothing to train: the checkpoint is at step 4, this config "
                                               rf"trains {total.replace('(', '[(]').replace(')', '[)]')}"):
            _resume(tiny_llama_dir, rows, work, **settings)
    else:  # as many (1 epoch of 4 steps): finished already, nothing trained
        result = _resume(tiny_llama_dir, rows, work, **settings)
        assert result.already_finished and result.step == 4 and result.losses == {}
    assert (work / STATUS_FILE).read_bytes() == status  # run.json does not claim a run that never happened


def test_resuming_a_finished_run_says_so_and_trains_nothing(tiny_llama_dir, rows, finished, tmp_path, capsys):
    work = _stopped_at(finished, tmp_path, 8)
    log, status = (work / "train_log.jsonl").read_text(), (work / STATUS_FILE).read_bytes()
    result = _resume(tiny_llama_dir, rows, work)
    assert result.already_finished and result.step == 8 and result.losses == {}
    assert "is the last step (8) of this config's run (max_epochs = 2 of 4 steps): it is already finished" \
        in capsys.readouterr().out
    assert (work / "train_log.jsonl").read_text() == log and (work / STATUS_FILE).read_bytes() == status


def test_raising_max_epochs_while_max_steps_decides_says_so(tiny_llama_dir, rows, finished, tmp_path, capsys):
    """A user who raises max_epochs to train longer (as in LLaMA-Factory or XTuner) but has max_steps set is told
    that max_steps decides the total, not only that the run is finished."""
    work = _stopped_at(finished, tmp_path, 8)
    result = _resume(tiny_llama_dir, rows, work, max_steps=8, max_epochs=5)
    assert result.already_finished and result.losses == {}
    out = capsys.readouterr().out
    assert "max_steps = 8 sets the total" in out and "max_epochs = 5 is not used" in out, out
    with pytest.raises(TunelabError, match=r"max_steps = 6 sets the total.*max_epochs = 5 is not used"):
        _resume(tiny_llama_dir, rows, work, max_steps=6, max_epochs=5)


def test_edited_data_with_as_many_rows_is_named_in_a_warning(tiny_llama_dir, rows, finished, tmp_path, capsys):
    """The same data_path with other contents but as many rows keeps the steps per epoch: training goes on (fixing a
    typo in the data is a fair thing to do mid-run), but never without the user being told."""
    work = _stopped_at(finished, tmp_path, 4)
    edited = [dict(row, input_ids=list(reversed(row["input_ids"]))) for row in rows]
    result = _resume(tiny_llama_dir, edited, work, max_epochs=3)
    assert sorted(result.losses) == list(range(5, 13))
    out = capsys.readouterr().out
    assert "warning: the training data differs from the run in" in out and "iter_4" in out, out

    work = _stopped_at(finished, tmp_path / "same", 4)
    _resume(tiny_llama_dir, rows, work, max_epochs=3)
    assert "training data differs" not in capsys.readouterr().out


def test_the_data_fingerprint_is_of_the_rows_not_of_how_they_are_held(rows):
    """`tunelab train` gives TokenRows (flat arrays), the API a list of dicts: the same rows give the same fingerprint
    either way, and rows that only split the same tokens at another place give another."""
    from tunelab.data.packing import TokenRows

    assert resume_settings.rows_fingerprint(TokenRows.from_rows(rows)) == resume_settings.rows_fingerprint(rows)
    first, second = rows[0], rows[1]
    joined = {k: first[k] + second[k] for k in ("input_ids", "labels", "position_ids")}
    moved = {k: first[k][:-1] for k in ("input_ids", "labels", "position_ids")}, \
        {k: first[k][-1:] + second[k] for k in ("input_ids", "labels", "position_ids")}
    assert resume_settings.rows_fingerprint([joined, *rows[2:]]) != resume_settings.rows_fingerprint(rows)
    assert resume_settings.rows_fingerprint([*moved, *rows[2:]]) != resume_settings.rows_fingerprint(rows)


def test_other_data_under_the_same_name_is_refused(tiny_llama_dir, rows, finished, tmp_path):
    work = _stopped_at(finished, tmp_path, 4)
    with pytest.raises(TunelabError, match=r"iter_4: the training data gives 2 steps per epoch \(4 rows\), the run "
                                           r"in the checkpoint had 4: the data changed"):
        train(_cfg(tiny_llama_dir), work, resume="auto", train_rows=rows[:4], device="cpu")


def test_an_older_checkpoint_without_settings_resumes_with_a_note_and_the_total_is_still_checked(
        tiny_llama_dir, rows, finished, tmp_path, capsys):
    work = _stopped_at(finished, tmp_path, 4)
    for path in layout.list_checkpoints(work):  # as an older tunelab saved them
        meta = layout.read_meta(path)
        del meta["run"]
        layout.write_meta(path, meta)
    with pytest.raises(TunelabError, match=r"nothing to train: the checkpoint is at step 4, this config trains 2 "):
        train(_cfg(tiny_llama_dir), work, resume="auto", train_rows=rows[:2], device="cpu")  # 1 step an epoch
    assert "does not record its run's settings (saved by an older tunelab)" in capsys.readouterr().out
    resumed = _resume(tiny_llama_dir, rows, work)
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(finished[1][step], abs=1e-6), step


# --- finding 2 (and 4): settings that differ from the checkpoint's ---------------------------------------------------

@pytest.mark.parametrize("key, value, was", [("batch_size", 4, 2), ("accumulative_counts", 2, 1), ("seed", 1, 0),
                                             ("method", "full", "'lora'"), ("lora_r", 4, 8), ("max_length", 64, 128),
                                             ("data_path", "other.json", "'tatsu-lab/alpaca'")])
def test_a_setting_that_changes_the_data_order_or_the_model_is_refused_before_anything_loads(
        key, value, was, tiny_llama_dir, rows, finished, tmp_path, nothing_loads):
    work = _stopped_at(finished, tmp_path, 4)
    resolved = (work / layout.RESOLVED_CONFIG).read_text()
    with pytest.raises(TunelabError) as info:
        _resume(tiny_llama_dir, rows, work, **{key: value})
    assert str(info.value) == (f"{work / 'iter_4'}: {key} was {was} in the checkpoint, is {value!r} now: resume with "
                               f"the config the run was trained with, or start a new work dir")
    assert (work / layout.RESOLVED_CONFIG).read_text() == resolved  # the settings of a run that never happened: not
    assert [p.name for p in layout.list_checkpoints(work)] == ["iter_2", "iter_4"]


def test_every_differing_setting_gets_its_line(tiny_llama_dir, rows, finished, tmp_path, nothing_loads):
    work = _stopped_at(finished, tmp_path, 4)
    with pytest.raises(TunelabError) as info:
        _resume(tiny_llama_dir, rows, work, batch_size=4, seed=3)
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and "batch_size was 2" in lines[0] and "seed was 0" in lines[1]


def test_a_changed_lr_is_named_and_the_checkpoints_schedule_continues(tiny_llama_dir, rows, finished, tmp_path,
                                                                     capsys):
    work = _stopped_at(finished, tmp_path, 4)
    resumed = _resume(tiny_llama_dir, rows, work, lr=0.5)
    assert "warning: lr was 0.01 in the checkpoint, is 0.5 now: the checkpoint's optimiser and schedule continue " \
           "with 0.01" in capsys.readouterr().out
    for step, loss in resumed.losses.items():  # the uninterrupted run's steps
        assert loss == pytest.approx(finished[1][step], abs=1e-6), step
    assert "lr = 0.01" in (work / layout.RESOLVED_CONFIG).read_text()  # what the run used, not the ignored 0.5
    assert json.loads((work / STATUS_FILE).read_text())["settings"]["lr"] == LR
    assert layout.read_meta(work / "iter_8")["run"]["settings"]["lr"] == LR


def test_a_longer_run_redraws_the_schedule_over_its_total(tiny_llama_dir, rows, finished, tmp_path, capsys):
    work = _stopped_at(finished, tmp_path, 8)
    resumed = _resume(tiny_llama_dir, rows, work, max_epochs=3)  # 12 steps: 4 more, not at lr 0
    assert sorted(resumed.losses) == [9, 10, 11, 12] and not resumed.already_finished
    assert "note: this config trains 12 steps in all, the checkpoint's 8 steps: its linear schedule is redrawn " \
           "over 12 steps" in capsys.readouterr().out
    logged = {r["step"]: r["lr"] for r in map(json.loads, (work / "train_log.jsonl").read_text().splitlines())
              if "lr" in r}
    for step in (9, 12):
        expected = LR * lr_factor(step - 1, total_steps=12, warmup_steps=0, kind="linear")
        assert logged[step] == pytest.approx(expected) and expected > 0, step


def test_the_cli_refuses_a_shorter_run_and_says_a_finished_one_is_finished(tiny_llama_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_llama_dir, max_steps=2)
    work = tmp_path / "work"
    args = ["train", str(config), "--work-dir", str(work), "--device", "cpu", "--resume", "auto"]
    assert main(args) == 0
    capsys.readouterr()
    assert_one_line_error(capsys, main(args + ["--cfg-options", "max_steps=1"]), "nothing to train", "step 2",
                          "1 step in all")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "already finished at step 2: nothing trained" in out and "done:" not in out


# --- finding 3: checkpoint folders that lack a part ------------------------------------------------------------------

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


def test_a_changed_preference_loss_setting_is_refused_and_an_older_record_without_them_resumes(tmp_path):
    # the run would go on minimising another loss (DPO sigmoid at 0.6, then IPO at 23 from the resumed step)
    import dataclasses

    from tunelab.config.schema import TrainConfig
    from tunelab.train.resume_settings import compare, run_record

    cfg = TrainConfig(objective="dpo", beta=0.1)
    checkpoint = tmp_path / "iter_3"
    checkpoint.mkdir()
    record = run_record(cfg, step=3, steps_per_epoch=3, total_steps=6, data_ranks=1)
    (checkpoint / layout.META_FILE).write_text(json.dumps({"run": record}))
    for key, value, was in (("dpo_loss", "ipo", "'sigmoid'"), ("beta", 0.5, "0.1")):
        with pytest.raises(TunelabError, match=rf"iter_3: {key} was {was} in the checkpoint, is {value!r} now"):
            compare(dataclasses.replace(cfg, **{key: value}), checkpoint, log=lambda m: None)
    for key in ("beta", "dpo_loss", "label_smoothing"):  # saved before they were recorded: not compared
        del record["settings"][key]
    (checkpoint / layout.META_FILE).write_text(json.dumps({"run": record}))
    assert compare(dataclasses.replace(cfg, beta=0.5), checkpoint, log=lambda m: None)[0].beta == 0.5


def test_training_md_names_every_setting_a_resume_compares():
    """docs/TRAINING.md, "What a resume may change", lists what is refused and what is the checkpoint's: every setting
    the code compares, so a new one cannot be held to silently."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    section = docs.split("* **What a resume may change.**")[1].split("* **Checksums.**")[0]
    compared = (resume_settings.FIXED + resume_settings.LORA + resume_settings.PARTIAL + resume_settings.PREFERENCE
                + resume_settings.SCHEDULE)
    assert [key for key in compared if f"`{key}`" not in section] == []
