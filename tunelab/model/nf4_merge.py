"""A 4-bit weight with its LoRA adapter added, `dequantise(W) + scale * lora_b @ lora_a`, written by one Triton kernel.

A QLoRA layer that runs as one matmul by its merged weight (`nf4._AdapterMergedIntoTheWeight`) builds that weight
three times a step: in the forward, in the checkpoint's recompute and in backward. From plain ops (nf4.py's way
where this kernel does not apply) that is cuBLAS writing the rank-r product (the weight's size in 16 bits) and a
second kernel reading the 4-bit bytes and that product to write the sum, or in backward, which must not share the
recompute's kernel, bitsandbytes' dequantisation and an addmm over its output. Here one kernel reads the 4-bit bytes
and their scales, takes the product's tile in registers (`tl.dot`, fp32 accumulation over the rank) and writes the
sum: half a byte read and two written per element, the least the result allows. On an H200 it takes 24 µs for a
4096 x 4096 weight where the plain ops take 43 (BENCHMARKS.md, "the merged 4-bit weight in one Triton kernel").

The numbers: each element is bitsandbytes' dequantisation bit for bit (code * scale in fp32, rounded once to the
compute dtype; no fused multiply-adds, as in bitsandbytes' two-step nested scale), then the product is added in fp32
and the sum rounded once. The plain-op path rounds the product to 16 bits before adding it, so the two differ by at
most one rounding of the product.

The kernel runs where Triton does (CUDA); `kernel_applies` says whether it can write a given weight, and nf4.py takes
the plain ops elsewhere (CI runs it in Triton's CPU interpreter: tests/test_nf4_merge_cpu.py). It is an opaque
custom op that writes into a fresh tensor: torch.compile neither traces into it nor merges two calls with the same
inputs (the recompute's and backward's), since each writes its own `empty`.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None

# A program writes 64 rows x 128 columns (64 byte pairs) with 8 warps: the fastest of eight tiles measured on an H200
# (BENCHMARKS.md, "the merged 4-bit weight in one Triton kernel").
TILE = (64, 64, 8)


@functools.cache
def _kernel():
    """The Triton kernel, compiled on first use (importing Triton is slow and it is absent on CPU-only machines)."""
    import triton
    import triton.language as tl

    @triton.jit
    def merged_weight_kernel(out_ptr, packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                             b_ptr, a_ptr, scale, n_rows, n_cols,
                             BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                             RANK: tl.constexpr, RANK_PAD: tl.constexpr, IEEE: tl.constexpr,
                             ROWS: tl.constexpr, PAIRS: tl.constexpr):
        # A program writes ROWS rows x 2 * PAIRS columns: PAIRS bytes a row, byte j holding columns 2j (its high
        # nibble) and 2j + 1, so each nibble's value is computed where it is read, and the two halves interleaved
        # at the end. Rows are whole blocks (the caller checks), so each block's scale is read once and broadcast
        # over its BLOCKSIZE / 2 bytes; read per element, it makes the kernel 2-3x slower (BENCHMARKS.md, "the merged
        # 4-bit weight in one Triton kernel").
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        pairs = tl.program_id(1) * PAIRS + tl.arange(0, PAIRS)
        n_blocks_in_row = n_cols // BLOCKSIZE
        BLOCKS: tl.constexpr = 2 * PAIRS // BLOCKSIZE
        blocks = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (pairs < n_cols // 2)[None, :]
        byte = tl.load(packed_ptr + rows[:, None] * (n_cols // 2) + pairs[None, :], mask=mask, other=0).to(tl.int32)

        block_index = rows[:, None] * n_blocks_in_row + blocks[None, :]
        block_mask = row_ok[:, None] & (blocks < n_blocks_in_row)[None, :]
        if NESTED:  # the scale is itself 8-bit: code2[u8] * absmax2[its block] + offset
            scale_u8 = tl.load(absmax_ptr + block_index, mask=block_mask, other=0).to(tl.int32)
            block_scale = (tl.load(code2_ptr + scale_u8)
                           * tl.load(absmax2_ptr + block_index // BLOCKSIZE2, mask=block_mask, other=0)
                           + tl.load(offset_ptr))
        else:
            block_scale = tl.load(absmax_ptr + block_index, mask=block_mask, other=0)
        block_scale = tl.reshape(tl.broadcast_to(block_scale[:, :, None], (ROWS, BLOCKS, BLOCKSIZE // 2)),
                                 (ROWS, PAIRS))

        # The codebook from registers (tl.gather), not a load per element.
        code = tl.load(code_ptr + tl.arange(0, 16))
        first = tl.reshape(tl.gather(code, tl.reshape((byte >> 4) & 0xF, (ROWS * PAIRS,)), 0), (ROWS, PAIRS))
        second = tl.reshape(tl.gather(code, tl.reshape(byte & 0xF, (ROWS * PAIRS,)), 0), (ROWS, PAIRS))
        dtype = out_ptr.dtype.element_ty
        first = (first * block_scale).to(dtype).to(tl.float32)
        second = (second * block_scale).to(dtype).to(tl.float32)

        # The adapter's product for these columns, split into the even (first) and odd (second) ones.
        k = tl.arange(0, RANK_PAD)
        k_ok = k < RANK
        b = tl.load(b_ptr + rows[:, None] * RANK + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
        cols = tl.program_id(1) * 2 * PAIRS + tl.arange(0, 2 * PAIRS)
        col_ok = cols < n_cols
        a = tl.load(a_ptr + k[:, None] * n_cols + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0)
        a_first, a_second = tl.split(tl.reshape(a, (RANK_PAD, PAIRS, 2)))
        if IEEE:  # fp32 weights: no TF32 rounding of the adapter
            first += scale * tl.dot(b, a_first, input_precision="ieee")
            second += scale * tl.dot(b, a_second, input_precision="ieee")
        else:
            first += scale * tl.dot(b, a_first)
            second += scale * tl.dot(b, a_second)

        out = tl.interleave(first.to(dtype), second.to(dtype))
        tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])

    return merged_weight_kernel


def launch(out: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor,
           absmax2: torch.Tensor, offset: torch.Tensor, blocksize: int, blocksize2: int, nested: bool,
           lora_b: torch.Tensor, lora_a: torch.Tensor, scale: float, tile: tuple[int, int, int] = TILE) -> None:
    """Run the kernel: out = dequantise(packed) + scale * lora_b @ lora_a, out [rows, cols] in the compute dtype.
    tile: rows, byte pairs (half the columns) and warps of a program (benchmarks/bench_nf4_merge.py --sweep)."""
    rows, pairs, warps = tile
    pairs = max(pairs, blocksize // 2)  # a program's columns are whole blocks
    n_rows, n_cols = out.shape
    rank = lora_a.shape[0]
    grid = (-(-n_rows // rows), -(-n_cols // (2 * pairs)))
    _kernel()[grid](out, packed, code, absmax, code2, absmax2, offset, lora_b, lora_a, scale, n_rows, n_cols,
                    BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=nested, RANK=rank,
                    RANK_PAD=max(16, 1 << (rank - 1).bit_length()), IEEE=out.dtype == torch.float32,
                    ROWS=rows, PAIRS=pairs, num_warps=warps, enable_fp_fusion=False)


@torch.library.custom_op("tunelab::write_merged_4bit_weight_", mutates_args=("out",))
def write_merged_4bit_weight_(out: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                              code2: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, blocksize: int,
                              blocksize2: int, nested: bool, lora_b: torch.Tensor, lora_a: torch.Tensor,
                              scale: float) -> None:
    """`launch` with the default tile, as an op that compile calls as is."""
    launch(out, packed, code, absmax, code2, absmax2, offset, blocksize, blocksize2, nested, lora_b, lora_a, scale)


@write_merged_4bit_weight_.register_fake
def _(out, packed, code, absmax, code2, absmax2, offset, blocksize, blocksize2, nested, lora_b, lora_a, scale):
    return None


def kernel_applies(packed: torch.Tensor, quant_state) -> bool:
    """Whether `merged_4bit_weight` can write this weight: Triton installed, the weight on a CUDA device, nf4 or fp4,
    of two dimensions whose rows are whole blocks (every linear layer of the supported families: widths are multiples
    of 64, bitsandbytes' 4-bit block) and int32 offsets."""
    if not (HAVE_TRITON and packed.is_cuda) or len(quant_state.shape) != 2:
        return False
    if quant_state.quant_type not in ("nf4", "fp4") or quant_state.code is None or quant_state.code.numel() != 16:
        return False
    blocksize = quant_state.blocksize
    if quant_state.shape[1] % blocksize or blocksize < 32 or blocksize & (blocksize - 1):  # a power of two
        return False
    if quant_state.nested and not (torch.is_tensor(quant_state.offset) and quant_state.offset.device == packed.device):
        return False  # the kernel reads the nested scales' offset from device memory
    return quant_state.shape[0] * quant_state.shape[1] < 2**31


def operands(packed: torch.Tensor, quant_state, lora_a: torch.Tensor, lora_b: torch.Tensor, dtype: torch.dtype) -> tuple:
    """The kernel's arguments after `out` and before `scale`, from a bitsandbytes weight and its adapter."""
    data = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    if quant_state.nested:
        state2 = quant_state.state2
        code2, absmax2, offset, blocksize2 = state2.code, state2.absmax, quant_state.offset, state2.blocksize
    else:  # unused by the kernel; any tensors will do
        code2 = absmax2 = offset = quant_state.absmax
        blocksize2 = 1
    return (data, quant_state.code, quant_state.absmax, code2, absmax2, offset, quant_state.blocksize, blocksize2,
            bool(quant_state.nested), lora_b.to(dtype).contiguous(), lora_a.to(dtype).contiguous())


def merged_4bit_weight(packed: torch.Tensor, quant_state, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_4bit(packed, quant_state).to(dtype) + scale * lora_b @ lora_a`, a new tensor of quant_state.shape
    in `dtype`, in one kernel (see the module's docstring). Only where `kernel_applies(packed, quant_state)`."""
    out = torch.empty(quant_state.shape, dtype=dtype, device=packed.device)
    write_merged_4bit_weight_(out, *operands(packed, quant_state, lora_a, lora_b, dtype), float(scale))
    return out
