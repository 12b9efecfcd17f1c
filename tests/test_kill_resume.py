"""Fault injection: `kill -9` a CPU training at random moments, mid-step and mid-save, many times, resuming with
`--resume auto` after each; the final adapter must be bit-identical to an uninterrupted run's, and the log must hold
every step once with the same losses. This is what a crash, the OOM killer or a pre-empted machine does to a run.

CI kills twice (once mid-save, once mid-step): each kill costs a process start. The 15-kill run takes several minutes
on two cores: `TUNELAB_MANY_KILLS=1 python -m pytest tests/test_kill_resume.py`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train_helpers import child_env, write_config
from tunelab.train import layout

STEPS = 24


def _command(config: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "tunelab", "train", str(config), "--work-dir", str(work), "--device", "cpu",
            "--resume", "auto"]


def _env(cache: Path) -> dict:
    # One thread: the same reduction order in every process, so resumed and uninterrupted runs agree bit for bit.
    return child_env(TUNELAB_CACHE=str(cache), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _logged_steps(work: Path) -> int:
    path = work / "train_log.jsonl"
    return path.read_text().count('"loss"') if path.is_file() else 0


def _kill_at_a_random_moment(proc: subprocess.Popen, work: Path, mid_save: bool, rng: random.Random) -> bool:
    """Wait for training to be under way, then SIGKILL it mid-save (a checkpoint being written) or mid-step (a
    random moment after a step). False when the run finished first."""
    start, deadline, under_way = _logged_steps(work), time.monotonic() + 300, False
    while proc.poll() is None and time.monotonic() < deadline:
        under_way = under_way or _logged_steps(work) > start  # this process has trained a step
        if under_way and not mid_save:
            time.sleep(rng.uniform(0, 0.3))
            break
        if under_way and any(work.glob("iter_*.tmp")):
            time.sleep(rng.uniform(0, 0.005))
            break
        time.sleep(0.001)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def _state(work: Path) -> str:
    """What a kill left: the checkpoints, and a save cut short if there is one."""
    names = [p.name for p in layout.list_checkpoints(work)] + [p.name for p in work.glob("iter_*.tmp")]
    return ",".join(names)


def _final_adapter(work: Path) -> dict:
    return load_file(work / f"iter_{STEPS}" / layout.MODEL_DIR / "adapter_model.safetensors")


def _losses(work: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _kill_and_resume(config: Path, tmp_path: Path, kills: int) -> list[str]:
    """Train into tmp_path/killed with --resume auto, killing the first `kills` runs (mid-save and mid-step in
    turn), then let one run finish; returns where each kill landed."""
    work, rng, done, where = tmp_path / "killed", random.Random(25), 0, []
    for attempt in range(3 * kills + 10):
        log = tmp_path / f"run{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(_command(config, work), env=_env(tmp_path / "cache"), stdout=out,
                                    stderr=subprocess.STDOUT)
            mid_save = done % 2 == 0
            if done < kills and _kill_at_a_random_moment(proc, work, mid_save, rng):
                done += 1
                where.append(f"{'mid-save' if mid_save else 'mid-step'}: {_state(work)}")
                continue
            proc.wait(timeout=300)
        assert proc.returncode == 0, log.read_text()[-3000:]
        break
    assert done == kills, where
    assert "resumed from" in log.read_text(), where  # the last run continued from a checkpoint, not from step 0
    return where


@pytest.mark.slow
@pytest.mark.parametrize("kills", [
    2,
    pytest.param(15, marks=pytest.mark.skipif(not os.environ.get("TUNELAB_MANY_KILLS"),
                                              reason="minutes: set TUNELAB_MANY_KILLS=1 to run it")),
])
def test_kill_9_at_random_moments_and_resume_gives_the_uninterrupted_adapter(kills, tiny_llama_dir, tmp_path):
    # a save every other step: kills land in saves and in steps that are redone after resuming; pruning runs too
    config = write_config(tmp_path, tiny_llama_dir, max_steps=STEPS, max_epochs=STEPS, save_steps=2,
                          save_total_limit=2, lora_dropout=0.1)
    # the uninterrupted run goes on alongside the killed ones, with a data cache of its own (one writer a cache)
    reference, reference_log = tmp_path / "reference", tmp_path / "reference.log"
    with open(reference_log, "w") as out:
        uninterrupted = subprocess.Popen(_command(config, reference), env=_env(tmp_path / "cache_reference"),
                                         stdout=out, stderr=subprocess.STDOUT)
    try:
        work, where = tmp_path / "killed", _kill_and_resume(config, tmp_path, kills)
        uninterrupted.wait(timeout=300)
    finally:
        uninterrupted.kill()  # a no-op once it has finished
    assert uninterrupted.returncode == 0, reference_log.read_text()[-3000:]

    print("kills:", *where, sep="\n  ")  # shown when the test fails
    expected = _final_adapter(reference)
    actual = _final_adapter(work)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), (name, where)
    assert _losses(work) == _losses(reference)  # every step logged once, with the same loss
    assert [p.name for p in layout.list_checkpoints(work)] == [f"iter_{STEPS - 2}", f"iter_{STEPS}"]
    assert not list(work.glob("iter_*.tmp")) and not list(work.glob("iter_*.damaged*"))
