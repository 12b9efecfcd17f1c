"""The DeepSpeed ZeRO strategy (`deepspeed = 'zero2'`, 'zero3', ... or a .json), and reading a DeepSpeed checkpoint
back as whole weights. The strategy contract is `tunelab.train.strategy`'s; DeepSpeed's engine owns backward, step and
its own checkpoint format, so those are what this class overrides. The config DeepSpeed gets is built in
`tunelab.train.deepspeed_configs`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.model.parts import split_model
from tunelab.train.distributed import DistEnv
from tunelab.train.strategy import LossModule, SingleProcess


class DeepSpeed(SingleProcess):
    """DeepSpeed ZeRO: the engine partitions states (and weights at stage 3) and owns backward and step."""

    name = "DeepSpeed"
    CHECKPOINT_TAG = "deepspeed"
    scales_fp16_loss = True  # its fp16 mode has a dynamic loss scale of its own; a second one would not be undone

    def __init__(self, env: DistEnv, cfg):
        super().__init__(env)
        self.cfg = cfg
        self.zero_stage = 0

    @property
    def shards_weights(self) -> bool:
        return self.zero_stage == 3

    def _wrap(self, model):
        import deepspeed

        from tunelab.train.deepspeed_configs import build_deepspeed_config

        wrapped = LossModule(model, self.objective)
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.compute_dtype, "fp32")
        ds_config = build_deepspeed_config(self.cfg, precision=precision, world_size=self.env.world_size)
        self.zero_stage = int(ds_config["zero_optimization"].get("stage", 0))
        if self.zero_stage == 3:
            # ZeRO-3 gathers a module's weights around that module's forward, and the objective reads lm_head's
            # weight without calling lm_head: registered with the root, it is gathered for the whole step.
            # (Recent DeepSpeed detects such reads itself; saying it keeps older ones right.)
            _, head, _ = split_model(model)
            for param in (head.weight, head.bias):
                if param is not None:
                    deepspeed.zero.register_external_parameter(wrapped, param)
        engine, *_ = deepspeed.initialize(model=wrapped, optimizer=self.raw_optimizer, config=ds_config,
                                          dist_init_required=False)
        return engine

    def forward_loss(self, batch: dict):
        return self.wrapped(batch)

    def accumulating(self, last: bool):
        self.wrapped.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # the loop already divided by the tokens of every micro-batch: no division by the accumulation steps
        self.wrapped.backward(self._undo_mean_over_ranks(loss), scale_wrt_gas=False)

    def step(self, max_norm: float, *, keep_grad_buffers: bool = False, skip_nonfinite: bool = False) -> float:
        # skip_nonfinite is refused with DeepSpeed (config.checks.combination_errors): its step is the engine's own
        self.wrapped.step()  # clipping (gradient_clipping in the DeepSpeed config), the step and zeroing
        norm = self.wrapped.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def full_state_dict(self, *, trainable_only: bool = False) -> dict | None:
        inner = self.module
        names = {n for n, p in inner.named_parameters() if p.requires_grad} if trainable_only else None
        if self.zero_stage == 3:
            import deepspeed

            state = {}
            for name, param in inner.named_parameters():
                if names is not None and name not in names:
                    continue
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):  # one weight at a time
                    if self.env.is_main:
                        state[name] = param.detach().to("cpu", copy=True)
            if names is None and self.env.is_main:
                state.update({n: b.detach().cpu() for n, b in inner.named_buffers() if n in inner.state_dict()})
            return state
        if not self.env.is_main:
            return {}
        state = inner.state_dict()
        if names is not None:
            state = {k: v for k, v in state.items() if k in names}
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def save_optimizer(self, directory: Path, state: dict) -> None:
        """The engine's own checkpoint (weights and optimizer, ZeRO layout; `load_consolidated_state_dict` reads it)."""
        self.wrapped.save_checkpoint(str(directory), tag=self.CHECKPOINT_TAG)

    def load_optimizer(self, directory: Path, state: dict) -> None:
        if "optimizer" in state or not Path(directory).is_dir():
            super().load_optimizer(directory, state)
            return
        path, _ = self.wrapped.load_checkpoint(str(directory), tag=self.CHECKPOINT_TAG, load_module_strict=False)
        if path is None:
            raise TunelabError(f"{directory}: no DeepSpeed checkpoint (tag {self.CHECKPOINT_TAG!r}) to resume from.")


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
