"""Checkpoints of a run whose states are spread over several processes (DDP, FSDP2, DeepSpeed ZeRO).

Model weights: every rank joins the gather, rank 0 writes ordinary HF files (model/), so export and chat read a
sharded run's checkpoint like any other. Optimizer states stay sharded (one file per rank, resharded on load).
`checkpoint.py` calls these inside its atomic save; in one process they reduce to a plain state dict and
optimizer.pt.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.train.distributed import DistEnv, barrier, is_deepspeed, unwrap


def gather_full_state_dict(model, env: DistEnv, *, trainable_only: bool = False) -> dict:
    """The whole state dict of `unwrap(model)` on rank 0, on the CPU ({} on the other ranks). Call on every rank.

    trainable_only: only parameters that train (a LoRA adapter), sparing the gather of a frozen base.
    Feed it to `unwrap(model).save_pretrained(dir, state_dict=...)` on rank 0.
    """
    inner = unwrap(model)
    if env.engine == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(inner, options=options)
        return state if env.is_main else {}
    names = {n for n, p in inner.named_parameters() if p.requires_grad} if trainable_only else None
    if env.engine == "deepspeed" and env.zero_stage == 3:
        import deepspeed

        state = {}
        for name, param in inner.named_parameters():
            if names is not None and name not in names:
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):  # one weight at a time: low peak
                if env.is_main:
                    state[name] = param.detach().to("cpu", copy=True)
        if names is None and env.is_main:
            state.update({n: b.detach().cpu() for n, b in inner.named_buffers() if n in inner.state_dict()})
        return state
    if not env.is_main:
        return {}
    state = inner.state_dict()
    if names is not None:
        state = {k: v for k, v in state.items() if k in names}
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def save_sharded_optimizer(model, optimizer, env: DistEnv, directory) -> None:
    """Every rank writes its shard of the optimizer state under `directory` (call on every rank).

    FSDP2: torch.distributed.checkpoint (DCP, resumable on another rank count); DeepSpeed: the engine's own
    checkpoint (weights and optimizer, ZeRO layout; `zero_to_fp32` or `load_consolidated_state_dict` reads it).
    DDP / one process: rank 0 writes optimizer.pt.
    """
    directory = str(directory)
    if is_deepspeed(model):
        model.save_checkpoint(directory, tag="deepspeed")
    elif env.engine == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(unwrap(model), optimizer)}, checkpoint_id=directory)
    else:
        if env.is_main:
            os.makedirs(directory, exist_ok=True)
            torch.save(getattr(optimizer, "optimizer", optimizer).state_dict(), os.path.join(directory, "optimizer.pt"))
        barrier(env)


def load_sharded_optimizer(model, optimizer, env: DistEnv, directory) -> None:
    """Load what `save_sharded_optimizer` wrote into this rank's optimizer (call on every rank)."""
    directory = str(directory)
    if not os.path.isdir(directory):
        raise TunelabError(f"{directory}: optimizer state not found; resume from a complete iter_N checkpoint.")
    if is_deepspeed(model):
        path, _ = model.load_checkpoint(directory, tag="deepspeed", load_module_strict=False)
        if path is None:
            raise TunelabError(f"{directory}: no DeepSpeed checkpoint (tag 'deepspeed') to resume from.")
    elif env.engine == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(unwrap(model), optimizer)}
        dcp.load(state, checkpoint_id=directory)
        set_optimizer_state_dict(unwrap(model), optimizer, optim_state_dict=state["optimizer"])
    else:
        state = torch.load(os.path.join(directory, "optimizer.pt"), map_location=env.device, weights_only=True)
        getattr(optimizer, "optimizer", optimizer).load_state_dict(state)


def load_consolidated_state_dict(path) -> dict:
    """Whole fp32 weights from a DeepSpeed checkpoint directory, in one process (for `convert pth_to_hf`).

    `path` is a directory written by `engine.save_checkpoint` (it holds `latest` or a tag folder of
    `*_model_states.pt`), e.g. WORK_DIR/iter_N/optimizer or an XTuner `iter_N.pth/` folder.
    """
    path = Path(path)
    tag = None
    if not (path / "latest").exists():
        if any(path.glob("*model_states.pt")):  # the tag folder itself was given
            path, tag = path.parent, path.name
        else:
            raise TunelabError(f"{path}: not a DeepSpeed checkpoint (no 'latest' file and no *_model_states.pt).")
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise TunelabError(f"{path} is a DeepSpeed checkpoint; reading it needs DeepSpeed: "
                           "pip install 'tunelab[deepspeed]'.") from None
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    # tunelab's engines wrap LossModule, whose only child is `model`: strip that prefix to get the HF names back
    # (a plain HF causal LM always has a top-level key outside `model.`, e.g. lm_head.weight).
    stripped = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    wrapped = len(stripped) == len(state) and any(k.startswith(("model.", "base_model.")) for k in stripped)
    return stripped if wrapped else state
