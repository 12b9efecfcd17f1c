"""Preference objectives: DPO (sigmoid, IPO, hinge), ORPO, SimPO, KTO and Bradley-Terry reward modelling.

    objective = PreferenceObjective(PreferenceSettings.from_config(cfg), chunk_size=..., chunked=..., compiled=...)
    loss_sum, units = objective(model, batch)     # the shape of every objective the loop calls
    objective.units(batch)                        # pairs (or KTO samples) of a batch, known on the CPU
    objective.take_metrics()                      # rewards, margin, accuracy, KL summed since the last call
    training_objective(cfg, plan, reference, reference_model, sum_over_ranks)   # what a run's settings ask for

A batch holds whole units (tunelab.data.encode_preference: a pair is prompt + chosen, prompt + rejected; a KTO
sample its reply and a KL reply). The policy's log-probability of each sequence comes from the chunked projection
(`tunelab.model.logprobs`: no full-vocabulary logits). The reference's comes from one of:

* ``adapters_off``: the same model with its LoRA adapters switched off (peft's `disable_adapter`), one forward
  without gradient in the same step: no second copy of the weights;
* ``copy``: a frozen copy of the starting weights (`reference_model`), for full fine-tuning;
* ``precomputed``: values computed once before training and carried by the rows (`reference_logps` in the batch).

ORPO, SimPO and reward modelling need no reference. The loss of the batch is the sum over its units; the loop
divides by the units of the whole step (all micro-batches and ranks), so every pair weighs the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.data.encode_preference import DESIRABLE
from tunelab.model import preference_losses as losses
from tunelab.model.logprobs import sequence_logprobs
from tunelab.model.reward import sequence_scores

REFERENCES = ("adapters_off", "copy", "precomputed")
"""Where the reference's log-probabilities come from (the `reference` setting; 'auto' picks one)."""


@dataclass(frozen=True)
class PreferenceSettings:
    objective: str
    """'dpo', 'orpo', 'simpo', 'kto' or 'reward'."""
    beta: float = 0.1
    dpo_loss: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    reference: str | None = None
    """Where the reference's log-probabilities come from (REFERENCES); None for objectives without one."""

    @classmethod
    def from_config(cls, cfg, reference: str | None = None) -> "PreferenceSettings":
        """The settings of `cfg`; `reference` as resolved for this run (`cfg.resolved_reference`)."""
        return cls(cfg.objective, cfg.beta, cfg.dpo_loss, cfg.label_smoothing, cfg.simpo_gamma,
                   cfg.kto_desirable_weight, cfg.kto_undesirable_weight, reference)

    @property
    def length_normalised(self) -> bool:
        """Whether the loss reads mean token log-probabilities rather than sums."""
        return self.objective in ("orpo", "simpo") or (self.objective == "dpo" and self.dpo_loss == "ipo")


class PreferenceObjective:
    """objective(model, batch) -> (loss summed over the batch's units, units); see the module docstring."""

    def __init__(self, settings: PreferenceSettings, *, chunk_size: int, chunked: bool = True,
                 compiled: bool = False, reference_model=None, sum_over_ranks=None):
        self.settings = settings
        self.logprob_options = {"chunk_size": chunk_size, "chunked": chunked, "compiled": compiled}
        self.reference_model = reference_model
        self.sum_over_ranks = sum_over_ranks  # KTO's KL estimate is over the data-parallel ranks' batches together
        self._metrics: dict[str, list] = {}

    # --- what the loop asks -------------------------------------------------------------------------

    def units(self, batch: dict) -> int:
        """Pairs, or KTO samples, in a batch: every unit is two sequences."""
        return batch["sequence_kind"].shape[0] // 2

    def copy(self) -> "PreferenceObjective":
        """The same objective with metric sums of its own (what evaluation scores with)."""
        return PreferenceObjective(self.settings, reference_model=self.reference_model,
                                   sum_over_ranks=self.sum_over_ranks, **self.logprob_options)

    def take_metrics(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (sum, count)} accumulated since the last call (the loop sums them over ranks and divides)."""
        out, self._metrics = self._metrics, {}
        return {k: (v[0], v[1]) for k, v in out.items()}

    def __call__(self, model, batch: dict):
        s = self.settings
        # A unit's sequences are consecutive ([CHOSEN, REJECTED] or [DESIRABLE | UNDESIRABLE, KL]): splitting by
        # reshape, not by masks, keeps the step free of GPU syncs.
        if s.objective == "reward":
            chosen, rejected = sequence_scores(model, batch).view(-1, 2).unbind(1)
            self._pair_metrics(chosen, rejected, prefix="score")
            return losses.bradley_terry_losses(chosen, rejected).sum(), chosen.shape[0]
        reference = self.reference_logps(model, batch) if s.reference else None
        policy = sequence_logprobs(model, batch, **self.logprob_options)
        if s.length_normalised:
            n = batch["sequence_tokens"].clamp(min=1).to(policy.dtype)
            policy = policy / n
            reference = None if reference is None else reference / n
        if s.objective == "kto":
            return self._kto(policy, reference, batch["sequence_kind"])
        pc, pr = policy.view(-1, 2).unbind(1)
        if s.objective == "dpo":
            rc, rr = reference.view(-1, 2).unbind(1)
            unit_losses = losses.dpo_losses(pc, pr, rc, rr, beta=s.beta, loss_type=s.dpo_loss,
                                            label_smoothing=s.label_smoothing)
            self._pair_metrics(s.beta * (pc - rc), s.beta * (pr - rr), prefix="reward")
        elif s.objective == "orpo":
            unit_losses = losses.orpo_losses(pc, pr, beta=s.beta)
            self._add("log_odds_ratio", losses.log_odds_ratio(pc, pr))
            self._add("nll_chosen", -pc)
            self._pair_metrics(s.beta * pc, s.beta * pr, prefix="reward")
        elif s.objective == "simpo":
            unit_losses = losses.simpo_losses(pc, pr, beta=s.beta, gamma=s.simpo_gamma,
                                              label_smoothing=s.label_smoothing)
            self._pair_metrics(s.beta * pc, s.beta * pr, prefix="reward")
        else:
            raise ValueError(f"unknown objective {s.objective!r}")
        self._add("logp_chosen", pc)
        self._add("logp_rejected", pr)
        return unit_losses.sum(), pc.shape[0]

    # --- the parts ----------------------------------------------------------------------------------

    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        """The reference's log-probability of every sequence of the batch (no gradient)."""
        where = self.settings.reference
        if where == "precomputed":
            if "reference_logps" not in batch:
                raise ValueError("reference = 'precomputed' but the batch carries no reference_logps")
            return batch["reference_logps"]
        with torch.no_grad():
            if where == "copy":
                return sequence_logprobs(self.reference_model, batch, **self.logprob_options)
            with model.disable_adapter():  # the model as it was before training
                return sequence_logprobs(model, batch, **self.logprob_options)

    def _kto(self, policy, reference, kinds):
        s = self.settings
        (own, kl_policy), (own_ref, kl_ref) = policy.view(-1, 2).unbind(1), reference.view(-1, 2).unbind(1)
        kl = losses.kto_kl(kl_policy, kl_ref, self.sum_over_ranks)
        desirable = kinds.view(-1, 2)[:, 0] == DESIRABLE
        unit_losses = losses.kto_losses(own, own_ref, desirable, kl, beta=s.beta,
                                        desirable_weight=s.kto_desirable_weight,
                                        undesirable_weight=s.kto_undesirable_weight)
        rewards = s.beta * (own - own_ref)
        self._add("reward_desirable", rewards, desirable)
        self._add("reward_undesirable", rewards, ~desirable)
        self._add("kl", kl[None])
        return unit_losses.sum(), own.shape[0]

    def _pair_metrics(self, chosen: torch.Tensor, rejected: torch.Tensor, prefix: str) -> None:
        self._add(f"{prefix}_chosen", chosen)
        self._add(f"{prefix}_rejected", rejected)
        self._add(f"{prefix}_margin", chosen - rejected)
        self._add("accuracy", (chosen > rejected).float())

    def _add(self, name: str, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """Add to a metric's sum and count (of the entries `where` selects); both stay on the device: no sync."""
        values = values.detach().float()
        mask = torch.ones_like(values) if where is None else where.float()
        total, count = (values * mask).sum(), mask.sum()
        if name in self._metrics:
            self._metrics[name][0] += total
            self._metrics[name][1] += count
        else:
            self._metrics[name] = [total, count]


def training_objective(cfg, plan, reference: str | None = None, reference_model=None, sum_over_ranks=None):
    """The objective the loop minimises for `cfg` as `plan` (a FastPathPlan) runs it: the supervised loss, or a
    preference objective with the reference resolved for this run (`cfg.resolved_reference`). sum_over_ranks:
    the sum over the data-parallel ranks (`distributed.all_reduce_sum`), for KTO's KL estimate."""
    from tunelab.model.loss import causal_lm_objective

    if cfg.objective == "sft":
        if cfg.visual_encoder_name_or_path:  # a LLaVA model: image features into the input embeddings first
            from tunelab.model.llava import llava_objective

            return llava_objective(plan)
        return causal_lm_objective(plan)
    return PreferenceObjective(PreferenceSettings.from_config(cfg, reference), chunk_size=plan.loss_chunk_size,
                               chunked=plan.chunked_loss, compiled=plan.compiled_loss, reference_model=reference_model,
                               sum_over_ranks=sum_over_ranks)


def reduce_metrics(metrics: dict, reduce) -> dict[str, float]:
    """{name: mean} of `take_metrics()` sums, summed over ranks with `reduce(tensor) -> tensor` first."""
    if not metrics:
        return {}
    names = sorted(metrics)
    sums = reduce(torch.stack([torch.stack([metrics[n][0].double(), metrics[n][1].double()]) for n in names]))
    return {n: round(float(total / count), 6) for n, (total, count) in zip(names, sums.tolist()) if count > 0}
