"""Mixed precision for full fine-tuning: trained weights kept in fp32 ("master weights") so small updates land.

choose_precision only moves tensors and picks the autocast dtype, so it runs here on CPU tensors with a CUDA
device named (nothing is computed on the GPU); the GPU loop itself is tests/test_train_gpu.py.
"""

import pytest
import torch

from tunelab.train.optim import choose_precision


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8)).to(torch.bfloat16)
    model[0].weight.requires_grad_(False)  # a frozen weight stays as it is
    return model


@pytest.mark.parametrize("master", [True, False])
def test_bf16_trained_weights_become_fp32_masters_unless_turned_off(master):
    model = _model()
    precision = choose_precision(model, torch.bfloat16, torch.device("cuda"), fp32_master_weights=master)
    assert precision.autocast_dtype == torch.bfloat16 and precision.scaler is None  # still computes in bf16
    assert model[1].weight.dtype == (torch.float32 if master else torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16


def test_on_cpu_nothing_changes():
    model = _model()
    assert choose_precision(model, torch.bfloat16, torch.device("cpu")).autocast_dtype is None
    assert model[1].weight.dtype == torch.bfloat16


def test_an_lr_2e5_update_survives_in_fp32_but_not_in_bf16():
    # Why master weights: AdamW's first step moves each weight by ~lr. Weights near 0.5 in bf16 have a spacing of
    # 2^-8 = 0.0039, so a 2e-5 step rounds back to the same value; in fp32 it lands.
    changed = {}
    for master in (True, False):
        weight = torch.nn.Parameter(torch.full((64,), 0.5, dtype=torch.bfloat16))
        model = torch.nn.Module()
        model.weight = weight
        choose_precision(model, torch.bfloat16, torch.device("cuda"), fp32_master_weights=master)
        before = weight.detach().clone()
        optimizer = torch.optim.AdamW([weight], lr=2e-5, weight_decay=0.0)
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        changed[master] = bool((weight.detach() != before).all())
    assert changed == {True: True, False: False}
