"""How the training loop runs in one or several processes: one strategy object, chosen once, that the loop calls.

    strategy = choose_strategy(cfg, env)          # SingleProcess, DDP, FSDP2 or DeepSpeed (docs/DISTRIBUTED.md)
    strategy.setup(model, optimizer, objective, compute_dtype)  # wrap the model as the engine needs it
    with strategy.accumulating(last=...):         # the gradient all-reduce only on the last micro-batch of a step
        loss_sum, n_tokens = strategy.forward_loss(batch)
        strategy.backward(loss)
    grad_norm = strategy.step(max_norm)           # (unscale,) clip, step, zero the gradients
    strategy.module                               # the HF / peft model inside: save, evaluate, generate

and for checkpoints (`tunelab.train.checkpoint`): `full_state_dict`, `save_optimizer`, `load_optimizer`.

* `SingleProcess`: plain PyTorch calls; the base the others override where their engine differs.
* `DDP` (several processes): every rank holds the whole model, gradients are all-reduced.
* `FSDP2` (`fsdp = True`): `fully_shard` on each decoder layer, then on the root; weights, gradients and optimizer
  states are sharded per parameter (frozen LoRA base weights are fine).
* `DeepSpeed` (`deepspeed = 'zero2'`, ...; `tunelab.train.deepspeed_engine`): `deepspeed.initialize`; the engine
  owns backward and step.

Two things make them agree with one process on the same global batch:

* The loss goes *through* the engine's wrapper: the objective (`tunelab.model.loss.causal_lm_objective`) calls the
  decoder and reads `lm_head.weight` directly, which would skip DDP's gradient hooks and FSDP's / ZeRO-3's gathering
  of the root weights. The engines therefore wrap a `LossModule` whose forward is the objective; under ZeRO-3
  lm_head's weight is registered as an external parameter of it.
* Every engine *averages* gradients over ranks, while the loop divides the loss by the trained tokens of the whole
  global batch (all ranks, all accumulation steps). `backward` multiplies by world_size to undo the average, so
  every trained token weighs the same whatever the number of ranks.

The processes themselves (rank, world size, device, collectives) are `tunelab.train.distributed`. Sequence
parallelism (`sequence_parallel_size`, each row split over several ranks) wraps the engine's strategy
(`tunelab.train.sequence_parallel.SequenceParallel`): its objective runs on a shard of each row, and its `data_env`
names the ranks that read different rows.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.model.parts import decoder_layers
from tunelab.train.distributed import DistEnv, validate_distributed
from tunelab.train.optim import StepsInBackward


def choose_strategy(cfg, env: DistEnv) -> "SingleProcess":
    """The strategy `cfg` asks for in the processes of `env`, after refusing what the engines cannot run."""
    validate_distributed(cfg, env)
    if cfg.deepspeed:
        from tunelab.train.deepspeed_engine import DeepSpeed

        engine = DeepSpeed(env, cfg)
    elif cfg.fsdp:
        engine = FSDP2(env)
    elif env.distributed:
        engine = DDP(env)
    else:
        engine = SingleProcess(env)
    if cfg.sequence_parallel_size > 1:
        from tunelab.train.sequence_parallel import SequenceParallel

        return SequenceParallel(engine, cfg, env)
    return engine


class LossModule(torch.nn.Module):
    """What the engines wrap: its forward is the training objective, so their hooks see the whole step."""

    def __init__(self, model, objective):
        super().__init__()
        self.model = model
        self.objective = objective
        self.forward_calls = 0

    def forward(self, batch: dict):
        self.forward_calls += 1
        return self.objective(self.model, batch)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, checkpoint: Path) -> None:
    """A checkpoint's optimiser state into `optimizer`; a state of other parameter groups (other trained tensors, or
    another grouping of them: loraplus_lr_ratio) is a message naming the checkpoint, not torch's ValueError (which
    the settings compared before loading should have caught: this is for a checkpoint edited or of an odd origin)."""
    try:
        optimizer.load_state_dict(state)
    except ValueError as exc:
        raise optimizer_state_misfit(checkpoint, str(exc)) from None


def optimizer_state_misfit(checkpoint: Path, detail: str) -> TunelabError:
    """The message for a checkpoint's optimiser state of other parameter groups, whichever engine loads it."""
    return TunelabError(f"{checkpoint}: its optimiser state does not fit this run's trained parameters ({detail}): "
                        f"what trains, or how it is grouped (loraplus_lr_ratio, lora_bias, lora_modules_to_save, "
                        f"...), changed since it was saved. Resume with the config the run was trained with, or start "
                        f"a new work dir.")


def check_dcp_optimizer_fits(directory: Path, template: dict) -> None:
    """Refuse a torch.distributed.checkpoint optimiser state (FSDP2's) saved with other parameter groups or other
    trained parameters than `template` (this run's `get_optimizer_state_dict`) has, before DCP loads it: DCP stops
    on the first key it misses with a RuntimeError on every rank ("Missing key in checkpoint state_dict:
    optimizer.param_groups.1.weight_decay"). The groups' members are compared once loaded (`check_dcp_groups`)."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    groups = {key.split(".")[2] for key in saved if key.startswith("optimizer.param_groups.")}
    if len(groups) != len(template["param_groups"]):
        raise optimizer_state_misfit(Path(directory).parent, f"{len(groups)} parameter groups saved, "
                                                             f"{len(template['param_groups'])} now")
    missing = sorted(f"{name}.{key}" for name, state in template["state"].items() for key in state
                     if f"optimizer.state.{name}.{key}" not in saved)
    if missing:
        raise optimizer_state_misfit(Path(directory).parent, f"no state saved for {missing[0]}"
                                                             + (f" and {len(missing) - 1} more" if missing[1:] else ""))


def check_dcp_groups(directory: Path, loaded: list[dict], mine: list[list[str]]) -> None:
    """The parameters of each group DCP loaded (by name) are this run's: the same parameters, grouped otherwise
    (another loraplus_lr_ratio's split with the same number of groups), would each take another group's lr."""
    for i, (group, names) in enumerate(zip(loaded, mine)):
        if sorted(group["params"]) != sorted(names):
            raise optimizer_state_misfit(Path(directory).parent, f"parameter group {i} holds other parameters")


class SingleProcess:
    """One process: every call is the plain PyTorch one."""

    name = "single process"
    shards_weights = False
    """No rank holds whole weights (FSDP2, ZeRO-3): gathering them needs every rank."""
    scales_fp16_loss = False
    """The engine scales an fp16 loss itself (DeepSpeed): the loop then leaves out its GradScaler."""

    def __init__(self, env: DistEnv):
        self.env = env
        self.module = None
        """The HF / peft model being trained, inside any wrapper."""
        self.wrapped = None
        """What the forward runs through: the engine's wrapper, or the model itself."""
        self.optimizer = None
        self.objective = None
        self.compute_dtype = None
        """The autocast dtype the loop chose (`optim.choose_precision`), None for fp32: the engines that cast
        weights themselves (FSDP2, DeepSpeed) compute in it too."""

    def setup(self, model, optimizer, objective, compute_dtype: torch.dtype | None = None) -> None:
        """Take the loaded model (fast path on), its optimizer, the objective `objective(model, batch) ->
        (loss_sum, n_trained_tokens)` and the compute dtype (`Precision.autocast_dtype`). Build the optimizer before:
        DeepSpeed takes it over, FSDP2 re-points it at the sharded parameters. A `ScaledOptimizer` (fp16) is stepped
        through its scaler."""
        self.module, self.optimizer, self.objective = model, optimizer, objective
        self.compute_dtype = compute_dtype
        self.wrapped = self._wrap(model)

    @property
    def data_env(self) -> DistEnv:
        """The ranks that read different rows: every rank (sequence parallelism: one per group that shares rows)."""
        return self.env

    @property
    def raw_optimizer(self):
        """The torch optimizer itself (inside a `ScaledOptimizer`): its state is what checkpoints hold."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _wrap(self, model):
        return model

    def close(self) -> None:
        """What the engine started beside the process group of `distributed.init_distributed` (DeepSpeed's one-process
        group), ended when the run ends."""

    # --- a training step ---------------------------------------------------------------------------------------

    def train(self) -> None:
        """Training mode, set through the engine's wrapper (which may keep state of its own)."""
        self.wrapped.train()

    def forward_loss(self, batch: dict):
        """(loss_sum, n_trained_tokens) of one micro-batch, through the engine's wrapper."""
        return self.objective(self.module, batch)

    def accumulating(self, last: bool):
        """Context of one micro-batch's forward and backward: the engines reduce gradients only when `last`."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _undo_mean_over_ranks(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.env.world_size if self.env.distributed else loss

    def step(self, max_norm: float, *, keep_grad_buffers: bool = False, skip_nonfinite: bool = False) -> float:
        """Clip the gradients (max_norm > 0), step the optimizer, zero the gradients; returns the gradient norm.

        keep_grad_buffers: zero the .grad tensors in place instead of freeing them (see `loop.allocate_grad_buffers`).
        skip_nonfinite: leave the weights alone when the norm is inf / NaN (the loop's `nonfinite = 'skip'`); the
        norm is then read before the update instead of after it. (A GradScaler skips such steps by itself.)
        """
        if isinstance(self.optimizer, StepsInBackward):  # backward has made the updates (no clipping, no skipping)
            self.optimizer.step()
            return float(self.optimizer.grad_norm())
        scaled = hasattr(self.optimizer, "unscale")  # fp16 GradScaler (tunelab.train.optim.ScaledOptimizer)
        if scaled:
            self.optimizer.unscale()
        params = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        # With max_norm = inf, clip_grad_norm_ only measures (the clip factor is clamped to 1); it handles DTensors.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm and max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        skip = skip_nonfinite and not scaled and not bool(torch.isfinite(norm))  # reads the norm only when asked
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not keep_grad_buffers)
        return float(norm)

    # --- checkpoints -------------------------------------------------------------------------------------------

    def full_state_dict(self, *, trainable_only: bool = False) -> dict | None:
        """Whole weights on rank 0, on the CPU, for `save_pretrained(state_dict=...)` (call on every rank); None: the
        model's own state dict is whole already. trainable_only: only the weights that train (a LoRA adapter)."""
        if trainable_only and not hasattr(self.module, "peft_config"):  # e.g. LLaVA's stage 1: the projector
            return {n: p.detach().to("cpu", copy=True) for n, p in self.module.named_parameters() if p.requires_grad}
        return None

    def save_optimizer(self, directory: Path, state: dict) -> None:
        """Put the optimizer state into a checkpoint (call on every rank): into `state` (training_state.pt, written
        by rank 0), or, for engines that shard it, one file per rank under `directory`."""
        if self.env.is_main:
            state["optimizer"] = self.raw_optimizer.state_dict()

    def load_optimizer(self, directory: Path, state: dict) -> None:
        """The optimizer state that `save_optimizer` wrote (call on every rank)."""
        if "optimizer" in state:
            load_optimizer_state(self.raw_optimizer, state["optimizer"], Path(directory).parent)
        elif not Path(directory).is_dir():
            raise TunelabError(f"{directory}: optimizer state not found; resume from a complete iter_N checkpoint.")
        else:
            raise TunelabError(f"{directory}: this checkpoint's optimizer state is sharded over the ranks of another "
                               f"engine; resume with the engine it was saved with (fsdp / deepspeed).")


class DDP(SingleProcess):
    """Several processes, each with the whole model; DistributedDataParallel all-reduces the gradients."""

    name = "DDP"

    def _wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are the same on every rank: no need to broadcast them at each forward.
        return DistributedDataParallel(LossModule(model, self.objective),
                                       device_ids=[self.env.device] if self.env.device.type == "cuda" else None,
                                       broadcast_buffers=False)

    def forward_loss(self, batch: dict):
        return self.wrapped(batch)

    def accumulating(self, last: bool):
        return contextlib.nullcontext() if last else self.wrapped.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        if self.wrapped.module.forward_calls == 0:
            raise RuntimeError("under DDP the loss must come from strategy.forward_loss(batch): calling the model "
                               "itself skips DDP's gradient all-reduce and the ranks would drift apart.")
        self._undo_mean_over_ranks(loss).backward()

    def step(self, max_norm: float, *, keep_grad_buffers: bool = False, skip_nonfinite: bool = False) -> float:
        norm = super().step(max_norm, keep_grad_buffers=keep_grad_buffers, skip_nonfinite=skip_nonfinite)
        self.wrapped.module.forward_calls = 0
        return norm


class FSDP2(SingleProcess):
    """PyTorch FSDP2: weights, gradients and optimizer states sharded per parameter across ranks."""

    name = "FSDP2"
    shards_weights = True

    def _wrap(self, model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        before = dict(model.named_parameters())
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        layers = decoder_layers(model)
        if not layers:
            raise TunelabError(f"fsdp: found no decoder layers in {type(model).__name__}; this architecture needs "
                               "--deepspeed instead of --fsdp.")
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        # The root (embeddings, final norm, lm_head) is gathered when LossModule's forward starts, so the objective
        # may read lm_head.weight directly.
        wrapped = LossModule(model, self.objective)
        fully_shard(wrapped, mp_policy=mp)
        # fully_shard replaced each parameter with a sharded one: point the optimizer built earlier at the new ones.
        after = dict(model.named_parameters())
        name_of = {id(p): name for name, p in before.items()}
        for group in self.raw_optimizer.param_groups:
            group["params"] = [after[name_of[id(p)]] for p in group["params"]]
        return wrapped

    def forward_loss(self, batch: dict):
        return self.wrapped(batch)

    def accumulating(self, last: bool):
        self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self._undo_mean_over_ranks(loss).backward()

    def full_state_dict(self, *, trainable_only: bool = False) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(self.module, options=options)
        return state if self.env.is_main else {}

    def save_optimizer(self, directory: Path, state: dict) -> None:
        """torch.distributed.checkpoint (DCP): one file per rank, resumable on another number of ranks."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(self.module, self.raw_optimizer)}, checkpoint_id=str(directory))

    def load_optimizer(self, directory: Path, state: dict) -> None:
        if "optimizer" in state or not Path(directory).is_dir():
            super().load_optimizer(directory, state)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        loaded = {"optimizer": get_optimizer_state_dict(self.module, self.raw_optimizer)}
        check_dcp_optimizer_fits(directory, loaded["optimizer"])
        mine = [list(group["params"]) for group in loaded["optimizer"]["param_groups"]]
        dcp.load(loaded, checkpoint_id=str(directory))
        check_dcp_groups(directory, loaded["optimizer"]["param_groups"], mine)
        set_optimizer_state_dict(self.module, self.raw_optimizer, optim_state_dict=loaded["optimizer"])
