"""The preference losses, one function each, on per-sequence log-probabilities (or scores); one loss per unit.

Inputs are fp32 tensors of shape [units]: summed log-probabilities of a reply (`tunelab.model.logprobs`), or their
mean over the reply's tokens where the method says so, or reward scores. Each function returns the loss of every
unit; the objective (`tunelab.model.preference`) sums them and the loop divides by the units of the whole step.

* DPO (Rafailov et al. 2023): with h = (log pi(yc) - log pi(yr)) - (log ref(yc) - log ref(yr)),
  sigmoid: -log sigma(beta h) (1 - eps) - log sigma(-beta h) eps (eps = label_smoothing, the conservative DPO of
  Mitchell 2023); hinge (SLiC): max(0, 1 - beta h); IPO (Azar et al. 2023): (h - 1 / (2 beta))^2, on log-probs
  averaged over the reply's tokens, as TRL and LLaMA-Factory do.
* ORPO (Hong et al. 2024), no reference: -mean log pi(yc) - beta log sigma(log odds(yc) - log odds(yr)), with
  log odds(y) = m - log(1 - exp(m)) of m = the reply's mean token log-probability (beta is the paper's lambda).
* SimPO (Meng et al. 2024), no reference: -log sigma(beta (mc - mr) - gamma) on mean token log-probabilities.
* KTO (Ethayarajh et al. 2024): r = log pi(y) - log ref(y); desirable: w_d (1 - sigma(beta (r - z))), undesirable:
  w_u (1 - sigma(beta (z - r))), z the KL estimate (no gradient, at least 0).
* Bradley-Terry reward modelling (InstructGPT): -log sigma(s(yc) - s(yr)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss_type!r}; one of {DPO_LOSSES}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds_ratio(chosen_mean, rejected_mean) -> torch.Tensor:
    """log odds(yc) - log odds(yr) of mean token log-probabilities (ORPO)."""
    return (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))


def orpo_losses(chosen_mean, rejected_mean, *, beta: float) -> torch.Tensor:
    return -chosen_mean - beta * F.logsigmoid(log_odds_ratio(chosen_mean, rejected_mean))


def simpo_losses(chosen_mean, rejected_mean, *, beta: float, gamma: float, label_smoothing: float = 0.0
                 ) -> torch.Tensor:
    z = beta * (chosen_mean - rejected_mean) - gamma
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def kto_kl(policy_kl, reference_kl, sum_over_ranks=None) -> torch.Tensor:
    """The KL estimate of KTO: the mean log-ratio of replies that do not answer their prompts, at least 0, no
    gradient (the loss uses it as a fixed reference point). sum_over_ranks(tensor) -> tensor: on several
    data-parallel ranks the mean is over every rank's KL replies (as TRL gathers them), so each rank's loss uses the
    same estimate a single process with the whole batch would."""
    log_ratio = (policy_kl - reference_kl).detach()
    total = torch.stack([log_ratio.sum(), log_ratio.new_full((), float(log_ratio.numel()))])
    if sum_over_ranks is not None:
        total = sum_over_ranks(total)
    return (total[0] / total[1].clamp(min=1)).clamp(min=0)


def kto_losses(policy, reference, desirable, kl, *, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> torch.Tensor:
    """desirable: bool [units]; kl: the estimate of `kto_kl`."""
    r = policy - reference
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable, good, bad)


def bradley_terry_losses(chosen_scores, rejected_scores) -> torch.Tensor:
    return -F.logsigmoid(chosen_scores - rejected_scores)
