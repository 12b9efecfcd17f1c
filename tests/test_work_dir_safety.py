"""No tunelab command loses a run's work: resume finds the newest sound checkpoint whatever `last_checkpoint` says
(also in a copied work dir), a damaged checkpoint is set aside by its checksums, a start that would overwrite
checkpoints is refused unless --overwrite, and one run at a time trains in a work dir (a killed one does not leave it
locked)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.train_helpers import assert_one_line_error, child_env, tiny_cfg, varied_rows, write_config
from tunelab.cli.main import main
from tunelab.errors import TunelabError
from tunelab.train import checksums, layout
from tunelab.train.loop import train
from tunelab.train.workdir_lock import hold_work_dir


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))  # tokenised data of the config files


@pytest.fixture(scope="module")
def rows(tiny_llama_dir):
    return varied_rows(AutoTokenizer.from_pretrained(tiny_llama_dir), 11)


def _cfg(model_dir, **overrides):
    # LoRA with dropout (resume must restore the RNG), 6 steps of one micro-batch, a constant learning rate (so a run
    # cut short and one resumed to its end follow the same schedule); saves at steps 2, 4 and 6.
    settings = dict(method="lora", lora_dropout=0.1, max_steps=6, save_steps=2, save_total_limit=-1, lr=1e-2)
    settings.update(overrides)
    return tiny_cfg(model_dir, **settings)


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, rows, tmp_path_factory):
    """An uninterrupted run: its work dir (iter_2, iter_4, iter_6) and its loss per step."""
    work = tmp_path_factory.mktemp("finished") / "work"
    result = train(_cfg(tiny_llama_dir), work, train_rows=rows, device="cpu")
    return work, result.losses


def _crashed_copy(finished, tmp_path) -> Path:
    """The finished run as if it had died after saving iter_4 (iter_6 never written)."""
    work = tmp_path / "work"
    shutil.copytree(finished[0], work)
    shutil.rmtree(work / "iter_6")
    return work


def _logged_steps(work: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (work / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def _resume(model_dir, rows, work, **kwargs):
    return train(_cfg(model_dir), work, resume=kwargs.pop("resume", "auto"), train_rows=rows, device="cpu", **kwargs)


@pytest.mark.parametrize("pointer", ["missing", "the original's absolute path", "an older checkpoint"])
def test_resume_takes_the_newest_checkpoint_whatever_the_pointer_says(pointer, tiny_llama_dir, rows, finished,
                                                                        tmp_path):
    original, reference = finished
    work = _crashed_copy(finished, tmp_path)  # a copy, so also: a copied work dir reads its own checkpoints
    assert (work / layout.POINTER_FILE).read_text().strip() == "iter_6"  # a name, not a path: it names nothing now
    if pointer == "missing":
        (work / layout.POINTER_FILE).unlink()
    elif pointer == "the original's absolute path":  # what older versions wrote: it must not lead to the original
        (work / layout.POINTER_FILE).write_text(str(original / "iter_6"))
    else:
        (work / layout.POINTER_FILE).write_text("iter_2")
    original_state = (original / "iter_6" / layout.STATE_FILE).read_bytes()

    resumed = _resume(tiny_llama_dir, rows, work)
    assert sorted(resumed.losses) == [5, 6]
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step
    assert _logged_steps(work) == [1, 2, 3, 4, 5, 6]  # the log of steps 1-4 was kept, not wiped
    assert (original / "iter_6" / layout.STATE_FILE).read_bytes() == original_state  # the original is untouched
    assert layout.last_checkpoint(work) == work / "iter_6"


def test_a_pointer_that_is_not_a_file_is_refused_before_any_training(tiny_llama_dir, rows, finished, tmp_path):
    work = _crashed_copy(finished, tmp_path)
    (work / layout.POINTER_FILE).unlink()
    (work / layout.POINTER_FILE).mkdir()  # every save would fail to point at itself, after the steps were trained
    log_before = (work / "train_log.jsonl").read_text()
    with pytest.raises(TunelabError, match=r"last_checkpoint is not a file.*Move it out of the work dir"):
        _resume(tiny_llama_dir, rows, work)
    assert (work / "train_log.jsonl").read_text() == log_before
    assert [p.name for p in layout.list_checkpoints(work)] == ["iter_2", "iter_4"]


def test_starting_from_step_0_over_checkpoints_is_refused_until_overwrite(tiny_llama_dir, rows, finished, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(finished[0], work)
    log_before = (work / "train_log.jsonl").read_text()
    with pytest.raises(TunelabError) as info:
        train(_cfg(tiny_llama_dir), work, train_rows=rows, device="cpu")
    message = str(info.value)
    assert "iter_2, iter_4, iter_6" in message and "--resume auto" in message and "--overwrite" in message
    assert (work / "train_log.jsonl").read_text() == log_before  # nothing was touched
    assert [p.name for p in layout.list_checkpoints(work)] == ["iter_2", "iter_4", "iter_6"]

    result = train(_cfg(tiny_llama_dir, max_steps=2), work, overwrite=True, train_rows=rows, device="cpu")
    assert result.step == 2
    assert [p.name for p in layout.list_checkpoints(work)] == ["iter_2"]  # the old run's checkpoints are gone
    assert _logged_steps(work) == [1, 2]


def test_the_cli_refuses_in_one_line_and_overwrite_goes_ahead(tiny_llama_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_llama_dir, max_steps=1)
    work = tmp_path / "work"
    assert main(["train", str(config), "--work-dir", str(work), "--device", "cpu"]) == 0
    capsys.readouterr()
    code = main(["train", str(config), "--work-dir", str(work), "--device", "cpu"])
    assert_one_line_error(capsys, code, "already holds checkpoints", "iter_1", "--resume auto", "--overwrite")
    assert main(["train", str(config), "--work-dir", str(work), "--device", "cpu", "--overwrite"]) == 0
    assert "--overwrite: deleted iter_1" in capsys.readouterr().out


def test_resuming_an_older_checkpoint_refuses_to_overwrite_newer_ones(tiny_llama_dir, rows, finished, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(finished[0], work)
    with pytest.raises(TunelabError, match=r"newer than iter_2 \(iter_4, iter_6\).*--overwrite"):
        _resume(tiny_llama_dir, rows, work, resume=str(work / "iter_2"))
    resumed = _resume(tiny_llama_dir, rows, work, resume=str(work / "iter_2"), overwrite=True)
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(finished[1][step], abs=1e-6), step


def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_resumed(tiny_llama_dir, rows, finished, tmp_path,
                                                                      capsys):
    work = tmp_path / "work"
    shutil.copytree(finished[0], work)
    weights = work / "iter_6" / layout.MODEL_DIR / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors: still loads, as other numbers
    weights.write_bytes(bytes(data))

    with pytest.raises(TunelabError, match=r"iter_6 is damaged: model/adapter_model\.safetensors does not match"):
        _resume(tiny_llama_dir, rows, work, resume=str(work / "iter_6"))  # asked for by name: refused, not skipped
    resumed = _resume(tiny_llama_dir, rows, work)
    out = capsys.readouterr().out
    assert "iter_6 is damaged (model/adapter_model.safetensors does not match its checksum)" in out
    assert "moved to iter_6.damaged" in out
    assert (work / "iter_6.damaged" / layout.MODEL_DIR / "adapter_model.safetensors").read_bytes() == bytes(data)
    assert sorted(resumed.losses) == [5, 6]  # from iter_4, with the losses of the uninterrupted run
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(finished[1][step], abs=1e-6), step
    assert checksums.verify_checkpoint(work / "iter_6") is None  # saved again, sound


def test_checksums_list_every_file_but_the_editable_metadata(finished, tmp_path):
    ckpt = tmp_path / "iter_4"
    shutil.copytree(finished[0] / "iter_4", ckpt)
    listed = json.loads((ckpt / layout.MANIFEST_FILE).read_text())["files"]
    assert {"model/adapter_model.safetensors", "model/adapter_config.json", layout.STATE_FILE} <= set(listed)
    assert layout.META_FILE not in listed
    assert checksums.verify_checkpoint(ckpt) is None
    assert layout.read_meta(ckpt)["model_type"] == "llama"  # what merge checks an adapter's base against
    (ckpt / layout.META_FILE).write_text(json.dumps({**layout.read_meta(ckpt), "system": "edited by hand"}))
    assert checksums.verify_checkpoint(ckpt) is None
    with open(ckpt / layout.STATE_FILE, "r+b") as f:
        f.truncate(100)  # a copy cut short
    assert "training_state.pt has 100 bytes" in checksums.verify_checkpoint(ckpt)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from tunelab.train.workdir_lock import hold_work_dir
with hold_work_dir(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_one_run_per_work_dir_and_a_killed_run_leaves_it_free(tiny_llama_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_llama_dir, max_steps=1)
    work = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(work)], stdout=subprocess.PIPE, text=True,
                              env=child_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["train", str(config), "--work-dir", str(work), "--device", "cpu"])
        assert_one_line_error(capsys, code, f"{work} is in use by another training run",
                              f"pid {holder.pid} on {socket.gethostname()}", "another --work-dir")
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # as a crash or the OOM killer would: no clean-up runs
        holder.wait()
    assert main(["train", str(config), "--work-dir", str(work), "--device", "cpu"]) == 0
    assert (work / "iter_1").is_dir()


def test_the_lock_is_released_when_training_fails(tiny_llama_dir, tmp_path):
    with hold_work_dir(tmp_path / "work"):
        with pytest.raises(TunelabError, match=f"pid {os.getpid()}"):  # the same process, another open: refused
            train(tiny_cfg(tiny_llama_dir), tmp_path / "work", train_rows=[], device="cpu")
    with pytest.raises(TunelabError, match="too few to train on"):
        train(tiny_cfg(tiny_llama_dir), tmp_path / "work", train_rows=[], device="cpu")
    with hold_work_dir(tmp_path / "work"):  # free again after the failure
        time.sleep(0)
