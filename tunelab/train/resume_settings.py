"""What a resumed run may change: each checkpoint records its run's settings (tunelab.json's "run"), and a resume
compares them with this config's before the data and the model load.

* Settings that give the data order, the model or the meaning of the saved position another meaning (`FIXED`,
  `LORA` for adapters, `PARTIAL` for what full fine-tuning trains), or the loss another meaning (`PREFERENCE` for a
  preference objective: beta, dpo_loss, ...), are refused, one line per setting that differs: resuming with them
  would re-read the saved micro-batch position in another batch size, load an adapter into another shape, load
  optimiser states into other weights, train on other rows, or minimise another loss from the resumed step on. A
  checkpoint saved before a setting was recorded is not held to it, unless that tunelab had no such setting
  (`ADDED_LATER`: then the run trained with it off).
* The optimiser's and schedule's settings (`SCHEDULE`) are the checkpoint's, as Hugging Face Trainer (and so
  LLaMA-Factory) has it: the scheduler and optimiser states restore them. A changed one is named in a warning and
  replaced by the checkpoint's value, so resolved_config.py, run.json and the board show what the run trains with.
* max_steps / max_epochs decide where the run ends: a total at or below the checkpoint's step leaves nothing to
  train (refused; equal: the run is already finished). A total above or below the checkpoint schedule's own is
  honoured, the schedule redrawn over it from the resumed step (as Trainer does).

A checkpoint of an older tunelab has no record: it resumes with a note that its settings cannot be compared.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tunelab.config.checks import PARTIAL
from tunelab.config.schema import default_value, to_dict
from tunelab.data.reports import counted
from tunelab.errors import TunelabError
from tunelab.train import layout
from tunelab.train.optim import warmup_steps_for

RUN_KEY = "run"
FIXED = ("data_path", "data_format", "dataset_map_fn", "eval_split_ratio", "batch_size", "accumulative_counts",
         "max_length", "rope_scaling", "pack_to_max_length", "shuffle_before_pack", "method", "objective", "optimizer",
         "seed")
LORA = ("lora_r", "lora_alpha", "lora_target_modules", "use_dora", "use_rslora", "lora_bias", "lora_modules_to_save")
# Settings newer than the run record itself: a checkpoint whose record lacks one was saved by a tunelab that did not
# have it, so its run trained with it off, its default (unlike a setting that existed before it was recorded, which
# is unknown).
ADDED_LATER = {key: default_value(key) for key in ("rope_scaling", "loraplus_lr_ratio", "warmup_steps", *PARTIAL)}
PREFERENCE = ("beta", "dpo_loss", "label_smoothing", "simpo_gamma", "kto_desirable_weight", "kto_undesirable_weight")
SCHEDULE = ("lr", "lr_scheduler", "warmup_ratio", "warmup_steps", "weight_decay", "betas", "loraplus_lr_ratio")


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def compared_settings(cfg) -> dict:
    """The settings a resume compares, as JSON values: what a checkpoint records and what this config is held to."""
    values = to_dict(cfg)
    keys = FIXED + SCHEDULE + (LORA if cfg.method != "full" else PARTIAL) + (PREFERENCE if cfg.objective != "sft"
                                                                            else ())
    return {key: _plain(values[key]) for key in keys}


def run_record(cfg, *, step: int, steps_per_epoch: int, total_steps: int, data_ranks: int,
               data_fingerprint: str | None = None) -> dict:
    """tunelab.json's "run" of a checkpoint at `step`: the settings compared on resume, the run's shape, and a
    fingerprint of its training rows (`rows_fingerprint`)."""
    record = {"step": step, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "data_ranks": data_ranks,
              "settings": compared_settings(cfg)}
    if data_fingerprint is not None:
        record[DATA_KEY] = data_fingerprint
    return record


DATA_KEY = "data_fingerprint"


def rows_fingerprint(rows) -> str:
    """A hash of the training rows' tokens, labels and where each row starts (XXH3-64, at memory speed): tells a data
    file edited since the checkpoint even where it gives as many rows, which the steps per epoch cannot. Read from
    TokenRows' flat arrays, so rows given as a list (the API, tests) hash as the same rows packed."""
    import numpy as np
    import xxhash

    from tunelab.data.packing import TokenRows

    if not isinstance(rows, TokenRows):
        rows = TokenRows.from_rows(rows)
    digest = xxhash.xxh3_64()
    for key in sorted(rows.arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(rows.arrays[key]))
    digest.update(np.ascontiguousarray(rows.offsets))
    return digest.hexdigest()


def read_record(checkpoint: Path) -> dict | None:
    meta = layout.read_meta(checkpoint)
    record = (meta or {}).get(RUN_KEY)
    return record if isinstance(record, dict) and isinstance(record.get("settings"), dict) else None


def compare(cfg, checkpoint: Path, *, log=print):
    """(cfg with the checkpoint's `SCHEDULE` values, the checkpoint's record or None); raises TunelabError naming
    every `FIXED` / `LORA` setting that differs."""
    record = read_record(checkpoint)
    if record is None:
        log(f"note: {checkpoint} does not record its run's settings (saved by an older tunelab): they cannot be "
            f"compared with this config's; resume with the config it was trained with")
        return cfg, None
    saved, now = {**ADDED_LATER, **record["settings"]}, compared_settings(cfg)
    changed = [key for key in now if key in saved and saved[key] != now[key]]
    refused = [f"{checkpoint}: {key} was {saved[key]!r} in the checkpoint, is {now[key]!r} now: resume with "
               f"the config the run was trained with, or start a new work dir" for key in changed
               if key not in SCHEDULE]
    if refused:
        raise TunelabError("\n".join(refused))
    kept = {}
    for key in changed:  # SCHEDULE's only, past the refusal
        log(f"warning: {key} was {saved[key]!r} in the checkpoint, is {now[key]!r} now: the checkpoint's "
            f"optimiser and schedule continue with {saved[key]!r} (as Hugging Face Trainer does); to train with "
            f"{now[key]!r}, start a new work dir")
        kept[key] = tuple(saved[key]) if isinstance(getattr(cfg, key), tuple) else saved[key]
    return (dataclasses.replace(cfg, **kept) if kept else cfg), record


def known_steps_per_epoch(record: dict | None, data_ranks: int) -> int | None:
    """The checkpoint's steps per epoch, where this run's are the same (the same data and ranks), else None."""
    if record is None or record.get("data_ranks") != data_ranks:
        return None
    value = record.get("steps_per_epoch")
    return value if isinstance(value, int) and value > 0 else None


def check_data(checkpoint: Path, record: dict | None, *, steps_per_epoch: int, rows: int, data_ranks: int,
               fingerprint: str | None = None, log=print) -> None:
    """Refuse training data that gives another number of steps per epoch than the checkpoint's run had (the same
    data_path, other contents): the saved position would point into another data order. Data edited with as many
    rows is named in a warning: the position still means the same, and fixing rows mid-run is fair, but not unseen."""
    saved = known_steps_per_epoch(record, data_ranks)
    if saved is not None and saved != steps_per_epoch:
        raise TunelabError(f"{checkpoint}: the training data gives {counted(steps_per_epoch, 'step')} per epoch "
                           f"({counted(rows, 'row')}), the run in the checkpoint had {saved}: the data changed since "
                           f"it was saved. Resume with the data the run was trained with, or start a new work dir.")
    before = (record or {}).get(DATA_KEY)
    if fingerprint is not None and before is not None and before != fingerprint:
        log(f"warning: the training data differs from the run in {checkpoint} (its {counted(rows, 'row')} hold other "
            f"tokens or labels than when it was saved; data_path or its file was edited): training goes on with this "
            f"data from the saved position. To continue on the data the run started with, restore it; to start over "
            f"on this data, use --overwrite or another --work-dir.")


def finished_or_refused(checkpoint: Path, step: int, cfg, steps_per_epoch: int) -> bool:
    """True when this config's total steps equal the checkpoint's step (the run is already finished); raises when
    they are fewer (nothing to train); False when there is training left."""
    total = cfg.max_steps or steps_per_epoch * cfg.max_epochs
    if step < 0 or total > step:
        return False
    if total < step:
        raise TunelabError(f"{checkpoint}: nothing to train: the checkpoint is at step {step}, this config trains "
                           f"{counted(total, 'step')} in all ({total_setting(cfg, steps_per_epoch)}). Raise "
                           f"max_steps / max_epochs to train on, or start over with these settings with --overwrite "
                           f"or in another --work-dir.")
    return True


def total_setting(cfg, steps_per_epoch: int) -> str:
    """Which setting gives the run's total, in words. max_steps wins over max_epochs (as in Trainer), so a user who
    raised max_epochs to train on is told that it is not the one that counts."""
    if not cfg.max_steps:
        return f"max_epochs = {cfg.max_epochs} of {counted(steps_per_epoch, 'step')}"
    if cfg.max_epochs * steps_per_epoch == cfg.max_steps:
        return f"max_steps = {cfg.max_steps}"
    return (f"max_steps = {cfg.max_steps} sets the total; max_epochs = {cfg.max_epochs} is not used while max_steps "
            f"is set")


def checkpoint_step_of(checkpoint: Path, record: dict | None) -> int:
    """The step a checkpoint was saved at: its record's, else its iter_N name's (-1: unknown)."""
    if record is not None and isinstance(record.get("step"), int):
        return record["step"]
    return layout.checkpoint_step(checkpoint)


def fit_schedule(state: dict, cfg, total_steps: int) -> int | None:
    """A saved scheduler state made to run over `total_steps` (max_steps / max_epochs changed since the save), as
    Hugging Face Trainer does: the checkpoint's lr and kind of schedule, over this run's length. Returns the saved
    total where it differed (None: unchanged, or a state without the schedule's settings)."""
    saved = [f for f in state.get("lr_lambdas") or [] if isinstance(f, dict) and "total_steps" in f]
    if not saved or saved[0]["total_steps"] == total_steps:
        return None
    before = saved[0]["total_steps"]
    for f in saved:
        f.update(total_steps=total_steps, warmup_steps=warmup_steps_for(cfg, total_steps))
    return before
