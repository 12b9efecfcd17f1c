"""The `nonfinite` setting: what a training step whose loss or gradient norm is inf / NaN does (stop before saving,
or skip it), checked on the numbers the loop reads for its log anyway."""

from __future__ import annotations

import math
from pathlib import Path

from tunelab.errors import TunelabError


class NonFiniteGuard:
    """What a step whose loss or gradient norm is inf / NaN does (the `nonfinite` setting). It reads the two numbers
    the loop reads for its log anyway, so the check adds no wait for the GPU.

    'stop': raise before anything of that step is saved (the weights in memory may be spoiled; the checkpoints on
    disk are not). 'skip': the strategy read the gradient norm before stepping and left the weights alone; the
    step's batch is not trained on, a warning says so, and MAX_IN_A_ROW such steps in a row stop the run.
    Under fp16 loss scaling (`scaled`) an inf gradient norm is the scaler's business (it skips the update and lowers
    the scale): only the loss counts there.
    """

    MAX_IN_A_ROW = 10

    def __init__(self, mode: str, *, scaled: bool, say=print):
        self.skips, self.scaled, self.say = mode == "skip", scaled, say
        self.skipped = 0
        """Steps skipped so far (logged as skipped_steps)."""
        self._in_a_row = 0

    def check(self, step: int, loss: float, grad_norm: float, *, lr: float, last: Path | None) -> bool:
        """True for a finite step; False for one that was skipped; raises TunelabError when the run must stop."""
        if math.isfinite(loss) and (math.isfinite(grad_norm) or self.scaled):
            self._in_a_row = 0
            return True
        numbers = f"loss {loss}, gradient norm {grad_norm}"
        if self.skips and not math.isfinite(grad_norm):  # the update was not applied
            self.skipped += 1
            self._in_a_row += 1
            if self._in_a_row < self.MAX_IN_A_ROW:
                self.say(f"warning: step {step}: {numbers}; skipped (its batch is not trained on)")
                return False
            raise TunelabError(f"{self.MAX_IN_A_ROW} steps in a row up to step {step} had an inf / NaN loss or "
                               f"gradients ({numbers}): training stopped; {self._kept(last)} Lower lr (now {lr:g}) "
                               f"or check the data, then continue with --resume auto.")
        raise TunelabError(f"step {step}: {numbers}: training stopped before saving it; {self._kept(last)} Lower lr "
                           f"(now {lr:g}), check the data (`tunelab check-dataset CFG`) or set nonfinite = 'skip' to "
                           f"skip such steps, then continue with --resume auto.")

    @staticmethod
    def _kept(last: Path | None) -> str:
        return f"the last checkpoint, {last}, is intact." if last else "no checkpoint was saved."
