"""tunelab's training step against the plain transformers + PEFT baseline, on the same GPU, same shapes, one call.

    python benchmarks/bench.py --baseline PATH/hf_peft_baseline.py llama7b:qlora:2048 internlm2_7b:qlora:8192 ...

A case is SHAPE:METHOD:SEQ[:RANK][@opt=value,...]; SHAPE is one of the baseline's random-initialised real shapes.
Options after '@' change our side only: ckpt=0/1 (gradient checkpointing), bs=N (rows per step), varlen=0/1,
chunked=0/1, compile=0/1, offload=0/1, dq=0/1 (QLoRA dequantise once a pass), amp=0/1 (bf16 autocast),
prof=1 (write the top CUDA kernels of one step to $OUT). Every run is its own subprocess, so peaks do not leak between cases.
The baseline runs once per SHAPE:METHOD:SEQ:RANK. Prints one table (tok/s, peak allocated and reserved, ratios,
MFU, the `tunelab plan` estimate against the measured peak) and writes the rows as JSON to --out.

MFU counts matmul FLOPs of the N non-embedding weights, attention left out: 6N per token for full fine-tuning,
4N for LoRA / QLoRA (forward + input gradients), plus 2N where gradient checkpointing recomputes the forward.
Peak: 989 TFLOP/s (H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time

PEAK_FLOPS = 989e12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_case(text: str) -> dict:
    head, _, opts = text.partition("@")
    shape, method, seq, *rank = head.split(":")
    case = dict(shape=shape, method=method, seq=int(seq), rank=int(rank[0]) if rank else 64,
                ckpt=None, bs=1, varlen=1, chunked=1, compile=0, offload=0, dq=1, amp=1, prof=0)
    for item in filter(None, opts.split(",")):
        key, value = item.split("=")
        case[key] = int(value)
    case["baseline_key"] = head if rank else f"{head}"
    return case


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("hf_peft_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_config(case: dict, path: str):
    from tunelab.config.schema import TrainConfig

    cfg = TrainConfig(
        pretrained_model_name_or_path=path, method=case["method"], dtype="bf16", max_length=case["seq"],
        batch_size=case["bs"], lora_r=case["rank"], lora_alpha=16, lora_dropout=0.1, lora_target_modules="all-linear",
        gradient_checkpointing=None if case["ckpt"] is None else bool(case["ckpt"]),
        use_varlen_attention=bool(case["varlen"]), use_chunked_loss=bool(case["chunked"]),
        use_compile=bool(case["compile"]), offload_activations=bool(case["offload"]),
    )
    cfg.qlora_dequant_once = bool(case["dq"])
    return cfg


def run_ours(case: dict, baseline_path: str, steps: int = 8, warm: int = 3) -> dict:
    """One case on our engine (in this process): the loader, the fast path, the loss, the optimiser of `tunelab train`."""
    import torch

    from tunelab.model.fast import apply_fast_path
    from tunelab.model.load import load_model_for_training
    from tunelab.model.loss import causal_lm_loss
    from tunelab.model.memory import estimate_memory, model_shape
    from tunelab.train.optim import build_optimizer

    baseline = load_baseline(baseline_path)
    path = f"/tmp/m_{case['shape']}"
    baseline.build(case["shape"], path)
    device = torch.device("cuda")
    if case.get("mem_gb"):
        torch.cuda.set_per_process_memory_fraction(case["mem_gb"] * 1e9 / torch.cuda.get_device_properties(0).total_memory)
    cfg = train_config(case, path)
    model = load_model_for_training(cfg, device)
    if not hasattr(model, "_tunelab_fast_path"):  # until the loader calls it itself
        model._tunelab_fast_path = apply_fast_path(model, cfg, device)
    model.train()
    optimizer = build_optimizer(model, cfg, device)
    vocab = baseline.SHAPES[case["shape"]]["vocab_size"]
    bs, seq = case["bs"], case["seq"]
    position_ids = torch.arange(seq, device=device).repeat(bs, 1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(warm + steps):
        x = torch.randint(0, vocab, (bs, seq), device=device)
        batch = {"input_ids": x, "labels": x, "position_ids": position_ids}
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(case["amp"])):
            loss_sum, n_tokens = causal_lm_loss(model, batch, chunk_size=cfg.loss_chunk_size,
                                                chunked=cfg.use_chunked_loss)
        (loss_sum / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if case["prof"]:
        profile_step(model, optimizer, batch, cfg, case)
    median = sorted(times[warm:])[len(times[warm:]) // 2]
    # Matmul weights (decoder linears + lm_head), counted from the shape: 4-bit weights are stored two to a byte.
    shape = model_shape(path)
    n_matmul = shape.num_hidden_layers * shape.layer_linear_params() + shape.vocab_size * shape.hidden_size
    ckpt = cfg.resolved_gradient_checkpointing()
    flops_per_token = (6 if cfg.method == "full" else 4) * n_matmul + (2 * n_matmul if ckpt else 0)
    tok_s = bs * seq / median
    estimate = estimate_memory(cfg)
    return dict(tok_s=round(tok_s, 1), s_per_step=round(median, 4),
                peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                mfu=round(tok_s * flops_per_token / PEAK_FLOPS, 4), ckpt=ckpt,
                plan_gib=round(estimate.total / 2**30, 2), loss=round(float(loss_sum / n_tokens), 3),
                fast_path=model._tunelab_fast_path)


def profile_step(model, optimizer, batch, cfg, case):
    """Write the top CUDA kernels of one more step to $OUT/profile_<shape>_<method>.txt."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tunelab.model.loss import causal_lm_loss

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(case["amp"])):
            loss_sum, n_tokens = causal_lm_loss(model, batch, chunk_size=cfg.loss_chunk_size,
                                                chunked=cfg.use_chunked_loss)
        (loss_sum / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    name = f"profile_{case['shape']}_{case['method']}.txt"
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        f.write(table)


def subprocess_json(argv: list[str], timeout: int) -> dict | None:
    """Run argv; the last line that parses as a JSON object is the result."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stdout + proc.stderr)[-1500:]
    print(tail, file=sys.stderr)
    return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {proc.returncode}"}


def fmt(row: dict) -> str:
    b, o = row.get("baseline") or {}, row["ours"]
    if "error" in o:
        return f"| {row['case']} | {b.get('tok_s', '-')} | error: {o['error'][:80]} |"
    ratio = o["tok_s"] / b["tok_s"] if b.get("tok_s") else float("nan")
    mem_ratio = o["peak_alloc_gib"] / b["peak_alloc_gib"] if b.get("peak_alloc_gib") else float("nan")
    plan_err = (o["plan_gib"] - o["peak_alloc_gib"]) / o["peak_alloc_gib"] * 100
    return (f"| {row['case']} | {b.get('tok_s', '-'):,} | {o['tok_s']:,} | **{ratio:.2f}x** | "
            f"{b.get('peak_alloc_gib', '-')} | {o['peak_alloc_gib']} / {o['peak_reserved_gib']} | {mem_ratio:.2f} | "
            f"{o['mfu'] * 100:.1f}% | {o['plan_gib']} ({plan_err:+.0f}%) | {'on' if o['ckpt'] else 'off'} |")


HEADER = ("| case | baseline tok/s | ours tok/s | speed-up | baseline peak GiB | ours peak alloc / reserved GiB | "
          "memory ratio | MFU | plan GiB (error) | ckpt |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--baseline", default=os.path.join(REPO, "..", "shared", "baselines", "hf_peft_baseline.py"))
    parser.add_argument("--no-baseline", action="store_true", help="only our side")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench.json"))
    parser.add_argument("--timeout", type=int, default=300, help="seconds per subprocess")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_ours(parse_case(args.cases[0]), args.baseline)), flush=True)
        return 0
    import torch
    import transformers
    import peft

    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, transformers {transformers.__version__},"
          f" peft {peft.__version__}", flush=True)
    baselines, rows = {}, []
    for text in args.cases:
        case = parse_case(text)
        key = case["baseline_key"]
        if not args.no_baseline and key not in baselines:
            baselines[key] = subprocess_json([sys.executable, args.baseline, key], args.timeout)
            print("baseline", key, baselines[key], flush=True)
        ours = subprocess_json([sys.executable, __file__, "--one", "--baseline", args.baseline, text], args.timeout)
        print("ours", text, ours, flush=True)
        rows.append(dict(case=text, baseline=baselines.get(key), ours=ours))
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        gc.collect()
    print("\n" + HEADER)
    for row in rows:
        print(fmt(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
