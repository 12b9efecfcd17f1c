"""Where a run starts, and resuming from there (checkpoints are written by `checkpoint.py`, their file names are in
`layout.py`; what a resume may change of the run's settings: `resume_settings.py`).

`choose_start` decides on rank 0, before anything is loaded: `--resume auto` takes the newest checkpoint whose
checksums hold (a damaged one is moved aside, named), and a run refuses to start where it would overwrite checkpoints
it does not continue from, unless told to (`overwrite`); saves a kill left half-written (`iter_N.tmp/`) are removed.
Then resume reads back the training state (`torch.load(weights_only=True)`: no pickled code runs), this rank's RNG
state and the trained weights (adapter or full model); a file that does not read, or weights of another shape than
this config's model, stop the run naming the fix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.train import layout, resume_settings
from tunelab.train.checksums import verify_checkpoint
from tunelab.train.layout import (MANIFEST_FILE, MODEL_DIR, STATE_FILE, checkpoint_step, last_checkpoint,
                                  newest_checkpoint)


def resolve_resume(resume: str | None, work_dir: Path) -> Path | None:
    """`--resume auto` → the newest complete checkpoint in the work dir (None: start fresh); a path → that one.
    (Checksums are not read here: `choose_start` verifies.)"""
    if not resume:
        return None
    if resume == "auto":
        return newest_checkpoint(work_dir)
    path = Path(resume)
    if layout.is_checkpoint(path):
        return path
    newest = newest_checkpoint(path) if path.is_dir() else None
    if newest is not None:  # a work dir was given: take its newest checkpoint
        return newest
    raise TunelabError(f"--resume {resume}: not a checkpoint (expected a directory like WORK_DIR/iter_500 holding "
                       f"{MODEL_DIR}/). Use --resume auto to continue from the last one in the work dir.")


def choose_start(work_dir: Path, resume: str | None, *, overwrite: bool, env, log=print) -> Path | None:
    """The checkpoint this run continues from (None: step 0), decided on rank 0 before anything is loaded, and the
    work dir made ready for it; every rank gets the same answer.

    `--resume auto` takes the newest checkpoint whose checksums hold (the `last_checkpoint` pointer is not read):
    one that fails is moved to iter_N.damaged and named. Checkpoints newer than the start would be overwritten as
    the run goes on: that is refused unless `overwrite`, which deletes them first.
    """
    start = _choose_on_main(Path(work_dir), resume, overwrite=overwrite, log=log) if env.is_main else None
    if not env.distributed:
        return start
    from tunelab.train.distributed import all_reduce_sum

    mine = [float(start is not None), float(checkpoint_step(start)) if start is not None else 0.0]
    found, step = all_reduce_sum(torch.tensor(mine if env.is_main else [0.0, 0.0], device=env.device), env).tolist()
    if env.is_main or not found:
        return start
    return layout.checkpoint_dir(work_dir, int(step)) if resume == "auto" else resolve_resume(resume, work_dir)


def _choose_on_main(work_dir: Path, resume: str | None, *, overwrite: bool, log) -> Path | None:
    pointer = work_dir / layout.POINTER_FILE
    if pointer.exists() and not pointer.is_file():  # else every save would fail to update it, after the work
        raise TunelabError(f"{pointer} is not a file: tunelab keeps the name of the last checkpoint there. Move it "
                           f"out of the work dir, then train again.")
    clean_partial_saves(work_dir)
    start = None
    if resume == "auto":
        start = _newest_sound_checkpoint(work_dir, overwrite=overwrite, log=log)
        if start is None:
            log(f"--resume auto: no complete checkpoint in {work_dir} yet, starting from step 0")
    elif resume:
        start = resolve_resume(resume, work_dir)
        problem = _problem(start)
        if problem:
            raise TunelabError(f"--resume {resume}: {start} is damaged: {problem}. Resume from another checkpoint "
                               f"(--resume auto takes the newest sound one).")
    # the step the run goes on from (its record's: a checkpoint may have been renamed); it saves iter_N past it
    start_step = -1 if start is None else resume_settings.checkpoint_step_of(start, resume_settings.read_record(start))
    # incomplete ones too (no model/ or training_state.pt): they are an earlier run's all the same
    newer = [c for c in layout.checkpoint_dirs(work_dir) if checkpoint_step(c) > start_step]
    if start is not None and start.resolve() in {c.resolve() for c in newer}:  # never deleted, nor saved over
        raise TunelabError(f"{start} holds step {start_step} (its {layout.META_FILE} says so), not "
                           f"{checkpoint_step(start)}: this run would save iter_{checkpoint_step(start)} over the "
                           f"checkpoint it continues from. Rename it iter_{start_step}, then train again.")
    if newer:
        names = ", ".join(c.name + (f" ({problem})" if (problem := layout.missing_part(c)) else "") for c in newer)
        if not overwrite:
            if start is None:
                raise TunelabError(f"{work_dir} already holds checkpoints of an earlier run ({names}); training from "
                                   f"step 0 would overwrite them. Continue that run with --resume auto, start over "
                                   f"with --overwrite (deletes them), or train into another --work-dir.")
            raise TunelabError(f"--resume {resume}: {work_dir} holds checkpoints newer than {start.name} ({names}), "
                               f"which this run would overwrite. Continue from the newest with --resume auto, or "
                               f"pass --overwrite to delete them.")
        for path in newer:
            shutil.rmtree(path)
        log(f"--overwrite: deleted {names} from {work_dir}")
        if last_checkpoint(work_dir) is None:
            (work_dir / layout.POINTER_FILE).unlink(missing_ok=True)
    return start


def clean_partial_saves(work_dir: Path) -> None:
    """Remove iter_N.tmp/ left behind by a save that was killed (never a complete checkpoint)."""
    for path in layout.partial_saves(work_dir):
        shutil.rmtree(path, ignore_errors=True)


def _problem(checkpoint: Path) -> str | None:
    """What makes a checkpoint unusable (a part missing, a file that fails its checksum), None when it is sound."""
    return layout.missing_part(checkpoint) or verify_checkpoint(checkpoint)


def _newest_sound_checkpoint(work_dir: Path, *, overwrite: bool, log) -> Path | None:
    """The newest checkpoint of the work dir that is whole (`layout.missing_part`) and passes `verify_checkpoint`;
    those that are not are moved aside, named."""
    damaged = []
    for path in reversed(layout.checkpoint_dirs(work_dir)):
        problem = _problem(path)
        if problem is None:
            if not (path / MANIFEST_FILE).is_file():
                log(f"note: {path} has no {MANIFEST_FILE}: resuming without checking it")
            pointed = last_checkpoint(work_dir)
            if pointed not in (None, path):
                log(f"note: {layout.POINTER_FILE} names {pointed.name}; {path.name} is newer")
            return path
        aside = layout.damaged_dir(path)
        os.replace(path, aside)
        damaged.append(aside.name)
        log(f"warning: {path} is damaged ({problem}): moved to {aside.name}, trying the one before")
    if damaged and not overwrite:
        raise TunelabError(f"--resume auto: no checkpoint in {work_dir} is whole and passed its checksums (moved "
                           f"aside: {', '.join(damaged)}). Start over with --overwrite, or resume from a copy you "
                           f"trust with --resume PATH.")
    return None


def load_training_state(checkpoint: Path) -> dict:
    try:
        return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TunelabError(f"{Path(checkpoint) / STATE_FILE}: cannot be read ({exc}). {_damaged_advice(checkpoint)}") \
            from None


def _damaged_advice(checkpoint: Path) -> str:
    """What to do about a checkpoint found damaged while loading (one without checksums.json, which resume could not
    check beforehand): advice that works whether or not newer checkpoints exist."""
    checkpoint = Path(checkpoint)
    return (f"The checkpoint is damaged: move {checkpoint} out of {checkpoint.parent}, then continue with --resume "
            f"auto (from the checkpoint before it), or start over with --overwrite.")


def rng_state_for_rank(checkpoint: Path, state: dict, env=None) -> dict:
    """This rank's RNG state at the checkpoint: its own file, or rank 0's (a checkpoint of fewer ranks)."""
    rank = getattr(env, "rank", 0)
    path = layout.rng_file(checkpoint, rank)
    if rank and path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    return state["rng"]


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for a damaged or cut-off file
        raise TunelabError(f"{path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                           f"{_damaged_advice(path.parent.parent)}") from None


def load_model_weights(model, checkpoint: Path) -> None:
    """Put the checkpoint's trained weights (adapter or full model) into `model`, built as for training."""
    model_dir = Path(checkpoint) / MODEL_DIR
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        weights = _load_safetensors(model_dir / "adapter_model.safetensors")
        _refuse_shape_mismatch(weights, get_peft_model_state_dict(model), model_dir, adapter=True)
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise TunelabError(f"{model_dir}: adapter does not match this config's LoRA settings "
                               f"(unexpected weights {unexpected[:3]}...). Resume with the config it was trained with.")
        return
    weights = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(_load_safetensors(file))
    _refuse_shape_mismatch(weights, model.state_dict(), model_dir, adapter=False)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {name for name in missing if "lm_head" in name or "embed" in name}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}  # not saved: from the base
    if unexpected or set(missing) - tied - frozen:
        raise TunelabError(f"{model_dir}: the saved model does not match this config's model "
                           f"(missing {sorted(set(missing) - tied - frozen)[:3]}, unexpected {unexpected[:3]}). "
                           f"Resume with the config it was trained with.")


def _refuse_shape_mismatch(saved: dict, current: dict, model_dir: Path, *, adapter: bool) -> None:
    """Name the first saved tensor whose shape differs from this config's model: load_state_dict would raise a bare
    RuntimeError listing every one. Another lora_r changes an adapter's rank dimension; anything else is most likely
    another (size of) model."""
    for name, tensor in saved.items():
        if name not in current or tuple(tensor.shape) == tuple(current[name].shape):
            continue
        old, new = tuple(tensor.shape), tuple(current[name].shape)
        rank_dim = 0 if "lora_A" in name or "lora_embedding_A" in name else 1 if "lora_" in name else None
        if adapter and rank_dim is not None and len(old) == len(new) > rank_dim and old[rank_dim] != new[rank_dim]:
            cause = f"lora_r differs (the checkpoint's rank is {old[rank_dim]}, this config's {new[rank_dim]})"
        else:
            cause = "pretrained_model_name_or_path is a model of another size than the one it was trained on"
        what = "adapter does not match this config's LoRA settings" if adapter else \
            "the saved model does not match this config's model"
        raise TunelabError(f"{model_dir}: {what}: {name} has shape {list(old)} in the checkpoint, {list(new)} here; "
                           f"likely {cause}. Resume with the config it was trained with.")
