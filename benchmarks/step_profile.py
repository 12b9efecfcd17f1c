"""Where one training step's GPU time goes: bench.py's `prof=1`.

One step runs under torch.profiler. Its Chrome trace (gzipped to $OUT) gives every kernel and copy with its stream, so
besides GPU time by kernel kind this reports the compute stream's idle time: the gaps between its kernels, split by
whether a copy was running on another stream meanwhile (the compute stream waiting for offloaded activations) or not
(the CPU not launching fast enough), and summed by the kernel that came before each gap, to say where to look.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections import defaultdict

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_kind(name: str) -> str:
    """A coarse class for a CUDA kernel's name, to see where a step's GPU time goes. "optimizer" also holds torch's
    foreach kernels (`multi_tensor_apply`): fused AdamW, but also the gradient norms `StepsInBackward` takes for the
    log (one launch a layer)."""
    low = name.lower()
    for kind, words in (("compiled (triton)", ("triton",)), ("attention", ("flash", "fmha", "cudnn", "attn")),
                        ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas")),
                        ("copy", ("memcpy", "memset", "copy")), ("optimizer", ("adam", "optimizer", "multi_tensor")),
                        ("loss", ("softmax", "nll", "cross_entropy")), ("nf4", ("dequant",))):
        if any(w in low for w in words):
            return kind
    return "other"


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _overlap(start: float, end: float, busy: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in busy)


def _to_ms(us: float) -> float:
    """The trace's microseconds as milliseconds, one decimal."""
    return round(us / 1e3, 1)


def stream_gaps(gpu_events: list[dict]) -> dict:
    """The compute stream (the one with the most kernel time) between its first and last kernel: busy time, and its
    gaps, by size and by what ran elsewhere meanwhile. Times in the trace are microseconds."""
    streams: dict[object, list[dict]] = defaultdict(list)
    for e in gpu_events:
        streams[e.get("args", {}).get("stream", e.get("tid"))].append(e)
    compute = max(streams, key=lambda s: sum(e["dur"] for e in streams[s] if e["cat"] == "kernel"))
    own = sorted(streams[compute], key=lambda e: e["ts"])
    others = _merged([(e["ts"], e["ts"] + e["dur"]) for s, es in streams.items() if s != compute for e in es])
    busy = _merged([(e["ts"], e["ts"] + e["dur"]) for e in own])
    span = busy[-1][1] - busy[0][0]
    by_size = {"under 10 us": 0.0, "10-100 us": 0.0, "over 100 us": 0.0}
    while_copying = 0.0
    after: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    largest = []
    end_of_last, last_name = own[0]["ts"], ""
    for e in own:
        gap = e["ts"] - end_of_last
        if gap > 0:
            by_size["under 10 us" if gap < 10 else "10-100 us" if gap < 100 else "over 100 us"] += gap
            while_copying += _overlap(end_of_last, e["ts"], others)
            after[last_name[:70]][0] += 1
            after[last_name[:70]][1] += gap
            largest.append((gap, end_of_last - own[0]["ts"], last_name[:50], e["name"][:50]))
        if e["ts"] + e["dur"] >= end_of_last:
            end_of_last, last_name = e["ts"] + e["dur"], e["name"]
    idle = span - sum(b - a for a, b in busy)
    return dict(stream=str(compute), span_ms=_to_ms(span), idle_ms=_to_ms(idle),
                idle_ms_by_gap_size={k: _to_ms(v) for k, v in by_size.items()},
                idle_ms_while_another_stream_copies=_to_ms(while_copying),
                idle_ms_after_kernel=[(name, n, _to_ms(us)) for name, (n, us) in
                                      sorted(after.items(), key=lambda kv: -kv[1][1])[:12]],
                largest_gaps=[(_to_ms(g), f"at {_to_ms(at)} ms", before, after_) for g, at, before, after_ in
                              sorted(largest, reverse=True)[:12]])


def matmul_mkn(op: str, input_shapes: list) -> tuple[int, int, int] | None:
    """(M, K, N) of one aten::mm ([M, K], [K, N]) or aten::addmm (the bias first) call; None for any other op."""
    shapes = input_shapes[1:3] if op == "aten::addmm" else input_shapes[:2]
    if op not in ("aten::mm", "aten::addmm") or len(shapes) < 2 or len(shapes[0]) != 2 or len(shapes[1]) != 2:
        return None
    (m, k), (_, n) = shapes
    return m, k, n


def matmuls_by_shape(averages, top: int = 12) -> list[dict]:
    """The matmuls that took the most GPU time, grouped by shape (from `key_averages(group_by_input_shape=True)`):
    M x K x N, calls, GPU ms and the TFLOP/s they reached, to tell the large products at the card's peak from the
    small ones below it. Empty under CUDA graphs, whose replays run no aten op the profiler could see (`cg=0`)."""
    rows = []
    for e in averages:
        mkn = matmul_mkn(e.key, e.input_shapes)
        if mkn and e.device_time_total > 0:
            m, k, n = mkn
            rows.append(dict(op=e.key.removeprefix("aten::"), mkn=f"{m}x{k}x{n}", calls=e.count,
                             gpu_ms=round(e.device_time_total / 1e3, 2),
                             tflops=round(2 * m * k * n * e.count / (e.device_time_total * 1e-6) / 1e12)))
    return sorted(rows, key=lambda r: -r["gpu_ms"])[:top]


def profile_step(step, label: str, step_s: float) -> dict:
    """Profile one call of `step()`: kernel count, GPU busy vs wall time, GPU time by kernel kind, the compute
    stream's gaps, top kernels and CPU ops, the matmuls by shape (full tables and the gzipped trace to $OUT, named
    by `label`)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    out = os.environ.get("OUT", ".")
    trace = os.path.join(out, f"trace_{label}.json.gz")
    prof.export_chrome_trace(trace)  # gzipped by torch, for the name
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    kinds: dict[str, float] = defaultdict(float)
    for e in gpu:
        kinds[kernel_kind(e["name"])] += e["dur"] / 1e3
    averages = prof.key_averages()
    with open(os.path.join(out, f"profile_{label}.txt"), "w") as f:
        f.write(averages.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90))
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90))
    top = sorted(averages, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    top_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return dict(kernels=sum(e["cat"] == "kernel" for e in gpu), step_ms_unprofiled=round(step_s * 1e3, 1),
                step_ms_profiled=round(wall * 1e3, 1), compute_stream=stream_gaps(gpu),
                gpu_ms_by_kind={k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                top_gpu=[(e.key[:60], e.count, round(e.self_device_time_total / 1e3, 1)) for e in top],
                top_cpu=[(e.key[:60], e.count, round(e.self_cpu_time_total / 1e3, 1)) for e in top_cpu],
                matmuls_by_shape=matmuls_by_shape(prof.key_averages(group_by_input_shape=True)))
