"""The optimiser, the learning-rate schedule, and mixed precision for training.

* AdamW (fused on CUDA), or bitsandbytes' 8-bit / paged 8-bit AdamW, which keep the optimiser state in 8 bits.
* Warm-up (linear from ~0 to `lr` over `warmup_steps`, or `warmup_ratio` of the steps), then cosine or linear decay
  to 0, or constant.
* bf16 autocast where the GPU has bf16; fp16 autocast with loss scaling where it does not; plain fp32 on CPU.
* `StepsInBackward`: each layer's parameters updated inside backward, as soon as their gradients are there (no
  clipping).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from tunelab.errors import TunelabError


def parameter_groups(model, cfg) -> list[dict]:
    """The trainable parameters in groups: matrices get weight decay, biases and norms do not. LoRA+
    (`loraplus_lr_ratio`): the B matrices, and the 1-D tensors beside them (biases, DoRA magnitudes, the norms of
    modules trained whole), learn at lr x ratio, as peft's `create_loraplus_optimizer` groups them; a LoRA pair on an
    embedding too, where peft trains both matrices at a fixed 1e-6 (`loraplus_lr_embedding`), which would all but
    freeze an adapter a user put there to train."""
    ratio = cfg.loraplus_lr_ratio or 1.0
    groups: dict[tuple, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            faster = ratio != 1.0 and ("lora_B" in name or "lora_embedding_B" in name or param.ndim == 1)
            groups.setdefault((param.ndim >= 2, faster), []).append(param)
    order = [(True, False), (False, False), (True, True), (False, True)]  # group 0's lr is the one logged
    return [{"params": groups[key], "weight_decay": cfg.weight_decay if key[0] else 0.0,
             "lr": cfg.lr * (ratio if key[1] else 1.0)} for key in order if key in groups]


def build_optimizer(model, cfg, device: torch.device) -> torch.optim.Optimizer:
    """An optimiser over the trainable parameters, in `parameter_groups`."""
    groups = parameter_groups(model, cfg)
    if not groups:
        raise TunelabError("no parameter requires a gradient: nothing would train. Check 'method' and, for LoRA, "
                           "'lora_target_modules' (they must name linear layers of the model, or 'all-linear').")
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "adamw":
        # The fused kernel does the whole update in one launch per parameter group: same maths, faster.
        return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TunelabError(f"optimizer = {cfg.optimizer!r} needs bitsandbytes: pip install bitsandbytes "
                           f"(or set optimizer = 'adamw').") from None
    if cfg.optimizer == "adamw_8bit":
        from tunelab.train.adamw_8bit import AdamW8bit  # bitsandbytes' 8-bit AdamW, without a sync per parameter

        return AdamW8bit(groups, **kwargs)
    return bnb.optim.PagedAdamW8bit(groups, **kwargs)


class StepsInBackward:
    """The optimiser's update of each layer's parameters as soon as backward has their gradients, which are then
    freed: the gradients of the whole model never exist at once (`optimizer_in_backward`). Where nothing needs all
    gradients first (no clipping, one micro-batch a step: `plan.optimizer_in_backward` says where), the updates are
    the ones `optimizer.step()` after backward makes. The optimiser itself keeps its state and lr schedule as usual.

    What is updated together: a layer's parameters, once its last gradient has come. Their gradient norms (for the
    log) are one launch for the layer; torch's AdamW steps them in one fused launch too (a launch a parameter costs a
    QLoRA step 8%, a launch a layer 0.8%: BENCHMARKS.md, "each update made inside backward" and "a layer's updates in
    one launch"), bitsandbytes' 8-bit AdamW (tunelab's) one kernel a parameter, as it always does. (A norm a
    parameter would put 448 tiny norm launches, 6 ms, into an 8k Llama-3.1-8B QLoRA step with 8-bit AdamW:
    BENCHMARKS.md, "four small costs out of every step".) A layer's LoRA gradients are a few MiB.

    The loop calls `step()` after backward as ever: it updates any parameter whose layer did not complete (a
    parameter that got no gradient this step leaves its layer waiting) and takes the gradient norm (for the log)
    that the parameters' norms add up to; `grad_norm()` reads it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module):
        self.optimizer = optimizer
        # by index: loading a checkpoint's state replaces the group dicts (the schedule then sets the new ones' lr)
        self._group_index = {param: i for i, group in enumerate(optimizer.param_groups) for param in group["params"]}
        self._step_parameter = getattr(optimizer, "step_parameter", None)  # bitsandbytes' 8-bit AdamW (tunelab's)
        self._buckets = layer_buckets(model, self._group_index)
        self._bucket_of = {param: i for i, bucket in enumerate(self._buckets) for param in bucket}
        self._waiting: dict[int, list[torch.Tensor]] = {}  # bucket -> its parameters that have a gradient
        self._norms: list[torch.Tensor] = []
        self._last_norm = torch.zeros(())
        for param in self._group_index:
            param.register_post_accumulate_grad_hook(self._arrived)

    @torch.no_grad()
    def _arrived(self, param: torch.Tensor) -> None:
        bucket = self._bucket_of[param]
        waiting = self._waiting.setdefault(bucket, [])
        waiting.append(param)
        if len(waiting) == len(self._buckets[bucket]):
            self._update(self._waiting.pop(bucket))

    def _update(self, params: list[torch.Tensor]) -> None:
        self._norms.extend(torch._foreach_norm([p.grad for p in params], 2, dtype=torch.float32))
        self._step_bucket(params)
        for param in params:
            param.grad = None

    def _step_bucket(self, params: list[torch.Tensor]) -> None:
        if self._step_parameter is not None:
            for param in params:
                self._step_parameter(param)
            return
        # Copies of the parameters' groups (their lr as the schedule set it, betas, weight decay) holding only them.
        # AdamW keeps its state per parameter, so stepping some alone is the same update, in the same kernel.
        groups = self.optimizer.param_groups
        by_group: dict[int, list[torch.Tensor]] = {}
        for param in params:
            by_group.setdefault(self._group_index[param], []).append(param)
        self.optimizer.param_groups = [{**groups[i], "params": members} for i, members in by_group.items()]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups

    @torch.no_grad()
    def step(self) -> None:
        """Backward has made the updates: make those still waiting and keep the norm of this step's gradients."""
        for waiting in self._waiting.values():
            self._update(waiting)
        self._waiting = {}
        self.optimizer._opt_called = True  # what step() tells the lr schedule (which warns when it never heard it)
        if self._norms:
            self._last_norm = torch.linalg.vector_norm(torch.stack(self._norms))
        self._norms = []

    def grad_norm(self) -> torch.Tensor:
        """The norm of all gradients of the last step (what clip_grad_norm_ would have measured)."""
        return self._last_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to zero: each gradient was freed after its update."""


def layer_buckets(model: torch.nn.Module, params) -> list[list[torch.Tensor]]:
    """`params` grouped by the innermost numbered block that holds them: 'model.layers.3.self_attn.q_proj.…' with
    the rest of layer 3, an MoE layer's 'model.layers.3.mlp.experts.5.…' with expert 5 alone (a step may route no
    token to it, and a group waits for all its gradients). One outside numbered blocks (embeddings, lm_head, final
    norm) is a group of its own. Backward finishes a layer's gradients before it starts the previous layer's, so a
    group's gradients come together."""
    wanted = set(params)
    buckets: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param in wanted:
            parts = name.split(".")
            numbered = max((i for i, part in enumerate(parts) if part.isdigit()), default=None)
            key = ".".join(parts[:numbered + 1]) if numbered is not None else name
            buckets.setdefault(key, []).append(param)
            wanted.discard(param)
    return list(buckets.values()) + [[param] for param in params if param in wanted]  # (none in a transformers model)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


def warmup_steps_for(cfg, total_steps: int) -> int:
    # A count of steps (HF's and Unsloth's warmup_steps) wins over the ratio, as in TrainingArguments; never past the
    # run's end, so a short run still reaches the peak lr.
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps_for(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _Schedule(total_steps, warmup, cfg.lr_scheduler))


@dataclass
class _Schedule:
    """The lr multiplier as an object, not a lambda: LambdaLR.state_dict() saves a callable object's settings
    (a lambda it leaves out), and it shows its settings when printed."""
    total_steps: int
    warmup_steps: int
    kind: str

    def __call__(self, step: int) -> float:
        return lr_factor(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, kind=self.kind)


# --- mixed precision -----------------------------------------------------------------------------

@dataclass
class Precision:
    """How the forward pass runs: autocast dtype (None = off) and whether the loss is scaled (fp16)."""
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler else loss


def choose_precision(model, compute_dtype: torch.dtype, device: torch.device, *,
                     fp32_master_weights: bool = True, grad_scaler: bool = True) -> Precision:
    """bf16 → autocast; fp16 → autocast with a GradScaler (fp16 gradients underflow otherwise), unless the engine
    scales the loss itself (`grad_scaler=False`: DeepSpeed); fp32 → neither.

    Trainable weights stored in bf16/fp16 are moved to fp32 ("master weights", as in mixed-precision training):
    a 16-bit weight rounds away updates smaller than ~1/256 (bf16) of itself, and the scaler cannot unscale fp16
    gradients. Autocast still computes in the 16-bit dtype. With bf16, `fp32_master_weights=False` keeps trained
    weights in bf16 to save memory, LoRA adapters too (peft makes them fp32; TRL casts QLoRA's to bf16 the same
    way); fp16 always needs fp32 ones. DoRA's magnitude vectors stay fp32: their updates are far below bf16's
    spacing and would all be lost.
    """
    if device.type != "cuda" or compute_dtype == torch.float32:
        return Precision(None, None)
    masters = compute_dtype == torch.float16 or fp32_master_weights
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if masters and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
        elif not masters and param.dtype == torch.float32 and "lora_magnitude_vector" not in name:
            param.data = param.data.to(compute_dtype)
    if compute_dtype == torch.float16:
        return Precision(torch.float16, torch.amp.GradScaler("cuda") if grad_scaler else None)
    return Precision(compute_dtype, None)


class ScaledOptimizer:
    """Lets `strategy.step` drive a GradScaler: unscale before clipping, skip steps with inf/nan.

    Call `unscale()` before clipping; `step()` then goes through the scaler, which skips the update when the
    fp16 gradients overflowed and lowers the scale.
    """

    def __init__(self, optimizer, scaler: torch.amp.GradScaler):
        self.optimizer, self.scaler = optimizer, scaler

    def unscale(self) -> None:
        self.scaler.unscale_(self.optimizer)

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
