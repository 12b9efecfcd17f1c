"""LoRA dropout with hashed masks (tunelab.model.dropout): torch.nn.Dropout's distribution, masks that compiled code
recomputes bit for bit, and a swap that leaves the model and the saved adapter alone."""

import math

import pytest
import torch

from tunelab.model.dropout import HashedDropout, hashed_dropout, keep_mask, use_hashed_dropout
from tunelab.model.fast import use_lean_lora

P = 0.1


def _dropped(shape, seed):
    return ~keep_mask(torch.Size(shape), torch.tensor(seed, dtype=torch.int32), P)


def _close_to(observed: float, expected: float, n: int):
    """Within 5 standard deviations of a binomial proportion."""
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert abs(observed - expected) < 5 * sigma, (observed, expected, sigma)


def test_keeps_one_minus_p_and_is_unbiased():
    torch.manual_seed(0)
    x = torch.ones(1024, 4096)
    y = hashed_dropout(x, P)
    kept = (y != 0).float().mean().item()
    _close_to(kept, 1 - P, x.numel())
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / (1 - P))))
    assert abs(y.mean().item() - 1) < 5 * math.sqrt(P / (1 - P) / x.numel())


@pytest.mark.parametrize("pair", ["neighbours", "rows", "calls"])
def test_masks_are_independent(pair):
    """Two elements are both dropped with probability p**2: next to each other, one row apart, or at the same
    position in two calls (the adapters of q, k and v see one input, and peft gives each its own mask)."""
    a = _dropped((1024, 4096), 12345)
    if pair == "neighbours":
        both = a[:, 1:] & a[:, :-1]
    elif pair == "rows":
        both = a[1:] & a[:-1]
    else:
        both = a & _dropped((1024, 4096), 12346)
    _close_to(both.float().mean().item(), P * P, both.numel())


def test_drop_counts_in_windows_follow_the_binomial():
    """Dropped elements in windows of 16: a chi-square test against Binomial(16, p) (a hash with short-range
    structure would bunch or spread them)."""
    counts = _dropped((4096, 4096), 7).view(-1, 16).sum(-1)
    observed = torch.bincount(counts, minlength=17).double()
    expected = torch.tensor([math.comb(16, k) * P**k * (1 - P)**(16 - k) for k in range(17)]) * counts.numel()
    keep = expected > 20  # the usual chi-square condition; the tail bins merge into the last
    o = torch.cat([observed[keep], observed[~keep].sum().view(1)])
    e = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    chi2 = ((o - e) ** 2 / e).sum().item()
    assert chi2 < 30, chi2  # ~8 degrees of freedom: 30 is far beyond the 0.1% point (26.1)


def test_each_call_draws_its_seed_from_torch_and_the_same_seed_gives_the_same_mask():
    x = torch.ones(64, 256)
    torch.manual_seed(3)
    first, second = hashed_dropout(x, P), hashed_dropout(x, P)
    torch.manual_seed(3)
    assert torch.equal(hashed_dropout(x, P), first) and not torch.equal(first, second)


def test_outside_training_at_p_zero_and_at_p_one():
    x = torch.randn(8, 32)
    assert hashed_dropout(x, P, training=False) is x and hashed_dropout(x, 0.0) is x
    assert torch.equal(hashed_dropout(x, 1.0), torch.zeros_like(x))


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(5)
    x = torch.randn(32, 64, requires_grad=True)
    y = hashed_dropout(x, P)
    y.sum().backward()
    expected = (y != 0).float() / (1 - P)
    torch.testing.assert_close(x.grad, expected)


def test_compiled_mask_equals_eager_mask():
    """inductor's generated code computes the same bits as eager torch (int32 arithmetic that wraps)."""
    seed = torch.tensor(987654321, dtype=torch.int32)
    shape = torch.Size((3, 100, 257))
    torch._dynamo.reset()
    compiled = torch.compile(lambda s: keep_mask(shape, s, P))(seed)
    assert torch.equal(compiled, keep_mask(shape, seed, P))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(2048, 4096), (2, 1000, 11008), (3, 100, 257)])
def test_on_gpu_compiled_and_graphed_masks(shape):
    """On CUDA, inductor's Triton code computes the CPU's bits; replayed as a CUDA graph, each replay draws a new
    seed (a mask that stayed the same would be no dropout at all)."""
    seed = torch.tensor(2024, dtype=torch.int32)
    torch._dynamo.reset()
    on_gpu = torch.compile(lambda s: keep_mask(torch.Size(shape), s, P))(seed.cuda())
    assert torch.equal(on_gpu.cpu(), keep_mask(torch.Size(shape), seed, P))
    graphed = torch.compile(lambda x: hashed_dropout(x, P) * 1, mode="reduce-overhead")
    x = torch.ones(shape, device="cuda", dtype=torch.bfloat16)
    masks = [(graphed(x) != 0).clone() for _ in range(4)]
    assert not torch.equal(masks[-1], masks[-2])
    _close_to(masks[-1].float().mean().item(), 1 - P, masks[-1].numel())


def test_swap_keeps_p_mode_and_state_dict_and_swaps_back(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules="all-linear"))
    model.train()
    model.save_pretrained(tmp_path / "before")
    keys = set(model.state_dict())
    n = use_lean_lora(model, hashed_dropout=True)
    hashed = [m for m in model.modules() if isinstance(m, HashedDropout)]
    assert len(hashed) == n > 0 and all(m.p == 0.25 and m.training for m in hashed)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "after")
    before = load_file(tmp_path / "before" / "adapter_model.safetensors")
    after = load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    use_lean_lora(model, on=False)
    assert not any(isinstance(m, HashedDropout) for m in model.modules())
    assert sum(type(m) is torch.nn.Dropout for m in model.modules()) == n


def test_the_module_hashes_in_compiled_code_and_runs_torchs_dropout_eagerly():
    """Eager (MLP slices, use_compile = False) the module is torch's dropout, one kernel instead of a dozen integer
    ones; compiled it draws the hashed mask."""
    module, x = HashedDropout(P), torch.ones(64, 256)
    torch.manual_seed(4)
    eager = module(x)
    torch.manual_seed(4)
    assert torch.equal(eager, torch.nn.functional.dropout(x, P, training=True))
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager")
    torch.manual_seed(4)
    hashed = compiled(x)
    torch.manual_seed(4)
    assert torch.equal(hashed, hashed_dropout(x, P)) and not torch.equal(hashed, eager)


def test_use_hashed_dropout_leaves_identity_alone():
    dropouts = torch.nn.ModuleDict({"default": torch.nn.Identity(), "other": torch.nn.Dropout(0.2)})
    assert use_hashed_dropout(dropouts) == 1 and isinstance(dropouts["default"], torch.nn.Identity)
    assert use_hashed_dropout(dropouts) == 0  # already swapped
