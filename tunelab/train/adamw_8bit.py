"""bitsandbytes' 8-bit AdamW without a GPU synchronisation after every parameter.

`bnb.optim.AdamW8bit.step` (bitsandbytes 0.50) calls `torch.cuda.synchronize()` after updating each parameter: the CPU
waits for the GPU ~450 times a step for Llama-7B's LoRA matrices, and the GPU idles while the next update is launched.
That costs Llama-7B QLoRA 2k ~10% of its step with CUDA graphs (BENCHMARKS.md). The waits are only needed for
paged state (unified memory prefetched by bitsandbytes on its own stream); a non-paged update is a kernel on the same
stream as the gradients that feed it, so stream order already makes it safe. Everything else (the kernel, the state
layout, state_dict) is bitsandbytes' own. Imported only when `optimizer = 'adamw_8bit'`.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch


class AdamW8bit(bnb.optim.AdamW8bit):
    """bnb.optim.AdamW8bit whose step() launches every parameter's update without waiting for the GPU in between.

    For a parameter with 8-bit state and no per-parameter overrides (bitsandbytes' GlobalOptimManager), the update
    calls bitsandbytes' kernel op directly: bitsandbytes' update_step rebuilds a config dict for every parameter, and
    ~450 of those cost more CPU time than the GPU spends on the updates (~6 ms for Llama-7B's LoRA). Anything else
    goes through bitsandbytes' own update_step.
    """

    _where = None
    """Each parameter's (group index, index in its group), for `step_parameter` (built on its first call)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._initialise()
        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                if param.grad is not None:
                    self._update(group, param, group_index, param_index)
        return loss

    @torch.no_grad()
    def step_parameter(self, param) -> None:
        """Update `param` alone, from its gradient (`tunelab.train.optim.StepsInBackward` calls it in backward)."""
        self._initialise()
        if self._where is None:
            self._where = {p: (g, i) for g, group in enumerate(self.param_groups)
                           for i, p in enumerate(group["params"])}
        group_index, param_index = self._where[param]
        self._update(self.param_groups[group_index], param, group_index, param_index)

    def _initialise(self) -> None:
        if not self.initialized:  # as bitsandbytes' step does on its first call
            self.check_overrides()
            self.to_gpu()
            self.initialized = True

    def _update(self, group: dict, param, group_index: int, param_index: int) -> None:
        grad, state = param.grad, self.state[param]
        if len(state) == 0:
            self.init_state(group, param, group_index, param_index)
        overridden = bool(self.mng.index2config or self.mng.pid2config)
        if (overridden or state["state1"].dtype != torch.uint8 or not param.is_contiguous()
                or not grad.is_contiguous()):
            self.update_step(group, param, group_index, param_index)
            return
        beta1, beta2, *beta3 = group["betas"]
        state["step"] += 1  # what update_step does for 8-bit blockwise state, argument for argument
        torch.ops.bitsandbytes.optimizer_update_8bit_blockwise(
            self.optimizer_name, grad, param, state["state1"], state["state2"], beta1, beta2,
            beta3[0] if beta3 else 0.0, group.get("alpha", 0.0), group["eps"], state["step"], group["lr"],
            state["qmap1"], state["qmap2"], state["absmax1"], state["absmax2"], group["weight_decay"], 1.0,
            self.args.skip_zeros)
