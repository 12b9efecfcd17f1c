"""Each preference loss equals its formula, written out here one unit at a time in plain Python floats (1e-5), on
random inputs; the objective wires them to the right sequences."""

import math

import pytest
import torch

from tunelab.model import preference_losses as L


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _random(n=64, low=-40.0, high=-1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.empty(n, dtype=torch.float64).uniform_(low, high, generator=g) for _ in range(4)]


def _close(got, want):
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta,smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_sigmoid_is_the_papers_formula(beta, smoothing):
    pc, pr, rc, rr = _random()
    want = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - c) - (b - d)  # log pi/ref of chosen minus that of rejected
        want.append(-(1 - smoothing) * _log_sigmoid(beta * h) - smoothing * _log_sigmoid(-beta * h))
    _close(L.dpo_losses(pc, pr, rc, rr, beta=beta, label_smoothing=smoothing), want)


def test_dpo_hinge_and_ipo_are_their_formulas():
    pc, pr, rc, rr = _random(low=-3, high=-0.1)
    beta = 0.3
    hs = [(a - c) - (b - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    _close(L.dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="hinge"), [max(0.0, 1 - beta * h) for h in hs])
    _close(L.dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="ipo"), [(h - 1 / (2 * beta)) ** 2 for h in hs])
    with pytest.raises(ValueError):
        L.dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="kto_pair")


def test_orpo_is_nll_plus_the_log_odds_ratio_term():
    mc, mr, _, _ = _random(low=-6, high=-0.01)
    beta = 0.25
    want = []
    for c, r in zip(mc.tolist(), mr.tolist()):
        log_odds = (c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r)))
        want.append(-c - beta * _log_sigmoid(log_odds))
    _close(L.orpo_losses(mc, mr, beta=beta), want)


def test_orpo_log_odds_stay_finite_near_probability_one():
    tiny = torch.tensor([-1e-9, -1e-12], dtype=torch.float32)
    assert torch.isfinite(L.log_odds_ratio(tiny, torch.tensor([-2.0, -3.0]))).all()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_is_its_formula(smoothing):
    mc, mr, _, _ = _random(low=-5, high=-0.1)
    beta, gamma = 2.0, 0.5
    want = []
    for c, r in zip(mc.tolist(), mr.tolist()):
        z = beta * (c - r) - gamma
        want.append(-(1 - smoothing) * _log_sigmoid(z) - smoothing * _log_sigmoid(-z))
    _close(L.simpo_losses(mc, mr, beta=beta, gamma=gamma, label_smoothing=smoothing), want)


def test_kto_is_its_formula_with_the_kl_estimate_clamped_and_detached():
    p, r, pk, rk = _random(low=-20, high=-1)
    desirable = torch.arange(64) % 3 != 0
    beta, wd, wu = 0.2, 1.0, 1.5
    kl_value = max(0.0, sum(a - b for a, b in zip(pk.tolist(), rk.tolist())) / 64)
    pk.requires_grad_(True)
    kl = L.kto_kl(pk, rk)
    assert not kl.requires_grad
    assert kl.item() == pytest.approx(kl_value, abs=1e-9)
    want = []
    for a, b, good in zip(p.tolist(), r.tolist(), desirable.tolist()):
        ratio = a - b
        want.append(wd * (1 - _sigmoid(beta * (ratio - kl_value))) if good
                    else wu * (1 - _sigmoid(beta * (kl_value - ratio))))
    _close(L.kto_losses(p, r, desirable, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu), want)
    # a policy below its reference on mismatched replies gives a KL estimate of 0, not a negative one
    assert L.kto_kl(torch.tensor([-5.0]), torch.tensor([-1.0])).item() == 0.0


def test_bradley_terry_is_its_formula():
    sc, sr, _, _ = _random(low=-4, high=4)
    _close(L.bradley_terry_losses(sc, sr), [-_log_sigmoid(a - b) for a, b in zip(sc.tolist(), sr.tolist())])
