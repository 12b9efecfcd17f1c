"""bitsandbytes 4-bit (NF4 / FP4) dequantisation in plain PyTorch, so torch.compile can fuse it.

bitsandbytes' `dequantize_4bit` is a Python function around custom ops: with double quantisation (QLoRA's
`compress_statistics`) it first dequantises the 8-bit absmax in one kernel, adds the offset in another, then
dequantises the 4-bit weight in a third, and torch.compile cannot see into any of them. Here the same arithmetic is
written with ordinary tensor ops (shift and mask the bytes, index the codebook, multiply by the block's scale), so
inductor generates one kernel for the whole thing, and can fuse the cast to the compute dtype into it.

The numbers are bitsandbytes' own, bit for bit (tests/test_fast_nf4.py checks it against
`bitsandbytes.functional.dequantize_4bit` in fp32, bf16 and fp16): every product is taken in fp32, in the order
bitsandbytes takes it, and cast once at the end. Compiled for a GPU, Triton contracts the nested absmax's
`code2 * absmax2 + offset` into one fused multiply-add, which can move that scale by one fp32 ulp (then an fp32 or,
rarely, an fp16 element by one ulp); inductor's `emulate_precision_casts=True` turns the contraction off.

Use it under torch.compile: run eagerly it is a handful of separate kernels with int64 intermediates, several
times slower than bitsandbytes' CUDA kernel. `dequantize_4bit_weight`, which the patched forwards call, takes it
when traced and bitsandbytes' kernel otherwise.

The storage format, as bitsandbytes 0.4x-0.50 writes it (functional.quantize_4bit, backends/default/ops.py):
  * the weight of shape `quant_state.shape` is flattened (row-major) and cut into blocks of `blocksize`
    elements; the last block may be short (bitsandbytes does not pad the data, only gives that block its own scale);
  * two elements per byte, the first in the high nibble; an odd element count leaves the last low nibble unused;
  * element = code[nibble] * absmax[block], in fp32, cast to `quant_state.dtype`;
  * nested (double quant): absmax is uint8 with its own blockwise state (`state2`: 256-entry `code`, fp32 `absmax`,
    blocksize 256) and a scalar `offset`: absmax = state2.code[absmax_u8] * state2.absmax[block] + offset, fp32.

`nf4_linear_forward` is a drop-in forward for `bitsandbytes.nn.Linear4bit` built on it. Either it hands F.linear a
plain tensor, so autograd saves the dequantised weight for backward instead of dequantising again there (faster), or
backward dequantises again (one layer's 16-bit weights less memory): the plan's `dequantize_once`.
`nf4_linear_with_adapter` is the second with a LoRA adapter added to the dequantised weight, one matmul for both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunelab.model import nf4_merge

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), already in [-1, 1]. Only used when a
# QuantState carries no codebook of its own.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize] for a flat fp32 `values` whose last block may be short.

    The short block is padded up to a full block and the padding dropped after: one reshape and one broadcast
    multiply, which compiles to a single loop (no concatenation of a "full blocks" and a "remainder" part).
    """
    n = values.numel()
    n_blocks = scales.numel()
    padded = F.pad(values, (0, n_blocks * blocksize - n))
    return (padded.view(n_blocks, blocksize) * scales.view(n_blocks, 1)).view(-1)[:n]


def absmax_fp32(quant_state) -> torch.Tensor:
    """The per-block scales of a 4-bit weight, as bitsandbytes' dequantize_4bit computes them (fp32, flat)."""
    if not quant_state.nested:
        return quant_state.absmax.float().view(-1)
    state2 = quant_state.state2
    # dequantize_blockwise(absmax, state2) then `absmax += offset`: product in fp32, then the add.
    code2 = state2.code.to(quant_state.absmax.device)
    scaled = _scale_blocks(code2[quant_state.absmax.view(-1).long()], state2.absmax.float(), state2.blocksize)
    return (scaled + quant_state.offset).float()


def dequantize_nf4(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The weight a bitsandbytes `Params4bit` holds, shape `quant_state.shape`, dtype `quant_state.dtype`.

    packed: the Params4bit data (uint8 [ceil(n / 2), 1]; another `quant_storage` dtype is viewed as bytes).
    quant_state: its bitsandbytes QuantState, nf4 or fp4 (they differ only in `quant_state.code`), nested or not.
    Equal to `bitsandbytes.functional.dequantize_4bit(packed, quant_state)`.
    """
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "this 4-bit weight was repacked by bitsandbytes for its CPU inference kernel (a Linear4bit forward in "
            "eval mode under no_grad on an AVX512-BF16 CPU); undo it with "
            "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse first, as nf4_linear_forward does"
        )
    if quant_state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_state.quant_type!r}")
    data = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    data = data.reshape(-1)
    n = math.prod(quant_state.shape)
    blocksize = quant_state.blocksize
    absmax = absmax_fp32(quant_state)
    n_blocks = absmax.numel()

    code = quant_state.code
    if code is None:
        if quant_state.quant_type != "nf4":
            raise ValueError("quant_state.code is missing and only the nf4 codebook is built in")
        code = torch.tensor(NF4_CODE)
    code = code.to(device=data.device, dtype=torch.float32)

    # Work in [block, byte in block, nibble] so each block's scale broadcasts: compiled, that is a plain strided
    # loop (about 2.6 TB/s on an H100, faster than bitsandbytes' own kernel), where flat indexing with
    # `i // blocksize` ran at 1.5 TB/s. A short last block is padded with zero bytes, dropped after.
    pad_bytes = n_blocks * blocksize // 2 - data.numel()
    if pad_bytes:
        data = F.pad(data, (0, pad_bytes))
    # First element in the high nibble, second in the low one. A broadcast shift rather than a stack of the two
    # halves: inductor keeps it in the same loop as the rest instead of writing the stacked indices out first.
    # (arange, not torch.tensor([4, 0]): building a tensor from a list on a GPU is a blocking host-to-device copy.)
    shifts = 4 - 4 * torch.arange(2, dtype=torch.uint8, device=data.device)
    nibbles = (data.view(n_blocks, blocksize // 2, 1) >> shifts) & 0x0F
    weight = (code[nibbles.long()] * absmax.view(n_blocks, 1, 1)).view(-1)
    if weight.numel() != n:
        weight = weight[:n]
    return weight.view(quant_state.shape).to(quant_state.dtype)


def dequantize_4bit_weight(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The same weight as `dequantize_nf4`, by whichever code is fast where it runs: traced by torch.compile, the plain
    ops that fuse into one kernel; eager (the MLP slices at long context run outside the compiled layer, generation
    runs the layers uncompiled), bitsandbytes' own kernel, since the plain ops one by one are several times slower
    and hold int64 and fp32 copies of the weight (0.7 GiB for one 8B MLP weight)."""
    if torch.compiler.is_compiling():
        return dequantize_nf4(packed, quant_state)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, quant_state)


def _dequantize_in_backward(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit weight again, for an input gradient. bitsandbytes' own kernel: an op compile cannot see into, so
    it is neither merged with the recomputed forward's dequantisation (same inputs) nor fused into its kernel, either
    of which would make the 16-bit copy live from the recompute to the backward again."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, quant_state).to(dtype)


@torch.library.custom_op("tunelab::add_scaled_product_", mutates_args=("acc",))
def add_scaled_product_(acc: torch.Tensor, b: torch.Tensor, a: torch.Tensor, alpha: float) -> None:
    """acc += alpha * b @ a, in place: cuBLAS adds the product in its epilogue. As a custom op that mutates `acc`,
    compiled code calls it in place on a fresh `acc` (inductor re-inplaces it), where a traced `acc.addmm_` becomes
    an out-of-place addmm that first copies `acc` into a new buffer: a pass over the weight and a memcpy launch per
    4-bit layer in backward (7.0 ms of copies and 4.7 ms of idle after them in an 8k Llama-3.1-8B QLoRA step;
    BENCHMARKS.md, "four small costs out of every step")."""
    acc.addmm_(b, a, alpha=alpha)


@add_scaled_product_.register_fake
def _(acc, b, a, alpha):
    return None


class _DequantizeAgainInBackward(torch.autograd.Function):
    """F.linear(x, W, bias) for a 4-bit W whose backward dequantises W again instead of keeping the 16-bit copy.

    F.linear saves the weight it is given for the input gradient: one layer's 16-bit weights (0.4 GiB at 7B) live
    from the recomputed forward to that layer's backward. This saves only the packed 4-bit weight, which exists
    anyway, and pays one more dequantisation a pass, as bitsandbytes' own MatMul4Bit does.
    """

    @staticmethod
    def forward(ctx, x, packed, quant_state, bias):
        ctx.quant_state = quant_state
        ctx.save_for_backward(packed)
        return F.linear(x, dequantize_4bit_weight(packed, quant_state).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _dequantize_in_backward(packed, ctx.quant_state, grad.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def nf4_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward for a `bitsandbytes.nn.Linear4bit`: patch with `layer.forward = types.MethodType(nf4_linear_forward,
    layer)`. peft's LoRA layers call `base_layer(x)`, so patching the base layer is enough for them too.

    Same dtype handling as Linear4bit.forward: x is cast to the layer's compute dtype (taken from the first input
    when none was set), the matmul runs in it with the bias cast to it, the result goes back to x's dtype.
    Autograd keeps the dequantised weight for the input gradient: one dequantisation a pass.
    """
    return _nf4_linear(self, x, keep_for_backward=True)


def nf4_linear_forward_dequantizing_again(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`nf4_linear_forward` whose backward dequantises the weight again (`_DequantizeAgainInBackward`): one layer's
    16-bit weights less memory, one more dequantisation a pass. (A function of its own, not a functools.partial:
    torch 2.11's dynamo breaks the graph at a partial bound as a module's forward, and the checkpoint around the
    layer then runs eagerly.)"""
    return _nf4_linear(self, x, keep_for_backward=False)


def _merged_weight(packed: torch.Tensor, quant_state, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                   dtype: torch.dtype, in_backward: bool = False) -> torch.Tensor:
    """dequantise(packed) in `dtype` + scale * lora_b @ lora_a, a fresh tensor, by the fastest code at hand.

    On a GPU with Triton: one kernel (`nf4_merge.merged_4bit_weight`), opaque to compile, so the recompute's and
    backward's calls stay apart. Elsewhere from plain ops: in the forward a product and an add that inductor fuses
    into the dequantisation's kernel (not addmm(weight, ...), which compiled copies the weight first); in backward
    bitsandbytes' dequantisation, which compile cannot merge with the recompute's plain ops (that would keep the
    16-bit weight alive from the recompute to the backward), then the product added in place in cuBLAS's epilogue
    (`add_scaled_product_`: bitsandbytes' output is ours to change).
    """
    if nf4_merge.kernel_applies(packed, quant_state):
        return nf4_merge.merged_4bit_weight(packed, quant_state, lora_a, lora_b, scale, dtype)
    if not in_backward:
        return dequantize_4bit_weight(packed, quant_state).to(dtype) + scale * (lora_b @ lora_a)
    weight = _dequantize_in_backward(packed, quant_state, dtype)
    add_scaled_product_(weight, lora_b, lora_a, scale)
    return weight


class _AdapterMergedIntoTheWeight(torch.autograd.Function):
    """F.linear(x, W + scale * lora_b @ lora_a, bias) for a 4-bit W: base layer and LoRA adapter as one matmul.

    peft adds a LoRA adapter's output to the base layer's: a matmul of x by lora_a (reading all of x), then an addmm
    that copies the base output and reads and writes it once more, and in backward one more add into x's gradient.
    Those passes grow with the tokens; at 8k tokens on an 8B shape they were 9% of a QLoRA step (BENCHMARKS.md round
    22). Adding the adapter to the weight instead costs passes over the weight, which do not grow with the tokens:
    the layer is one matmul by the merged weight (`_merged_weight`). Backward merges again and takes the input
    gradient in one matmul; lora_a's and lora_b's gradients are the usual ones, from x and the output gradient.
    Only x and the 4-bit bytes are saved. The merged weight is in the compute dtype, as the base layer's own output
    is; `lean_lora_forward` takes this path only without LoRA dropout (the adapter must see the same x).
    """

    @staticmethod
    def forward(ctx, x, packed, quant_state, lora_a, lora_b, scale, bias):
        ctx.quant_state, ctx.scale = quant_state, scale
        ctx.save_for_backward(x, packed, lora_a, lora_b)
        return F.linear(x, _merged_weight(packed, quant_state, lora_a, lora_b, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        x, packed, lora_a, lora_b = ctx.saved_tensors
        grad_x = grad_a = grad_b = grad_bias = None
        grad_2d, x_2d = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _merged_weight(packed, ctx.quant_state, lora_a, lora_b, ctx.scale, grad.dtype,
                                           in_backward=True)
        if ctx.needs_input_grad[3]:
            grad_a = (grad_2d @ lora_b).t() @ x_2d * ctx.scale
        if ctx.needs_input_grad[4]:
            grad_b = grad_2d.t() @ (x_2d @ lora_a.t()) * ctx.scale
        if ctx.needs_input_grad[6]:
            grad_bias = grad_2d.sum(0)
        return grad_x, None, None, grad_a, grad_b, None, grad_bias


def nf4_linear_with_adapter(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """`self(x) + scale * x @ lora_a.T @ lora_b.T` for a `Linear4bit` patched with
    `nf4_linear_forward_dequantizing_again`, in one matmul (`_AdapterMergedIntoTheWeight`). The lean LoRA forward
    calls it in compiled code, where the dequantisation is one fused kernel."""
    packed, quant_state, x, bias, input_dtype = _prepare(self, x)
    return _AdapterMergedIntoTheWeight.apply(x, packed, quant_state, lora_a.to(x.dtype), lora_b.to(x.dtype), scale,
                                             bias).to(input_dtype)


def _nf4_linear(self, x: torch.Tensor, keep_for_backward: bool) -> torch.Tensor:
    packed, quant_state, x, bias, input_dtype = _prepare(self, x)
    if not keep_for_backward:
        return _DequantizeAgainInBackward.apply(x, packed, quant_state, bias).to(input_dtype)
    w = dequantize_4bit_weight(packed, quant_state).to(x.dtype)
    return F.linear(x, w, bias).to(input_dtype)


def _prepare(self, x: torch.Tensor):
    """A Linear4bit's packed weight and QuantState, x and the bias in its compute dtype, and x's own dtype (for the
    output)."""
    weight = self.weight
    quant_state = getattr(weight, "quant_state", None) or getattr(self, "quant_state", None)
    if quant_state is None:
        raise ValueError("this Linear4bit has no quant_state: move it to a device (`.to(...)`) to quantise it first")
    packed = weight.data
    if getattr(quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacked it for its CPU inference kernel; put it back the way bitsandbytes itself does before
        # saving or moving to a GPU (Linear4bit._save_to_state_dict, Params4bit.cuda).
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        packed, quant_state = _convert_weight_packed_for_cpu_inverse(packed, quant_state)
        weight.data, weight.quant_state = packed, quant_state

    if not getattr(self, "compute_type_is_set", True):
        self.set_compute_type(x)
        self.compute_type_is_set = True
    input_dtype = x.dtype
    if getattr(self, "compute_dtype", None) is not None:
        x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return packed, quant_state, x, bias, input_dtype
