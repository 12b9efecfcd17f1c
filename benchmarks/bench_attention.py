"""Causal attention over one long sequence, forward + backward: the flash varlen kernel tunelab uses against
PyTorch's sdpa backends (flash, cuDNN), GQA as in Llama-3.1-8B (32 query heads, 8 key/value heads, head dim 128).

    python benchmarks/bench_attention.py 32768 131072

Prints milliseconds for forward + backward, TFLOP/s (causal: 2 * T^2 * heads * dim forward, 2.5x that backward)
and the relative L2 error of the output and of dq against an fp32 reference (T <= 65536, computed a block of queries at a time) or the varlen kernel.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from tunelab.model.attention import _varlen_flash  # noqa: E402

HQ, HKV, D = 32, 8, 128


def run_varlen(q, k, v):
    t = q.shape[2]
    cu = torch.tensor([0, t], dtype=torch.int32, device=q.device)
    out = _varlen_flash(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, t, D ** -0.5)
    return out.transpose(0, 1)[None]


def run_sdpa(backend):
    def fn(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return fn


def chunked_fp32_reference(q, k, v, block=1024):
    """Causal attention in fp32, one block of queries at a time (each checkpointed): exact enough to judge
    the bf16 kernels at lengths where the full score matrix would not fit."""
    from torch.utils.checkpoint import checkpoint

    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    t = q.shape[2]

    def one_block(qs, start):
        end = start + qs.shape[2]
        scores = qs @ k[:, :, :end].transpose(-1, -2) * D ** -0.5
        mask = torch.ones(qs.shape[2], end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, :, :end]

    return torch.cat([checkpoint(one_block, q[:, :, s:s + block], s, use_reentrant=False)
                      for s in range(0, t, block)], dim=2)


def timed(fn, q, k, v, grad, reps=3):
    q.grad = None  # else backward adds into the previous backend's gradient tensor, which may be the reference
    out = fn(q, k, v)
    out.backward(grad)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        q.grad = None
        out = fn(q, k, v)
        out.backward(grad)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / max(reps, 1), out.detach(), q.grad.detach()


def main():
    for t in [int(a) for a in sys.argv[1:]] or [32768]:
        torch.manual_seed(0)
        q = torch.randn(1, HQ, t, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, HKV, t, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, HKV, t, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(1, HQ, t, D, device="cuda", dtype=torch.bfloat16)
        flops = 2 * t * t * HQ * D * 3.5
        ref = None
        if t <= 65536:  # an fp32 reference is affordable: errors relative to it
            q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
            _, out32, dq32 = timed(chunked_fp32_reference, q32, k32, v32, grad.float(), reps=0)
            ref = (out32, dq32)
            del q32, k32, v32
        for name, fn in [("varlen flash (tunelab)", run_varlen), ("sdpa flash", run_sdpa(SDPBackend.FLASH_ATTENTION)),
                         ("sdpa cuDNN", run_sdpa(SDPBackend.CUDNN_ATTENTION))]:
            try:
                s, out, dq = timed(fn, q, k, v, grad)
            except Exception as error:
                print(f"T={t} {name}: error {repr(error)[:200]}", flush=True)
                continue
            ref = ref or (out, dq)
            rel_out = ((out.float() - ref[0]).norm() / ref[0].norm()).item()
            rel_dq = ((dq.float() - ref[1]).norm() / ref[1].norm()).item()
            print(f"T={t} {name}: {s * 1e3:.1f} ms fwd+bwd, {flops / s / 1e12:.0f} TFLOP/s, rel. L2 error vs "
                  f"{'fp32' if t <= 65536 else 'varlen flash'}: out {rel_out:.2e}, dq {rel_dq:.2e}", flush=True)


if __name__ == "__main__":
    main()
