"""Mixed precision for full fine-tuning: trained weights kept in fp32 ("master weights") so small updates land; and
tunelab's 8-bit AdamW against bitsandbytes'.

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


@pytest.mark.parametrize("master", [True, False])
def test_lora_adapters_are_fp32_masters_or_bf16_like_trls_qlora(master):
    """peft makes adapters fp32; fp32_master_weights = False turns them to bf16 (what TRL does for QLoRA: half the
    adapter memory), except DoRA's magnitude vectors, whose updates bf16 would round away. Frozen weights stay."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "1"], use_dora=True))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trained.values()} == {torch.float32}  # peft's choice
    choose_precision(model, torch.bfloat16, torch.device("cuda"), fp32_master_weights=master)
    for name, param in trained.items():
        want = torch.float32 if master or "lora_magnitude_vector" in name else torch.bfloat16
        assert param.dtype == want, name
    assert any("lora_magnitude_vector" in n for n in trained) and any("lora_A" in n for n in trained)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)


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


def test_8bit_adamw_without_per_parameter_sync_updates_exactly_as_bitsandbytes():
    """Our AdamW8bit only drops bitsandbytes' torch.cuda.synchronize() per parameter: same states, same weights,
    and its state_dict loads into bitsandbytes' class (checkpoints stay interchangeable)."""
    bnb = pytest.importorskip("bitsandbytes")
    from types import SimpleNamespace

    from tunelab.train.adamw_8bit import AdamW8bit
    from tunelab.train.optim import build_optimizer

    def model():
        torch.manual_seed(0)  # a matrix big enough for 8-bit state (>= 4096 elements) and a small fp32-state one
        return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))

    def bnb_adamw(m):
        return bnb.optim.AdamW8bit([{"params": [m[0].weight], "weight_decay": 0.01},
                                    {"params": [m[0].bias, *m[1].parameters()], "weight_decay": 0.0}],
                                   lr=1e-2, betas=(0.9, 0.999))

    def steps(pairs, n):
        for _ in range(n):
            for m, opt in pairs:
                m(x).square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

    ours_model, theirs_model = model(), model()
    cfg = SimpleNamespace(optimizer="adamw_8bit", lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, loraplus_lr_ratio=None)
    ours = build_optimizer(ours_model, cfg, torch.device("cpu"))
    assert isinstance(ours, AdamW8bit)
    theirs = bnb_adamw(theirs_model)
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    steps([(ours_model, ours), (theirs_model, theirs)], 3)
    assert ours.state[ours_model[0].weight]["state1"].dtype == torch.uint8  # the 8-bit path did run
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    start = model()[0].weight.detach().clone()
    assert not torch.equal(ours_model[0].weight, start)  # and the weights did move

    # a fresh bitsandbytes optimizer resumed from our state_dict continues exactly as ours does: loading alone
    # not raising would pass with the step count or the 8-bit states lost
    resumed_model = model()
    resumed_model.load_state_dict(ours_model.state_dict())
    resumed = bnb_adamw(resumed_model)
    resumed.load_state_dict(ours.state_dict())
    steps([(ours_model, ours), (resumed_model, resumed)], 1)
    for a, b in zip(ours_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key in ("state1", "state2", "absmax1", "absmax2"):
        torch.testing.assert_close(resumed.state[resumed_model[0].weight][key], ours.state[ours_model[0].weight][key],
                                   rtol=0, atol=0)


def test_fp16_scales_the_loss_once():
    """fp16 needs a loss scale; DeepSpeed's engine has its own, and a GradScaler on top would scale the gradients by
    both while only DeepSpeed's is undone."""
    from tunelab.train.distributed import DistEnv
    from tunelab.train.deepspeed_engine import DeepSpeed
    from tunelab.train.strategy import DDP, SingleProcess

    env = DistEnv()
    for strategy, ours in ((SingleProcess(env), True), (DeepSpeed(env, cfg=None), False)):
        precision = choose_precision(_model(), torch.float16, torch.device("cuda"),
                                     grad_scaler=not strategy.scales_fp16_loss)
        assert precision.autocast_dtype == torch.float16
        assert (precision.scaler is not None) == ours, strategy.name
    assert not DDP.scales_fp16_loss


class _Stop(Exception):
    pass


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bf16"), (torch.float16, "fp16"), (None, "fp32")])
def test_the_engines_that_cast_weights_compute_in_the_dtype_the_loop_chose(dtype, name, monkeypatch):
    """FSDP2's mixed-precision policy and DeepSpeed's precision come from the loop's choice (cfg.dtype through
    choose_precision), not from the weights' dtype: dtype = 'fp32' on a GPU computes in fp32 under both."""
    import torch.distributed.fsdp as fsdp

    from tunelab.config.schema import TrainConfig
    from tunelab.train import deepspeed_configs
    from tunelab.train.deepspeed_engine import DeepSpeed
    from tunelab.train.distributed import DistEnv
    from tunelab.train.strategy import FSDP2

    policies = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, mp_policy: policies.append(mp_policy))
    monkeypatch.setattr("tunelab.train.strategy.decoder_layers", lambda model: [model[0]])
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.bfloat16))  # 16-bit weights, whatever is asked
    FSDP2(DistEnv()).setup(model, torch.optim.SGD(model.parameters(), lr=0.1), objective=None, compute_dtype=dtype)
    assert [p.param_dtype for p in policies] == [dtype, dtype]

    asked = []

    def build(cfg, *, precision, world_size):
        asked.append(precision)
        raise _Stop

    monkeypatch.setattr(deepspeed_configs, "build_deepspeed_config", build)
    pytest.importorskip("deepspeed")
    with pytest.raises(_Stop):
        DeepSpeed(DistEnv(), TrainConfig(deepspeed="zero2")).setup(model, None, None, compute_dtype=dtype)
    assert asked == [name]
