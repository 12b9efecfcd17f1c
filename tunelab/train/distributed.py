"""Where the training loop meets several processes (torchrun): the loop calls only these functions.

Three established engines, picked by the config (docs/DISTRIBUTED.md):

* DDP (default with several processes): every rank holds the whole model, gradients are all-reduced.
* FSDP2 (`fsdp = True`): `torch.distributed.fsdp.fully_shard` on each decoder layer, then on the root; weights,
  gradients and optimizer states are sharded per parameter (frozen LoRA base weights are fine).
* DeepSpeed ZeRO (`deepspeed = 'zero2'`, ...): `deepspeed.initialize`; the engine owns backward and step, so
  `backward()` and `clip_and_step()` hand over to it.

Two things make them agree with one process on the same global batch:

* The loss is computed *through* the wrapper (`forward_loss`): our chunked loss calls the decoder and reads
  `lm_head.weight` directly, which would skip DDP's gradient hooks and FSDP's/ZeRO-3's gathering of the root weights.
  `prepare_for_training` therefore wraps a `LossModule` whose forward is `causal_lm_loss`, and under ZeRO-3 registers
  lm_head's weight as an external parameter of it.
* Every engine *averages* gradients over ranks, while the loop divides the loss by the trained tokens of the whole
  global batch (all ranks, all accumulation steps). `backward()` multiplies by world_size to undo the average, so
  every trained token weighs the same whatever the number of ranks.

In one process every function here is a no-op or the identity, so the loop reads the same either way.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from tunelab.errors import TunelabError
from tunelab.model.loss import causal_lm_loss
from tunelab.model.parts import decoder_layers, split_model


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    engine: str = "none"
    """'none', 'ddp', 'fsdp' or 'deepspeed': set by prepare_for_training."""
    zero_stage: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def params_sharded(self) -> bool:
        """True when no rank holds whole weights (FSDP, ZeRO-3): generation then needs every rank, not rank 0 alone."""
        return self.engine == "fsdp" or (self.engine == "deepspeed" and self.zero_stage == 3)


def init_distributed(device: str | None = None, timeout_minutes: int = 30) -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group when there are several."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def validate_distributed(cfg, env: DistEnv) -> None:
    """Refuse, before any weight is loaded, the combinations the engines cannot run, saying why."""
    from tunelab.train import deepspeed_configs as dsc

    bits = cfg.resolved_quant_bits()
    if cfg.deepspeed and cfg.fsdp:
        raise TunelabError("config sets both 'deepspeed' and 'fsdp': they are two ways of sharding the same states; "
                           "choose one (--deepspeed zero3 or --fsdp).")
    if cfg.fsdp:
        if bits:
            raise TunelabError(f"fsdp = True with method={cfg.method!r} ({bits}-bit base): FSDP2's fully_shard "
                               "cannot shard bitsandbytes' packed quantized weights. Use --deepspeed zero2 for QLoRA "
                               "on several GPUs, or method='lora' with fsdp.")
        if cfg.optimizer != "adamw":
            raise TunelabError(f"fsdp = True with optimizer={cfg.optimizer!r}: bitsandbytes' 8-bit optimizers do not "
                               "step sharded (DTensor) parameters. Set optimizer = 'adamw'.")
    if cfg.deepspeed:
        dsc.require_deepspeed()
        stage, offload = dsc.zero_stage(cfg.deepspeed), dsc.offloads(cfg.deepspeed)
        if bits and stage == 3:
            raise TunelabError(f"deepspeed = {cfg.deepspeed!r} with method={cfg.method!r}: ZeRO-3 partitions every "
                               "weight, and bitsandbytes' packed 4/8-bit weights cannot be partitioned (it would need "
                               "bnb_4bit_quant_storage equal to the compute dtype, which tunelab does not set). "
                               "Use --deepspeed zero2 (or zero2_offload) for QLoRA, or method='lora' with zero3.")
        if offload and env.device.type != "cuda":
            raise TunelabError(f"deepspeed = {cfg.deepspeed!r} offloads to CPU memory, but this run is already on "
                               "the CPU. Use zero1/zero2/zero3 (or no deepspeed) on CPU.")
        if offload and cfg.optimizer != "adamw":
            raise TunelabError(f"deepspeed = {cfg.deepspeed!r} offloads optimizer states to the CPU, where "
                               f"optimizer={cfg.optimizer!r} (a GPU 8-bit optimizer) cannot run. Set optimizer = 'adamw'.")
    if env.distributed and env.device.type == "cuda" and env.local_rank >= torch.cuda.device_count():
        raise TunelabError(f"LOCAL_RANK {env.local_rank} but this machine has {torch.cuda.device_count()} GPUs: "
                           "set NPROC_PER_NODE (or --nproc-per-node) to at most the number of GPUs.")


class LossModule(torch.nn.Module):
    """What the engines wrap: its forward is the training loss, so their forward/backward hooks see the whole step."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.forward_calls = 0

    def forward(self, batch: dict, chunk_size: int = 4096, chunked: bool = True, compiled: bool = False):
        self.forward_calls += 1
        return causal_lm_loss(self.model, batch, chunk_size=chunk_size, chunked=chunked, compiled=compiled)


def forward_loss(model, batch: dict, *, chunk_size: int = 4096, chunked: bool = True, compiled: bool = False):
    """(loss_sum, n_trained_tokens) for one micro-batch: `causal_lm_loss` run through the engine's wrapper."""
    if model is unwrap(model):  # one process, nothing wrapped
        return causal_lm_loss(model, batch, chunk_size=chunk_size, chunked=chunked, compiled=compiled)
    return model(batch, chunk_size=chunk_size, chunked=chunked, compiled=compiled)


def _precision_name(model, env: DistEnv) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if env.device.type != "cuda":
        return "fp32"
    if dtype == torch.float32:  # fp32 weights on a GPU (full fine-tuning): compute in bf16 where it exists
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _rebind_optimizer(optimizer, before: dict, model) -> None:
    """fully_shard replaces each parameter with a sharded one; point an optimizer built earlier at the new ones."""
    after = dict(model.named_parameters())
    name_of = {id(p): name for name, p in before.items()}
    for group in getattr(optimizer, "optimizer", optimizer).param_groups:
        group["params"] = [after[name_of[id(p)]] for p in group["params"]]


def prepare_for_training(model, env: DistEnv, cfg=None, optimizer=None):
    """Wrap the model for the chosen engine (the identity in one process without fsdp/deepspeed).

    Build the optimizer *before* calling this and pass it: DeepSpeed takes it into its engine, and FSDP2 re-points it
    at the sharded parameters. Afterwards compute the loss with `forward_loss(model, batch)`.
    """
    use_ds, use_fsdp = bool(cfg and cfg.deepspeed), bool(cfg and cfg.fsdp)
    if not env.distributed and not use_ds and not use_fsdp:
        env.engine = "none"
        return model
    wrapped = LossModule(model)
    if use_ds:
        import deepspeed

        from tunelab.train.deepspeed_configs import build_deepspeed_config

        if optimizer is None:
            raise TunelabError("internal: prepare_for_training(..., optimizer=) is required with deepspeed.")
        ds_config = build_deepspeed_config(cfg, precision=_precision_name(model, env), world_size=env.world_size)
        if ds_config["zero_optimization"].get("stage") == 3:
            # ZeRO-3 gathers a module's weights around that module's forward, and the chunked loss reads lm_head's
            # weight without calling lm_head: registered with the root, it is gathered for the whole step.
            # (Recent DeepSpeed detects such reads itself; saying it keeps older ones right.)
            _, head, _ = split_model(model)
            for param in (head.weight, head.bias):
                if param is not None:
                    deepspeed.zero.register_external_parameter(wrapped, param)
        engine, *_ = deepspeed.initialize(model=wrapped, optimizer=getattr(optimizer, "optimizer", optimizer),
                                          config=ds_config, dist_init_required=False)
        env.engine, env.zero_stage = "deepspeed", int(ds_config["zero_optimization"].get("stage", 0))
        return engine
    if use_fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        before = dict(model.named_parameters())
        precision = _precision_name(model, env)
        mp = MixedPrecisionPolicy(param_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision),
                                  reduce_dtype=torch.float32)
        layers = decoder_layers(model)
        if not layers:
            raise TunelabError(f"fsdp: found no decoder layers in {type(model).__name__}; this architecture needs "
                               "--deepspeed instead of --fsdp.")
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        # The root (embeddings, final norm, lm_head) is gathered when LossModule's forward starts, so the chunked
        # loss may read lm_head.weight directly.
        fully_shard(wrapped, mp_policy=mp)
        if optimizer is not None:
            _rebind_optimizer(optimizer, before, model)
        env.engine = "fsdp"
        return wrapped
    from torch.nn.parallel import DistributedDataParallel

    env.engine = "ddp"
    # Buffers (rotary tables) are the same on every rank: no need to broadcast them at each forward.
    return DistributedDataParallel(wrapped, device_ids=[env.device] if env.device.type == "cuda" else None,
                                   broadcast_buffers=False)


def unwrap(model):
    """The HF / peft model inside any wrapper (for saving, evaluation, generation)."""
    while True:
        if isinstance(model, LossModule):
            return model.model
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def is_deepspeed(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def gradient_sync(model, env: DistEnv, sync: bool):
    """Skip the all-reduce on micro-steps that only accumulate (DDP no_sync, FSDP2 and DeepSpeed flags)."""
    if is_deepspeed(model):
        model.set_gradient_accumulation_boundary(sync)
    elif env.engine == "fsdp":
        model.set_requires_gradient_sync(sync)
    elif env.distributed and not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def backward(loss: torch.Tensor, model, env: DistEnv) -> None:
    """loss.backward(), or the engine's own backward; undoes the engines' mean over ranks (see module docstring)."""
    if env.distributed:
        loss = loss * env.world_size
    if is_deepspeed(model):
        model.backward(loss, scale_wrt_gas=False)  # the loop already divided by the tokens of every micro-step
        return
    if env.engine == "ddp" and unwrap_loss_module(model).forward_calls == 0:
        raise RuntimeError("under DDP the loss must come from distributed.forward_loss(model, batch): calling the "
                           "unwrapped model skips DDP's gradient all-reduce and the ranks would drift apart.")
    loss.backward()


def unwrap_loss_module(model) -> LossModule:
    return model.module if hasattr(model, "module") else model


def clip_and_step(model, optimizer, max_norm: float, env: DistEnv, *, keep_grad_buffers: bool = False) -> float:
    """Clip gradients (max_norm > 0), step the optimizer, zero the gradients; returns the gradient norm.

    keep_grad_buffers: zero the .grad tensors in place instead of freeing them (see `loop.allocate_grad_buffers`).
    """
    if is_deepspeed(model):
        model.step()  # clipping (gradient_clipping), the step and zeroing are the engine's
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0
    if hasattr(optimizer, "unscale"):  # fp16 GradScaler (tunelab.train.optim.ScaledOptimizer)
        optimizer.unscale()
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    # With max_norm = inf, clip_grad_norm_ only measures (the clip factor is clamped to 1); it handles DTensors.
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm and max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=not keep_grad_buffers)
    if env.engine == "ddp":
        unwrap_loss_module(model).forward_calls = 0
    return float(norm)


def all_reduce_sum(value, env: DistEnv) -> torch.Tensor:
    """Sum over ranks (e.g. the trained-token count). Ints and floats become tensors on this rank's device."""
    if not torch.is_tensor(value):
        value = torch.tensor(value, device=env.device)
    if env.distributed:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


def rank_shard(indices: list[int], env: DistEnv) -> list[int]:
    """This rank's share of a list of row indices (every rank gets the same count)."""
    usable = len(indices) - len(indices) % env.world_size if env.world_size > 1 else len(indices)
    return indices[env.rank:usable:env.world_size]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        torch.distributed.barrier()


def cleanup(env: DistEnv) -> None:
    if env.distributed and torch.distributed.is_initialized():
        # All ranks arrive before any tears the group down: a gloo peer that vanishes while another is still
        # sending or waiting makes that one abort ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
