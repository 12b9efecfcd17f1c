"""The merged 4-bit weight's Triton kernel (tunelab.model.nf4_merge) on a GPU (skipped without CUDA and Triton).

Checked against bitsandbytes' own dequantisation plus the adapter's product in fp32: with a zero adapter the kernel
is bitsandbytes bit for bit; with one, each element is within one rounding of the exact sum. Then a compiled QLoRA
layer under activation checkpointing: the kernel writes the merged weight in the forward, the recompute and backward
(three separate calls, none merged by compile), and output and gradients match peft's eager forward.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("triton")
import bitsandbytes.functional as bnbf  # noqa: E402

from tests.test_fast_nf4 import _quantised as quantised  # noqa: E402
from tunelab.model import nf4_merge  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _quantised(shape, dtype, quant_type="nf4", nested=True, blocksize=64):
    """A weight quantised on the GPU by bitsandbytes: (packed bytes, QuantState)."""
    _, packed, state = quantised(shape, dtype, quant_type, nested, blocksize, device="cuda")
    return packed, state


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at the magnitude of each element of x (fp32)."""
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    return (x.abs() * eps).clamp_min(tiny)


# (4096, 4096) and (11008, 4096): a Llama-7B attention and MLP weight; (70, 192): rows and columns that fill no tile.
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (70, 192)], ids=str)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kernel_is_bitsandbytes_plus_the_product(shape, nested, quant_type, dtype):
    packed, state = _quantised(shape, dtype, quant_type, nested)
    assert nf4_merge.kernel_applies(packed, state)
    reference = bnbf.dequantize_4bit(packed, state)
    for rank in (8, 64, 3):
        zero_a = torch.zeros(rank, shape[1], device="cuda", dtype=dtype)
        zero_b = torch.zeros(shape[0], rank, device="cuda", dtype=dtype)
        assert torch.equal(nf4_merge.merged_4bit_weight(packed, state, zero_a, zero_b, 0.5, dtype), reference)

        lora_a = torch.randn(rank, shape[1], device="cuda", dtype=dtype) * 0.1
        lora_b = torch.randn(shape[0], rank, device="cuda", dtype=dtype) * 0.1
        exact = reference.float() + 0.25 * (lora_b.double() @ lora_a.double()).float()
        got = nf4_merge.merged_4bit_weight(packed, state, lora_a, lora_b, 0.25, dtype)
        assert got.dtype == dtype and got.shape == shape
        # one rounding to dtype of the sum (half an ulp) plus fp32 accumulation over the rank
        assert ((got.float() - exact).abs() <= _ulp(exact, dtype) + 1e-6).all(), rank


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_kernel_reads_other_blocksizes(blocksize):
    packed, state = _quantised((256, 512), torch.bfloat16, blocksize=blocksize)
    zero_a = torch.zeros(16, 512, device="cuda", dtype=torch.bfloat16)
    zero_b = torch.zeros(256, 16, device="cuda", dtype=torch.bfloat16)
    got = nf4_merge.merged_4bit_weight(packed, state, zero_a, zero_b, 1.0, torch.bfloat16)
    assert torch.equal(got, bnbf.dequantize_4bit(packed, state))


def test_rows_of_part_blocks_take_the_plain_ops():
    """Rows that are not whole 4-bit blocks (96 columns, blocks of 64) do not fit the kernel's tiles: the layer's
    merged weight comes from the plain ops, with the same numbers up to the product's rounding."""
    from tunelab.model.nf4 import _merged_weight

    packed, state = _quantised((64, 96), torch.bfloat16)
    assert not nf4_merge.kernel_applies(packed, state)
    lora_a = torch.randn(8, 96, device="cuda", dtype=torch.bfloat16)
    lora_b = torch.randn(64, 8, device="cuda", dtype=torch.bfloat16)
    exact = bnbf.dequantize_4bit(packed, state).float() + 0.5 * (lora_b.float() @ lora_a.float())
    for in_backward in (False, True):
        got = _merged_weight(packed, state, lora_a, lora_b, 0.5, torch.bfloat16, in_backward=in_backward)
        torch.testing.assert_close(got.float(), exact, rtol=2e-2, atol=2e-2)


def test_compiled_checkpointed_qlora_layer_writes_the_merged_weight_three_times():
    """A compiled, checkpointed 4-bit LoRA layer over many tokens (the QLoRA fast path): forward, recompute and
    backward each write the merged weight with the kernel (compile keeps the recompute's and backward's calls apart,
    so no 16-bit weight lives from one to the other), and output, input and LoRA gradients match peft's eager forward
    on the same 4-bit layer in fp32."""
    peft = pytest.importorskip("peft")
    import copy

    import torch._dynamo
    from torch._inductor.utils import run_and_get_code
    from torch.utils.checkpoint import checkpoint

    from tunelab.model.fast import patch_4bit_linears, use_lean_lora
    from tunelab.model.layers import _recompute_every_op

    torch.manual_seed(0)
    full = torch.nn.Linear(256, 512, bias=False)
    layer = bnb.nn.Linear4bit(256, 512, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.load_state_dict(full.state_dict())

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = layer

        def forward(self, x):  # silu's backward needs proj's output: the recompute runs the layer again
            return checkpoint(lambda h: torch.nn.functional.silu(self.proj(h)), x, use_reentrant=False,
                              context_fn=_recompute_every_op)  # as the decoder layers' checkpoint does

    model = peft.get_peft_model(Tiny().cuda(), peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                               target_modules=["proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    lean = copy.deepcopy(model)
    assert patch_4bit_linears(lean, fused=True, keep_for_backward=False) == 1
    assert use_lean_lora(lean) == 1
    x = torch.randn(2, 1024, 256, device="cuda")

    def run(module, compiled):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = (torch.compile(module, fullgraph=True) if compiled else module)(xi)
        (out.float() ** 2).mean().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        return out.float().detach(), xi.grad, grads

    ref_out, ref_x, ref_g = run(model, compiled=False)
    torch._dynamo.reset()
    (got_out, got_x, got_g), codes = run_and_get_code(run, lean, True)
    torch._dynamo.reset()
    kernel = "tunelab.write_merged_4bit_weight_"
    calls = [code.count(kernel + ".default(") for code in codes]
    assert calls == [1, 2], calls  # forward; the recompute's and backward's, not merged into one
    backward_code = codes[1]
    assert "dequantize_4bit" not in backward_code
    # bf16 matmuls against peft's bf16 base output plus fp32 adapter: compared as a whole
    assert (got_out - ref_out).norm() <= 1e-2 * ref_out.norm()
    assert (got_x - ref_x).norm() <= 2e-2 * ref_x.norm()
    assert ref_g.keys() == got_g.keys() and len(got_g) == 2
    for name in got_g:
        assert (got_g[name] - ref_g[name]).norm() <= 2e-2 * ref_g[name].norm(), name
