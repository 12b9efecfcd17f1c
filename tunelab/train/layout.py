"""The work dir and its checkpoints on disk, and the trained-with metadata: every path name lives here.

    WORK_DIR/resolved_config.py          every setting of the run (`tunelab train` reads it back)
    WORK_DIR/last_checkpoint             one line: the name of the last checkpoint saved (iter_N), for people and
                                         tools; tunelab itself takes the newest checkpoint (`newest_checkpoint`)
    WORK_DIR/tunelab.lock                held (flock) by the run training in the work dir; names its pid and host
    WORK_DIR/reference_logps_train.npz   DPO / KTO with reference = 'precomputed': the starting model's scores of
                                         the training rows (and _eval for the held-out rows), read back on resume
    WORK_DIR/iter_N/                     a checkpoint, written as iter_N.tmp/ and renamed once complete
    WORK_DIR/iter_N.damaged/             a checkpoint that failed its checksums or lacks model/ or training_state.pt,
                                         moved aside by resume (never read)
    WORK_DIR/iter_N/model/               the adapter (peft) or the whole model, HF safetensors, and the tokenizer
    WORK_DIR/iter_N/training_state.pt    scheduler, RNG, step, data position; the optimiser state too, unless sharded
    WORK_DIR/iter_N/optimizer/           the optimiser state, one shard per rank (FSDP2, DeepSpeed)
    WORK_DIR/iter_N/rng_rankR.pt         the RNG state of rank R > 0
    WORK_DIR/iter_N/tunelab.json         what the model was trained with (exported and merged models carry it too)
    WORK_DIR/iter_N/checksums.json       size and hash of every other file, written last: resume verifies them

A checkpoint is a directory holding `model/`: that is what export and chat read, and training only ever renames a
complete one into place. A work dir means its newest checkpoint to every verb (`newest_checkpoint`), whatever the
pointer says: a kill between a save's rename and the pointer's update leaves the pointer one checkpoint behind.
Resume takes it when its checksums hold (else the one before); export and chat refuse it when its `model/` fails
them, naming the one before. The pointer names a folder inside the work dir, so a moved or copied work dir reads its
own checkpoints. Training writes through `tunelab.train.checkpoint`; export and chat find checkpoints and read
`tunelab.json` with the functions below, so every verb accepts the same paths and refuses the same damaged
checkpoints (`refuse_damaged`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NoReturn

from tunelab.errors import TunelabError

RESOLVED_CONFIG = "resolved_config.py"
POINTER_FILE = "last_checkpoint"
MODEL_DIR = "model"
STATE_FILE = "training_state.pt"
OPTIMIZER_DIR = "optimizer"
META_FILE = "tunelab.json"
MANIFEST_FILE = "checksums.json"
LOCK_FILE = "tunelab.lock"
REFERENCE_LOGPS = "reference_logps_{split}.npz"
_ITER = re.compile(r"^iter_(\d+)$")


# --- names ---------------------------------------------------------------------------------------------------------

def checkpoint_dir(work_dir: str | Path, step: int) -> Path:
    return Path(work_dir) / f"iter_{step}"


def partial_dir(work_dir: str | Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is complete."""
    return Path(work_dir) / f"iter_{step}.tmp"


def rng_file(checkpoint: str | Path, rank: int) -> Path:
    return Path(checkpoint) / f"rng_rank{rank}.pt"


def checkpoint_step(checkpoint: str | Path) -> int:
    """N of an iter_N directory (-1 for a directory named otherwise)."""
    match = _ITER.match(Path(checkpoint).name)
    return int(match.group(1)) if match else -1


def damaged_dir(checkpoint: Path) -> Path:
    """A free name to move a checkpoint that failed verification to: iter_N.damaged (then .damaged2, ...)."""
    candidate, n = checkpoint.with_name(checkpoint.name + ".damaged"), 1
    while candidate.exists():
        n += 1
        candidate = checkpoint.with_name(f"{checkpoint.name}.damaged{n}")
    return candidate


# --- finding -------------------------------------------------------------------------------------------------------

def is_checkpoint(path: str | Path) -> bool:
    """A checkpoint directory (iter_N): it holds `model/`."""
    return (Path(path) / MODEL_DIR).is_dir()


def looks_like_work_dir(path: str | Path) -> bool:
    """A work dir training has written into: a `last_checkpoint` pointer or iter_* directories."""
    path = Path(path)
    return (path / POINTER_FILE).is_file() or any(path.glob("iter_*"))


def list_checkpoints(work_dir: str | Path) -> list[Path]:
    """The complete iter_N/ directories of a work dir, oldest first."""
    return [p for p in checkpoint_dirs(work_dir) if is_checkpoint(p)]


def checkpoint_dirs(work_dir: str | Path) -> list[Path]:
    """Every iter_N/ directory of a work dir, complete or not, oldest first (see `missing_part`)."""
    found = [(checkpoint_step(p), p) for p in Path(work_dir).glob("iter_*") if _ITER.match(p.name) and p.is_dir()]
    return [p for _, p in sorted(found)]


def missing_part(checkpoint: str | Path) -> str | None:
    """What an iter_N/ directory lacks to be resumed from (its model/ or training_state.pt), in words; None if
    neither is missing."""
    for name, present in ((MODEL_DIR + "/", Path(checkpoint, MODEL_DIR).is_dir()),
                          (STATE_FILE, Path(checkpoint, STATE_FILE).is_file())):
        if not present:
            return f"{name} is missing"
    return None


def newest_checkpoint(work_dir: str | Path) -> Path | None:
    """The complete iter_N/ directory of the highest step, or None: what a work dir means to export, chat, a LLaVA
    stage 2's `pretrained_pth` and `--resume auto` alike. Never the `last_checkpoint` pointer: a kill between a
    save's rename and the pointer's update leaves it naming the checkpoint before, which resume (taking the newest)
    would leave behind while export used it silently."""
    return (list_checkpoints(work_dir) or [None])[-1]


def partial_saves(work_dir: str | Path) -> list[Path]:
    """iter_N.tmp/ directories: saves that were killed before they were complete."""
    return list(Path(work_dir).glob("iter_*.tmp"))


def write_pointer(work_dir: str | Path, checkpoint: Path) -> None:
    """Point `last_checkpoint` at `checkpoint` (its name: the work dir may move), atomically (a crash leaves the old
    pointer or the new one)."""
    tmp = Path(work_dir) / (POINTER_FILE + ".tmp")
    tmp.write_text(Path(checkpoint).name + "\n")
    os.replace(tmp, Path(work_dir) / POINTER_FILE)


def last_checkpoint(work_dir: str | Path) -> Path | None:
    """The checkpoint `last_checkpoint` names, or None (no pointer yet, or it names nothing that exists).

    Only the last part of the name counts, as a folder inside this work dir, so a work dir that was moved or copied
    reads its own checkpoints, also where the pointer holds an absolute path (into the original work dir)."""
    work_dir = Path(work_dir)
    pointer = work_dir / POINTER_FILE
    if not pointer.is_file():
        return None
    try:
        text = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):  # unreadable: the pointer is only a hint
        return None
    candidate = work_dir / Path(text).name
    return candidate if text and is_checkpoint(candidate) else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The iter_N/ directory `path` means: a checkpoint itself, or a WORK_DIR or its pointer file (the work dir's
    newest checkpoint, as resume takes);
    refused when its weights are not as saved (see `refuse_damaged`): export and chat read it."""
    checkpoint = _find_checkpoint(path)
    refuse_damaged(checkpoint)
    return checkpoint


_NOT_SAVED = re.compile(r"^iter_\d+\.(tmp|damaged\d*)$")


def refuse_damaged(checkpoint: Path) -> None:
    """Stop (naming the problem and the newest sound checkpoint before it) when `checkpoint` is a save cut short
    (iter_N.tmp), one resume set aside (iter_N.damaged), or its model/ files fail checksums.json: a flipped byte
    loads without complaint, so without this check export and chat would quietly use other weights than trained."""
    from tunelab.train.checksums import verify_checkpoint

    checkpoint = Path(checkpoint)
    kind = _NOT_SAVED.match(checkpoint.name)
    if kind:
        problem = ("is a save that was cut short (a kill or crash while writing it): any file may be missing or "
                   "partial" if kind.group(1) == "tmp" else "was set aside by --resume auto: it failed its checksums")
    else:
        damage = verify_checkpoint(checkpoint, under=MODEL_DIR)
        if damage is None:
            return
        problem = f"is damaged: {damage} (checked against its {MANIFEST_FILE})"
    before = _sound_checkpoint_before(checkpoint)
    use = f"Use {before} instead" if before else "There is no earlier sound checkpoint: train again"
    raise TunelabError(f"{checkpoint} {problem}. {use}.")


def _sound_checkpoint_before(checkpoint: Path) -> Path | None:
    """The newest checkpoint next to `checkpoint`, older than it, whose model/ passes its checksums."""
    from tunelab.train.checksums import verify_checkpoint

    match = re.match(r"^iter_(\d+)", checkpoint.name)  # iter_N, iter_N.tmp, iter_N.damaged
    if match is None:  # a folder named otherwise: no steps to compare
        return None
    for candidate in reversed(list_checkpoints(checkpoint.parent)):
        if checkpoint_step(candidate) < int(match.group(1)) and verify_checkpoint(candidate, under=MODEL_DIR) is None:
            return candidate
    return None


def _find_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        # XTuner saves WORK_DIR/iter_N.pth: a user who passes that by habit means tunelab's WORK_DIR/iter_N/
        meant = p.with_suffix("") if p.suffix == ".pth" else None
        hint = f" Did you mean {meant}?" if meant is not None and is_checkpoint(meant) else ""
        raise TunelabError(f"checkpoint not found: {p}.{hint} Pass a WORK_DIR (its newest checkpoint is used) "
                           f"or one of its iter_N directories.")
    if p.is_file():
        if p.name == POINTER_FILE:
            return _find_checkpoint(p.parent)
        raise TunelabError(f"{p} is a file; tunelab checkpoints are directories (WORK_DIR/iter_N/ holding {MODEL_DIR}/ "
                           f"and {META_FILE}). Pass the iter_N directory or the WORK_DIR.")
    if is_checkpoint(p):
        return p
    last = newest_checkpoint(p)
    if last is not None:
        return last
    kind = sharded_checkpoint_kind(p)
    if kind:
        refuse_raw_engine_checkpoint(p, kind)
    raise TunelabError(f"{p} is not a tunelab checkpoint: expected {p}/{MODEL_DIR}/ (an iter_N directory) or "
                       f"{p}/{POINTER_FILE} (a WORK_DIR). Did training save a checkpoint yet? (see save_steps)")


def sharded_checkpoint_kind(path: Path) -> str | None:
    """'deepspeed' / 'fsdp' when `path` looks like a checkpoint written by those engines themselves, else None."""
    if (path / "zero_to_fp32.py").exists() or list(path.glob("global_step*")) or list(path.glob("*model_states.pt")):
        return "deepspeed"
    if list(path.glob("*.distcp")):
        return "fsdp"
    return None


def refuse_raw_engine_checkpoint(path: Path, kind: str) -> NoReturn:
    """A raw DeepSpeed / FSDP checkpoint (not one of tunelab's iter_N directories): say what to do instead.

    tunelab's own training saves a consolidated `model/` in every iter_N (with DeepSpeed and FSDP too), so only
    checkpoints written by the engines themselves (e.g. XTuner's iter_N.pth/ folders) land here.
    """
    how = (" To get whole fp32 weights from it in Python: "
           "tunelab.train.deepspeed_engine.load_consolidated_state_dict(path) (DeepSpeed's zero_to_fp32)."
           if kind == "deepspeed" else "")
    raise TunelabError(f"{path} looks like a raw {kind} checkpoint, which `convert` cannot read. Use the iter_N "
                       f"directories tunelab's training writes (they hold a consolidated {MODEL_DIR}/).{how}")


# --- what the model was trained with ------------------------------------------------------------------------------

def training_meta(cfg, model_config=None) -> dict:
    """The tunelab.json of a run's checkpoints: enough for chat, merge and export to use the model as trained.

    model_config: the trained model's config as loaded: its architecture (`model_type`, so merge can tell an
    adapter's base family from another of the same shapes) and RoPE when the run scaled it (`rope_scaling`, put on
    the base again wherever the adapter goes on it)."""
    from tunelab import __version__
    from tunelab.model.load import scaled_rope
    from tunelab.model.rope import recorded

    meta = {"base_model": cfg.pretrained_model_name_or_path, "method": cfg.method, "objective": cfg.objective,
            "prompt_template": cfg.prompt_template, "system": cfg.SYSTEM, "max_length": cfg.max_length,
            "tunelab_version": __version__}
    if getattr(model_config, "model_type", None):
        meta["model_type"] = model_config.model_type
    if model_config is not None and scaled_rope(cfg):
        meta["rope_scaling"] = recorded(model_config)
    if cfg.visual_encoder_name_or_path:  # a LLaVA run: how to assemble the model again (export, chat)
        from tunelab.model.llava_train import llava_settings

        meta["llava"] = llava_settings(cfg)
    return meta


def read_meta(directory: str | Path) -> dict | None:
    """The tunelab.json a checkpoint / adapter / merged model was saved with, if any."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}. Fix it, or delete it and pass "
                           "the base model / --prompt-template yourself.") from None
    if not isinstance(meta, dict):
        raise TunelabError(f"{path}: expected a JSON object like {{\"base_model\": ..., \"prompt_template\": ...}}.")
    return meta


def write_meta(directory: str | Path, meta: dict) -> None:
    Path(directory, META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
