"""The lean LoRA forward (tunelab.model.fast.lean_lora_forward) computes what peft's forward computes.

Same tiny model, same adapter weights, same dropout masks (same seed): outputs and every adapter gradient must
match peft's own forward; the saved adapter must not change; unusual cases fall back to peft.
"""

import copy

import pytest
import torch

from tunelab.model.fast import use_lean_lora


def _peft_model(model_dir, dropout=0.1, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():  # lora_B starts at zero: make the adapter's contribution (and its A-gradients) non-zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.train()
    return model


def _loss_and_grads(model, ids, seed, autocast=False):
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_forward_equals_peft_outputs_and_adapter_grads(tiny_llama_dir, dropout):
    peft_model = _peft_model(tiny_llama_dir, dropout)
    lean = copy.deepcopy(peft_model)
    assert use_lean_lora(lean) > 0
    ids = torch.randint(0, 100, (2, 24))
    ref_logits, ref_grads = _loss_and_grads(peft_model, ids, seed=3)
    logits, grads = _loss_and_grads(lean, ids, seed=3)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == grads.keys() and any("lora_A" in n for n in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


def test_lean_forward_under_bf16_autocast_is_as_close_to_fp32_as_peft(tiny_llama_dir):
    peft_model = _peft_model(tiny_llama_dir, dropout=0.0)
    lean = copy.deepcopy(peft_model)
    use_lean_lora(lean)
    ids = torch.randint(0, 100, (2, 24))
    exact, exact_grads = _loss_and_grads(peft_model, ids, seed=1)
    ref, ref_grads = _loss_and_grads(peft_model, ids, seed=1, autocast=True)
    out, grads = _loss_and_grads(lean, ids, seed=1, autocast=True)
    err_peft = (ref - exact).norm() / exact.norm()
    err_lean = (out - exact).norm() / exact.norm()
    assert err_lean <= 1.5 * err_peft + 1e-4, (err_lean, err_peft)
    flat = lambda g: torch.cat([v.flatten() for k, v in sorted(g.items())])  # noqa: E731
    g_exact, g_peft, g_lean = flat(exact_grads), flat(ref_grads), flat(grads)
    assert (g_lean - g_exact).norm() / g_exact.norm() <= 1.5 * (g_peft - g_exact).norm() / g_exact.norm() + 1e-3


def test_disabled_adapter_and_switch_back_use_peft(tiny_llama_dir):
    model = _peft_model(tiny_llama_dir, dropout=0.0)
    model.eval()
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with model.disable_adapter():
            base_ref = model(input_ids=ids).logits
        n = use_lean_lora(model)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base_ref)
        assert use_lean_lora(model, on=False) == n
        assert not any("forward" in m.__dict__ for m in model.modules())
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_saved_adapter_is_unchanged(tiny_llama_dir, tmp_path):
    model = _peft_model(tiny_llama_dir)
    model.save_pretrained(tmp_path / "before")
    use_lean_lora(model)
    model.save_pretrained(tmp_path / "after")
    from safetensors.torch import load_file

    before = load_file(tmp_path / "before" / "adapter_model.safetensors")
    after = load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_compiled_lean_forward_equals_peft():
    """Under torch.compile the lean forward of a 16-bit layer adds the adapter with an elementwise kernel:
    output, input gradient and adapter gradients equal peft's eager forward."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lean = copy.deepcopy(model)
    assert use_lean_lora(lean) == 1
    torch._dynamo.reset()
    compiled = torch.compile(lean)
    x = torch.randn(6, 32)
    results = []
    for module, params in ((model, model), (compiled, lean)):  # the compiled module trains lean's parameters
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, [p.grad for p in params.parameters() if p.requires_grad]))
    (ref, ref_x, ref_g), (got, got_x, got_g) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-5, atol=1e-5)
    assert len(ref_g) == len(got_g) == 2
    for got_grad, ref_grad in zip(got_g, ref_g):
        torch.testing.assert_close(got_grad, ref_grad, rtol=1e-4, atol=1e-5)
