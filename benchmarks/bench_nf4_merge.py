"""Time the merged 4-bit weight (`dequantise(W) + scale * B @ A`) three ways, per weight shape, on a GPU.

  kernel    tunelab.model.nf4_merge: one Triton kernel (what the QLoRA fast path runs on a GPU)
  compiled  the plain ops under torch.compile: cuBLAS's B @ A, then inductor's dequantisation + add
  backward  bitsandbytes' dequantize_4bit, then the product added in place by cuBLAS (add_scaled_product_)

Prints GPU microseconds a weight (calls replayed from a CUDA graph, as training runs them) and the kernel's effective
bandwidth (4-bit bytes and scales read, 16-bit weight written). `--sweep` also times other tile shapes of the kernel
(rows x byte pairs x warps).

    python3 benchmarks/bench_nf4_merge.py [--rank 64] [--sweep] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunelab.model import nf4_merge  # noqa: E402
from tunelab.model.nf4 import add_scaled_product_, dequantize_nf4  # noqa: E402

SHAPES = {  # (out, in): Llama-2-7B's attention and MLP weights, Llama-3.1-8B's k/v and MLP weights
    "7b attn 4096x4096": (4096, 4096),
    "7b up/gate 11008x4096": (11008, 4096),
    "7b down 4096x11008": (4096, 11008),
    "8b k/v 1024x4096": (1024, 4096),
    "8b up/gate 14336x4096": (14336, 4096),
    "8b down 4096x14336": (4096, 14336),
}


def time_us(fn, calls: int = 20, replays: int = 10) -> float:
    """GPU microseconds a call: `calls` calls captured in one CUDA graph, replayed `replays` times. Timing each call
    from Python would time its launch (a Triton launch alone takes longer than these kernels run)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (calls * replays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--sweep", action="store_true", help="also time other tile shapes of the kernel")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import bitsandbytes.functional as bnbf

    dtype, scale, results = torch.bfloat16, 0.25, []
    for name, shape in SHAPES.items():
        weight = torch.randn(shape, device="cuda", dtype=dtype) * 0.02
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        lora_a = torch.randn(args.rank, shape[1], device="cuda", dtype=dtype) * 0.01
        lora_b = torch.randn(shape[0], args.rank, device="cuda", dtype=dtype) * 0.01
        torch._dynamo.reset()  # a fresh compile per shape (no recompile limit)
        compiled = torch.compile(lambda p, a, b: dequantize_nf4(p, state).to(dtype) + scale * (b @ a))

        def backward_way():
            merged = bnbf.dequantize_4bit(packed, state).to(dtype)
            add_scaled_product_(merged, lora_b, lora_a, scale)

        row = {"shape": name, "rank": args.rank,
               "kernel_us": time_us(lambda: nf4_merge.merged_4bit_weight(packed, state, lora_a, lora_b, scale, dtype)),
               "compiled_us": time_us(lambda: compiled(packed, lora_a, lora_b)),
               "backward_us": time_us(backward_way)}
        moved = packed.numel() + state.absmax.numel() + weight.numel() * weight.element_size()
        row["kernel_tb_s"] = moved / row["kernel_us"] / 1e6
        expected = compiled(packed, lora_a, lora_b).float()
        got = nf4_merge.merged_4bit_weight(packed, state, lora_a, lora_b, scale, dtype).float()
        row["max_diff_vs_compiled"] = (got - expected).abs().max().item()
        if args.sweep:
            out = torch.empty(shape, device="cuda", dtype=dtype)
            kernel_args = nf4_merge.operands(packed, state, lora_a, lora_b, dtype)
            row["sweep"] = {}
            for tile in [(64, 64, 8), (64, 64, 4), (128, 64, 8), (32, 64, 4), (64, 32, 4), (128, 32, 8),
                         (64, 128, 8), (32, 128, 8)]:
                row["sweep"]["x".join(map(str, tile))] = time_us(
                    lambda: nf4_merge.launch(out, *kernel_args, scale, tile=tile))
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
