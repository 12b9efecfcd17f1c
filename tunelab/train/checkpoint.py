"""Checkpoints that are never half-written (the names of the files: `layout.py`; where a run starts and what resume
reads back: `resume.py`).

A checkpoint is written into `iter_N.tmp/`, its `checksums.json` last, and renamed to `iter_N/` only when every file
is there; the `last_checkpoint` pointer is then replaced atomically (`os.replace`). No save replaces or moves aside a
checkpoint already there. A crash or kill at any moment therefore leaves complete checkpoints only. Only finite
weights are saved. `training_state.pt` holds only tensors and plain numbers, so it loads with
`torch.load(weights_only=True)` (no pickled code runs). Beside the saves: the RNG states a checkpoint keeps and resume
puts back, and stopping cleanly on SIGINT / SIGTERM (`GracefulStop`: save, then stop).
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
from tunelab.model.llava import is_llava
from tunelab.model.tokenizer import save_tokenizer
from tunelab.train import layout
from tunelab.train.checksums import write_manifest
from tunelab.train.layout import MODEL_DIR, OPTIMIZER_DIR, STATE_FILE, list_checkpoints, newest_checkpoint


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
    rank 0 writes the rest while the others wait. Weights that are not all finite are never written (TunelabError);
    a write that fails (disk full, read-only) leaves the earlier checkpoints as they were.
    """
    from tunelab.train.distributed import barrier

    env = strategy.env
    work_dir = Path(work_dir)
    final, tmp = layout.checkpoint_dir(work_dir, step), layout.partial_dir(work_dir, step)
    inner = strategy.module
    # a LoRA adapter, or a LLaVA model's trained parts (its frozen vision tower, and in stage 1 its language model,
    # come from the base models again)
    weights = strategy.full_state_dict(trainable_only=hasattr(inner, "peft_config") or is_llava(inner))
    _refuse_non_finite(weights, inner, env, step)
    try:
        if env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)  # left over from a save that was killed
            tmp.mkdir(parents=True)
        barrier(env)
        state = {"step": step, "position": dict(position), "scheduler": scheduler.state_dict(), "rng": rng_state()}
        strategy.save_optimizer(tmp / OPTIMIZER_DIR, state)
        if not env.is_main:  # each rank's own generators (dropout masks differ by rank); rank 0's go in STATE_FILE
            torch.save(rng_state(), layout.rng_file(tmp, env.rank))
        barrier(env)  # every rank's files are in tmp before rank 0 renames it into place
        if env.is_main:
            # safetensors: the adapter for peft models, the whole model otherwise
            kwargs = {"state_dict": weights} if weights is not None else {}
            if is_llava(inner) and not hasattr(inner, "peft_config"):
                kwargs["save_original_format"] = False  # the module names resume and export read back
            inner.save_pretrained(tmp / MODEL_DIR, **kwargs)
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp / MODEL_DIR)  # with its tokenizer.model, for the GGUF export
            torch.save(state, tmp / STATE_FILE)
            layout.write_meta(tmp, meta)
            write_manifest(tmp)  # last: a checkpoint with checksums.json holds every file it lists
            _rename_into_place(tmp, final)
            layout.write_pointer(work_dir, final)
            prune_checkpoints(work_dir, save_total_limit, keep=final)
    except (OSError, RuntimeError, _safetensors_error()) as exc:  # torch.save reports a full disk as RuntimeError
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = newest_checkpoint(work_dir)
        if isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror + (f" ({exc.filename})" if exc.filename else "")
        else:  # torch and safetensors word a full disk their own way: say how much room there is
            reason = f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]}; {_free_space(work_dir)} free there"
        raise TunelabError(f"saving checkpoint {final} failed: {reason}. Free disk space or make {work_dir} writable, "
                           f"then continue with --resume auto (from "
                           f"{previous.name if previous else 'step 0: no checkpoint saved yet'}; earlier checkpoints "
                           f"are untouched).") from None
    barrier(env)
    return final


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.2f} GiB"
    except OSError:
        return "unknown space"


def _safetensors_error() -> type:
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors
        return OSError
    return SafetensorError


def _refuse_non_finite(weights: dict | None, model, env, step: int) -> None:
    """Stop (on every rank) before a checkpoint of weights with inf / NaN is written: resume would carry them on,
    and `save_total_limit` would prune the finite checkpoints to make room for it."""
    from tunelab.train.distributed import all_reduce_sum

    bad = 0.0
    if env.is_main:
        tensors = weights.values() if weights is not None else (p for p in model.parameters() if p.requires_grad)
        flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
        # one device-to-host copy for all of them (they live on one device; .to is then a no-op)
        bad = float(not bool(torch.stack([f.to(flags[0].device) for f in flags]).all())) if flags else 0.0
    if env.distributed:
        bad = float(all_reduce_sum(torch.tensor(bad, device=env.device), env))
    if bad:
        raise TunelabError(f"step {step}: the trained weights hold inf or NaN, so no checkpoint was saved (the "
                           f"earlier ones are kept). Lower lr, check max_norm and the data, then continue from the "
                           f"last good checkpoint with --resume auto.")


def _rename_into_place(tmp: Path, final: Path) -> None:
    """Rename a complete save to its name, which must be free. A checkpoint already there is never moved aside for
    it: two folders cannot be swapped in one rename, and a kill between moving the old one away and renaming the
    new one in would leave neither under a name resume and export read. `resume.choose_start` deletes or refuses
    every name this run saves to, so one found here was made while it trained."""
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise TunelabError(f"{final} already exists (made while this run trained?), so the checkpoint of this step "
                           f"was not saved over it. Move it out of {final.parent}, then continue with --resume auto.")
    os.replace(tmp, final)


def prune_checkpoints(work_dir: Path, save_total_limit: int, *, keep: Path | None = None) -> None:
    """Delete the oldest checkpoints so that at most `save_total_limit` remain (-1: keep all)."""
    if save_total_limit is None or save_total_limit < 0:
        return
    checkpoints = list_checkpoints(work_dir)
    excess = len(checkpoints) - save_total_limit
    for path in checkpoints[:max(0, excess)]:
        if keep is None or path.resolve() != keep.resolve():
            shutil.rmtree(path, ignore_errors=True)


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
