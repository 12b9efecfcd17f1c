"""Checkpoints that are never half-written, and resuming from them (the names of the files: `layout.py`).

A checkpoint is written into `iter_N.tmp/` and renamed to `iter_N/` only when every file is there; the
`last_checkpoint` pointer is then replaced atomically (`os.replace`). A crash or kill at any moment therefore
leaves the pointer on a complete checkpoint. `training_state.pt` holds only tensors and plain numbers, so it
loads with `torch.load(weights_only=True)` (no pickled code runs).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.train import layout
from tunelab.train.layout import MODEL_DIR, OPTIMIZER_DIR, STATE_FILE, last_checkpoint, list_checkpoints


# --- RNG: every generator a run draws from, as tensors and numbers ------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))


# --- saving ----------------------------------------------------------------------------------------

def save_checkpoint(work_dir: Path, step: int, *, strategy, tokenizer, scheduler, position: dict, meta: dict,
                    save_total_limit: int = -1) -> Path:
    """Write iter_{step}/ atomically, point `last_checkpoint` at it, drop the oldest beyond the limit.

    Call on every rank: the strategy (`tunelab.train.strategy`) gathers whole weights where they are sharded (every
    rank joins) and writes its optimizer state (sharded engines: one file per rank under iter_N/optimizer/);
    rank 0 writes the rest while the others wait.
    """
    from tunelab.train.distributed import barrier

    env = strategy.env
    work_dir = Path(work_dir)
    final, tmp = layout.checkpoint_dir(work_dir, step), layout.partial_dir(work_dir, step)
    if env.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from a save that was killed
        tmp.mkdir(parents=True)
    barrier(env)
    inner = strategy.module
    weights = strategy.full_state_dict(trainable_only=hasattr(inner, "peft_config"))
    state = {"step": step, "position": dict(position), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    strategy.save_optimizer(tmp / OPTIMIZER_DIR, state)
    if not env.is_main:  # each rank's own generators (dropout masks differ by rank); rank 0's go in STATE_FILE
        torch.save(rng_state(), layout.rng_file(tmp, env.rank))
    barrier(env)  # every rank's files are in tmp before rank 0 renames it into place
    if env.is_main:
        # safetensors: the adapter for peft models, the whole model otherwise
        inner.save_pretrained(tmp / MODEL_DIR, **({"state_dict": weights} if weights is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / MODEL_DIR)
        torch.save(state, tmp / STATE_FILE)
        layout.write_meta(tmp, meta)
        _replace_dir(tmp, final)
        layout.write_pointer(work_dir, final)
        prune_checkpoints(work_dir, save_total_limit, keep=final)
    barrier(env)
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst (a run restarted into the same work dir) is moved aside first."""
    old = None
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(work_dir: Path, save_total_limit: int, *, keep: Path | None = None) -> None:
    """Delete the oldest checkpoints so that at most `save_total_limit` remain (-1: keep all)."""
    if save_total_limit is None or save_total_limit < 0:
        return
    checkpoints = list_checkpoints(work_dir)
    excess = len(checkpoints) - save_total_limit
    for path in checkpoints[:max(0, excess)]:
        if keep is None or path.resolve() != keep.resolve():
            shutil.rmtree(path, ignore_errors=True)


def clean_partial_saves(work_dir: Path) -> None:
    """Remove iter_N.tmp/ left behind by a save that was killed (never a complete checkpoint)."""
    for path in layout.partial_saves(work_dir):
        shutil.rmtree(path, ignore_errors=True)


# --- finding and loading -----------------------------------------------------------------------------

def resolve_resume(resume: str | None, work_dir: Path) -> Path | None:
    """`--resume auto` → the last complete checkpoint in the work dir (None: start fresh); a path → that one."""
    if not resume:
        return None
    if resume == "auto":
        return last_checkpoint(work_dir)
    path = Path(resume)
    if layout.is_checkpoint(path):
        return path
    if path.is_dir() and last_checkpoint(path):  # a work dir was given: take its last checkpoint
        return last_checkpoint(path)
    raise TunelabError(f"--resume {resume}: not a checkpoint (expected a directory like WORK_DIR/iter_500 holding "
                       f"{STATE_FILE}). Use --resume auto to continue from the last one in the work dir.")


def load_training_state(checkpoint: Path) -> dict:
    try:
        return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TunelabError(f"{Path(checkpoint) / STATE_FILE}: cannot be read ({exc}). The file is damaged; resume "
                           f"from an earlier checkpoint with --resume WORK_DIR/iter_N.") from None


def rng_state_for_rank(checkpoint: Path, state: dict, env=None) -> dict:
    """This rank's RNG state at the checkpoint: its own file, or rank 0's (a checkpoint of fewer ranks)."""
    rank = getattr(env, "rank", 0)
    path = layout.rng_file(checkpoint, rank)
    if rank and path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    return state["rng"]


def load_model_weights(model, checkpoint: Path) -> None:
    """Put the checkpoint's trained weights (adapter or full model) into `model`, built as for training."""
    from safetensors.torch import load_file

    model_dir = Path(checkpoint) / MODEL_DIR
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        weights = load_file(model_dir / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise TunelabError(f"{model_dir}: adapter does not match this config's LoRA settings "
                               f"(unexpected weights {unexpected[:3]}...). Resume with the config it was trained with.")
        return
    weights = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(file))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {name for name in missing if "lm_head" in name or "embed" in name}
    if unexpected or set(missing) - tied:
        raise TunelabError(f"{model_dir}: the saved model does not match this config's model "
                           f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}). "
                           f"Resume with the config it was trained with.")


# --- stopping cleanly on SIGINT / SIGTERM ----------------------------------------------------------

class GracefulStop:
    """While active, the first SIGINT / SIGTERM only asks the loop to stop (it saves, then returns);
    a second one stops at once. Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
              f"(press Ctrl-C again to stop without saving)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
