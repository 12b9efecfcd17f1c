"""The plain-PyTorch 4-bit dequantisation (tunelab.model.nf4) gives bitsandbytes' numbers, bit for bit.

Compared with `bitsandbytes.functional.dequantize_4bit` in fp32 / bf16 / fp16, nf4 and fp4, with and without double
quantisation, for sizes that fill the last block and sizes that do not; then a real `bnb.nn.Linear4bit` with the
patched forward (same output, same input and LoRA gradients) and `torch.compile` of the function (same as eager).

One caveat found here: bitsandbytes 0.50's CPU C kernel for dequantize_4bit is wrong when a row's length is a multiple
of 32 but not of the blocksize and there is more than one row (e.g. (96, 160) at blocksize 64: errors of 2 on
N(0, 1) data). Its own pure-torch kernel (backends/default, the one the fallback paths use) and its quantiser agree with
each other and with us, so for such shapes we compare with that kernel and with the quantisation error bound.
"""

import types

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from tunelab.model.nf4 import dequantize_nf4, nf4_linear_forward  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _quantised(shape, dtype, quant_type="nf4", nested=True, blocksize=64, seed=0, device="cpu"):
    torch.manual_seed(seed)
    weight = (torch.randn(*shape, device=device) * 0.05).to(dtype)
    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return weight, packed, state


# (33, 70): 2310 elements, the last block holds 6; (7, 9): odd count, a half-used last byte (bitsandbytes' torch
# fallback path); (5,): one short block; (96, 192): full blocks that straddle rows.
@pytest.mark.parametrize("shape", [(33, 70), (7, 9), (5,), (96, 192)])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_equals_bitsandbytes(shape, nested, quant_type, dtype):
    _, packed, state = _quantised(shape, dtype, quant_type, nested)
    expected = bnbf.dequantize_4bit(packed, state)
    got = dequantize_nf4(packed, state)
    assert got.shape == expected.shape == torch.Size(shape)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes_equal_bitsandbytes(blocksize):
    _, packed, state = _quantised((33, 70), torch.bfloat16, blocksize=blocksize)
    assert torch.equal(dequantize_nf4(packed, state), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_of_160_match_reference_and_error_bound(nested, dtype):
    """(96, 160): the shape where bitsandbytes' CPU C kernel goes wrong (see the module docstring)."""
    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    except ImportError:
        pytest.skip("this bitsandbytes has no backends.default._dequantize_4bit_compute")
    weight, packed, state = _quantised((96, 160), dtype, nested=nested)
    got = dequantize_nf4(packed, state)

    absmax = state.absmax
    if nested:  # bitsandbytes' own absmax, to check our element maths on its own
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    reference = _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), state.code, 64, state.shape, dtype)
    assert torch.equal(got, reference)

    # Independent of any implementation: each element lies within half the widest NF4 gap, (-0.6961928 - -1) / 2 =
    # 0.152, of its block's absmax from the original, plus the error of the stored absmax (8-bit when nested) and
    # rounding; a wrong block index or nibble order breaks that (bitsandbytes' CPU kernel is off by far more here).
    true_absmax = weight.float().reshape(-1, 64).abs().amax(dim=1)
    bound = 0.153 * true_absmax + (absmax.float() - true_absmax).abs() + 2**-7 * true_absmax
    error = (got.float() - weight.float()).abs()
    assert (error <= bound.repeat_interleave(64).reshape(96, 160)).all()


def test_non_uint8_quant_storage_is_read_as_bytes():
    """A bf16 `quant_storage` (used for FSDP) holds the same bytes; they are read as bytes."""
    torch.manual_seed(1)
    weight = torch.randn(64, 128, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(dequantize_nf4(packed, state), bnbf.dequantize_4bit(packed, state))


def _linear4bit(in_features, out_features, compute_dtype, bias=True, seed=0):
    """A bnb.nn.Linear4bit quantised on CPU: load full weights, then `.to("cpu")` quantises them (Params4bit.to)."""
    torch.manual_seed(seed)
    full = torch.nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True
    )
    layer.load_state_dict(full.state_dict())
    layer = layer.to("cpu")
    assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.nested
    return layer


def _output_and_input_grad(forward, x):
    x = x.detach().clone().requires_grad_(True)  # requires_grad: bitsandbytes' CPU inference repack stays off
    out = forward(x)
    (out.float() ** 2).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
def test_patched_linear4bit_forward_matches_bitsandbytes(compute_dtype, bias):
    layer = _linear4bit(128, 48, compute_dtype, bias=bias)
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32)
    expected_out, expected_grad = _output_and_input_grad(layer, x)
    patched = types.MethodType(nf4_linear_forward, layer)
    out, grad = _output_and_input_grad(patched, x)
    assert out.dtype == x.dtype and grad.dtype == x.dtype
    assert torch.equal(out, expected_out)
    assert torch.equal(grad, expected_grad)


def test_patched_forward_dequantises_once_for_forward_and_backward_with_bitsandbytes_kernel_when_eager():
    """The dequantised weight is computed once in forward and reused by backward (not dequantised again); run
    eagerly (outside compiled layers) by bitsandbytes' kernel, which is faster there than the plain ops."""
    layer = _linear4bit(128, 32, torch.float32)
    calls = []

    import tunelab.model.nf4 as nf4

    original, bnb_dequantize = nf4.dequantize_nf4, bnbf.dequantize_4bit

    layer.forward = types.MethodType(nf4_linear_forward, layer)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nf4, "dequantize_nf4", lambda *a: calls.append("plain") or original(*a))
        mp.setattr(bnbf, "dequantize_4bit", lambda *a, **k: calls.append("bitsandbytes") or bnb_dequantize(*a, **k))
        x = torch.randn(3, 128, requires_grad=True)
        layer(x).sum().backward()
    assert calls == ["bitsandbytes"]  # eager: bitsandbytes' kernel, not the plain ops meant for compile
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_that_dequantises_again_in_backward_keeps_no_16_bit_weight(bias):
    """keep_for_backward=False: bitsandbytes' numbers (output, input and bias gradients), the weight dequantised
    once in forward and once more in backward, and nothing of the weight's shape saved for backward but the
    packed 4-bit bytes (the kept path saves the dequantised weight)."""
    import tunelab.model.nf4 as nf4

    layer = _linear4bit(128, 48, torch.bfloat16, bias=bias)
    if bias:
        layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    expected_out, expected_grad = _output_and_input_grad(layer, x)
    expected_bias_grad = layer.bias.grad.clone() if bias else None
    layer.zero_grad(set_to_none=True)

    calls, saved = [], {}
    original, bnb_dequantize = nf4.dequantize_nf4, bnbf.dequantize_4bit
    for keep in (True, False):
        forward = types.MethodType(nf4_linear_forward if keep else nf4.nf4_linear_forward_dequantizing_again, layer)
        calls.clear()
        saved[keep] = []
        with pytest.MonkeyPatch.context() as mp, torch.autograd.graph.saved_tensors_hooks(
                lambda t, keep=keep: saved[keep].append((t.shape, t.dtype)) or t, lambda t: t):
            mp.setattr(nf4, "dequantize_nf4", lambda *a: calls.append(1) or original(*a))
            mp.setattr(bnbf, "dequantize_4bit", lambda *a, **k: calls.append(1) or bnb_dequantize(*a, **k))
            out, grad = _output_and_input_grad(forward, x)
        assert len(calls) == (1 if keep else 2)
        assert torch.equal(out, expected_out) and torch.equal(grad, expected_grad)
        if bias:
            # a sum over the batch in bf16: the order of the additions differs from bitsandbytes'
            torch.testing.assert_close(layer.bias.grad, expected_bias_grad, rtol=2e-2, atol=2e-2)
            layer.zero_grad(set_to_none=True)
    weights = {keep: [dtype for shape, dtype in saved[keep] if sorted(shape) == [48, 128]] for keep in saved}
    assert weights == {True: [torch.bfloat16], False: []}


def test_peft_lora_on_patched_base_layer(tmp_path):
    """peft's 4-bit LoRA layer calls base_layer(x): patching the base layer gives the same output and LoRA grads."""
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = _linear4bit(64, 64, torch.float32)

        def forward(self, x):
            return self.proj(x)

    def loss_and_grads(model, x):
        out = model(x)
        (out**2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out.detach(), grads

    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    with torch.no_grad():  # lora_B starts at zero: make the adapter's A-gradients non-zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    lora_layer = model.base_model.model.proj
    assert isinstance(lora_layer.base_layer, bnb.nn.Linear4bit)

    x = torch.randn(4, 64)
    expected_out, expected_grads = loss_and_grads(model, x)
    lora_layer.base_layer.forward = types.MethodType(nf4_linear_forward, lora_layer.base_layer)
    out, grads = loss_and_grads(model, x)
    assert torch.equal(out, expected_out)
    assert expected_grads.keys() == grads.keys() and len(grads) == 2
    for name in grads:
        assert torch.equal(grads[name], expected_grads[name]), name


def test_repacked_cpu_weight_is_refused_by_dequantize_and_restored_by_forward():
    """bitsandbytes repacks a Linear4bit for its AVX512-BF16 CPU kernel in eval/no_grad forwards; that layout is not
    the storage format, so dequantize_nf4 refuses it and the patched forward restores the format first."""
    layer = _linear4bit(64, 32, torch.float32)
    packed_before = layer.weight.data.clone()
    try:
        packed, state = bnbf._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    except Exception as exc:  # pragma: no cover - a bitsandbytes without the CPU repack
        pytest.skip(f"bitsandbytes cannot repack on this CPU: {exc}")
    with pytest.raises(ValueError, match="repacked"):
        dequantize_nf4(packed, state)

    layer.weight.data, layer.weight.quant_state = packed, state
    out = types.MethodType(nf4_linear_forward, layer)(torch.randn(3, 64))
    assert torch.equal(layer.weight.data.view(-1), packed_before.view(-1))  # the 4-bit codes are back in place
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert out.shape == (3, 32) and torch.isfinite(out).all()


def test_compiled_dequantize_equals_eager():
    """torch.compile (inductor's C++ backend on CPU) of the function gives the eager numbers. About 10 s cold."""
    import torch._dynamo

    cases = [((33, 70), torch.bfloat16, True), ((96, 160), torch.float32, False), ((7, 9), torch.float16, True)]
    for shape, dtype, nested in cases:
        _, packed, state = _quantised(shape, dtype, nested=nested)
        torch._dynamo.reset()  # a fresh compile per case, so none falls back to eager at the recompile limit
        compiled = torch.compile(dequantize_nf4, fullgraph=True)
        assert torch.equal(compiled(packed, state), dequantize_nf4(packed, state)), (shape, dtype, nested)
    torch._dynamo.reset()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_compiled_lora_on_a_4bit_layer_over_many_tokens_merges_the_adapter_into_the_weight(bias):
    """Compiled, the lean LoRA forward of a 4-bit layer (dequantised again in backward, the QLoRA default) over many
    tokens adds the adapter to the dequantised weight and runs one matmul (`nf4.nf4_linear_with_adapter`): output,
    input gradient and LoRA gradients equal peft's own eager forward in fp32, the forward's matmuls are B @ A and
    x by the merged weight where peft runs three by x, and no 16- or 32-bit weight is saved for backward (it
    dequantises again). Over a few tokens the layer keeps peft's three (merging would cost more than it saves)."""
    peft = pytest.importorskip("peft")
    import copy

    import torch._dynamo
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from tunelab.model.fast import patch_4bit_linears, use_lean_lora

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = _linear4bit(64, 40, torch.float32, bias=bias)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"]))
    with torch.no_grad():  # lora_B starts at zero: make the adapter's output and its A-gradients non-zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    if bias:
        model.base_model.model.proj.base_layer.bias.requires_grad_(True)
    lean = copy.deepcopy(model)
    assert patch_4bit_linears(lean, fused=True, keep_for_backward=False) == 1
    assert use_lean_lora(lean) == 1
    forward_graphs = []

    def keep_forward(gm, example_inputs):
        forward_graphs.append(gm.graph)
        return make_boxed_func(gm)

    torch._dynamo.reset()
    compiled = torch.compile(lean, fullgraph=True)  # inductor, as on the GPU (its C++ code here)
    x = torch.randn(3, 40, 64)  # 120 tokens: past the point where merging pays for a 64 -> 40 layer (12)
    results = []
    for module, params in ((model, model), (compiled, lean)):
        xi = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = module(xi)
        (out**2).sum().backward()
        grads = {n: p.grad.clone() for n, p in params.named_parameters() if p.requires_grad}
        results.append((out.detach(), xi.grad, grads, saved))
    (ref, ref_x, ref_g, _), (got, got_x, got_g, saved) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-5, atol=1e-5)
    assert ref_g.keys() == got_g.keys() and len(got_g) == 2 + bias
    for name in got_g:  # fp32 sums over 120 tokens in another order: compared as a whole
        assert (got_g[name] - ref_g[name]).norm() <= 1e-5 * ref_g[name].norm(), name
    assert (40, 64 + 8) not in saved and (40, 64) not in saved  # the 4-bit bytes are saved, no 16/32-bit weight

    # Backward adds the adapter to bitsandbytes' fresh weight in place, in the matmul's epilogue: no addmm into a
    # copy of the weight (a pass over it and a memcpy launch a layer), no clone before the in-place op.
    from torch._inductor.utils import run_and_get_code

    def step(x):
        out = torch.compile(lean, fullgraph=True)(x)
        (out**2).sum().backward()

    torch._dynamo.reset()
    _, codes = run_and_get_code(step, x.clone().requires_grad_())
    backward_code = next(code for code in codes if "bitsandbytes.dequantize_4bit" in code)
    assert "tunelab.add_scaled_product_.default(" in backward_code
    assert "addmm" not in backward_code and "clone" not in backward_code

    def forward_matmuls(tokens):
        torch._dynamo.reset()
        forward_graphs.clear()
        backend = aot_autograd(fw_compiler=keep_forward, bw_compiler=make_boxed_func)
        torch.compile(lean, backend=backend, fullgraph=True)(torch.randn(1, tokens, 64, requires_grad=True))
        matmuls = [node for node in forward_graphs[0].nodes
                   if str(node.target) in ("aten.mm.default", "aten.addmm.default")]
        # cuBLAS's addmm into a weight-sized input first copies that input: the adapter's product is added in the
        # dequantisation's kernel instead
        assert not [n for n in matmuls if str(n.target) == "aten.addmm.default"
                    and tuple(n.args[0].meta["val"].shape) == (40, 64)]
        return len(matmuls)

    assert forward_matmuls(120) == 2  # B @ A, then x by the merged weight (peft's: base, lora_A, lora_B, all by x)
    assert forward_matmuls(8) == 3
    lean.base_model.model.proj.lora_dropout["default"] = torch.nn.Dropout(0.1)  # the adapter sees another x
    assert forward_matmuls(120) == 3
    torch._dynamo.reset()
