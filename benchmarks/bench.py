"""tunelab's training step against the plain transformers + PEFT baseline, on the same GPU, same shapes, one call.

    python benchmarks/bench.py --baseline PATH/hf_peft_baseline.py llama7b:qlora:2048 internlm2_7b:qlora:8192 ...

A case is SHAPE:METHOD:SEQ[:RANK][@opt=value,...]; SHAPE is one of the baseline's random-initialised real shapes.
Options after '@' change our side only: ckpt=0/1 (gradient checkpointing), bs=N (rows per micro-batch), acc=N
(micro-batches per optimiser step; acc0=1: with CUDA graphs, one graph generation a step and gradients freed
after it, as before session 6, instead of a generation a micro-batch and gradient buffers kept), varlen=0/1, chunked=0/1, compile=0/1, offload=0/1, dq=0/1 (QLoRA dequantise
once a pass), amp=0/1 (bf16 autocast), lean=0/1 (the lean LoRA forward, else peft's), drop=N (LoRA dropout in
percent, 10 by default), opt8=1 (8-bit AdamW, ours: bitsandbytes' without its sync per parameter; opt8=2:
bitsandbytes' own class), emb=0 (the input embedding stays on the GPU, as before embeddings_on_cpu), mlp=N
(mlp_chunk_size, 0 = None), nf4=0/1 (QLoRA dequantisation fused by compile), cudnn=1 (cuDNN attention for rows of
one sample), master=0 (full fine-tuning in bf16 weights, as in rounds 1-2), cin=0 (checkpoint around the compiled
layer, as in round 3, instead of inside it), cg=1 (CUDA graphs), vary=1 (packed rows of 1-16 samples that change
from step to step, padded to seq), fce=0 (the loss of rounds 1-5: chunks checkpointed and recomputed in backward,
instead of gradients taken in forward), addmm=1 (compiled bf16 LoRA linears add their adapter with addmm, as in
rounds 2-5), tlog=N / flog=N (loss chunks of a trained / frozen lm_head hold 2^N logits), prof=1 (profile one more
step: kernel count, GPU busy vs wall time, GPU time by kernel kind, top kernels and CPU ops; tables to $OUT).
Every run is its own subprocess, so peaks do not leak between cases. `--sweep 'V1 V2 ...' CASE` loads CASE once
and times each variant (options as above, applied in order; compile=1 stays on once set), our side only, rows to
$OUT/sweep_CASE.json; with CUDA graphs only the first variant's peak counts the graphs' memory (later ones replay
graphs recorded before the peak was reset).
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
                ckpt=None, bs=1, varlen=1, chunked=1, compile=0, offload=0, dq=1, amp=1, prof=0, lean=1, drop=10,
                opt8=0, mlp=8192, nf4=1, cudnn=1, master=1, cin=1, cg=0, vary=0, emb=1, fce=1, addmm=0, tlog=0, flog=0, acc=1, acc0=0)
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
        batch_size=case["bs"], accumulative_counts=case["acc"], lora_r=case["rank"], lora_alpha=16, lora_dropout=case["drop"] / 100, lora_target_modules="all-linear",
        gradient_checkpointing=None if case["ckpt"] is None else bool(case["ckpt"]),
        use_varlen_attention=bool(case["varlen"]), use_chunked_loss=bool(case["chunked"]),
        use_compile=bool(case["compile"]), offload_activations=bool(case["offload"]),
        optimizer="adamw_8bit" if case["opt8"] else "adamw", mlp_chunk_size=case["mlp"] or None,
    )
    cfg.qlora_dequant_once = bool(case["dq"])
    cfg.lean_lora = bool(case["lean"])
    cfg.qlora_fused_dequant = bool(case["nf4"])
    cfg.cudnn_attention = bool(case["cudnn"])
    cfg.fp32_master_weights = bool(case["master"])
    cfg.cuda_graphs = bool(case["cg"])
    cfg.embeddings_on_cpu = bool(case["emb"])
    return cfg


def _load(case: dict, baseline_path: str):
    """(model, optimizer, cfg, vocab, path) for a case, loaded the way `tunelab train` loads it."""
    import torch

    from tunelab.model import fast, layers
    from tunelab.model.load import load_model_for_training
    from tunelab.train.optim import build_optimizer, choose_precision

    layers.CHECKPOINT_INSIDE_COMPILE = bool(case["cin"])
    fast.ADD_UNDER_COMPILE = not case["addmm"]
    baseline = load_baseline(baseline_path)
    path = f"/tmp/m_{case['shape']}"
    baseline.build(case["shape"], path)
    device = torch.device("cuda")
    if case.get("mem_gb"):
        torch.cuda.set_per_process_memory_fraction(case["mem_gb"] * 1e9 / torch.cuda.get_device_properties(0).total_memory)
    cfg = train_config(case, path)
    model = load_model_for_training(cfg, device)
    model.train()
    choose_precision(model, torch.bfloat16, device, fp32_master_weights=cfg.fp32_master_weights)  # as `tunelab train`
    optimizer = build_optimizer(model, cfg, device)
    if case["opt8"] == 2:  # bitsandbytes' own 8-bit AdamW, to compare
        import bitsandbytes as bnb

        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        optimizer = bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return model, optimizer, cfg, baseline.SHAPES[case["shape"]]["vocab_size"], path


def round5_chunked_loss(model, batch, *, chunk_size, chunked=True):
    """The loss of rounds 1-5 (fce=0), to compare with: each chunk checkpointed, its logits recomputed in backward,
    the trained positions found on the GPU."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from tunelab.model.loss import split_model

    def chunk_loss(h, t, weight):
        return F.cross_entropy(F.linear(h, weight).float(), t, reduction="sum")

    targets = torch.full_like(batch["labels"], -100)
    targets[:, :-1] = batch["labels"][:, 1:]
    keep = targets != -100
    decoder, lm_head, _ = split_model(model)
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    hidden, targets = hidden[keep], targets[keep]
    rows = max(1, min(chunk_size, 2**25 // lm_head.weight.shape[0]))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        total = total + checkpoint(chunk_loss, hidden[start:start + rows], targets[start:start + rows],
                                   lm_head.weight, use_reentrant=False)
    return total, int(keep.sum())


def _step(model, optimizer, cfg, case, vocab):
    import torch

    from tunelab.data.collate import loss_targets
    from tunelab.model import loss as loss_module
    from tunelab.model.loss import causal_lm_loss

    bs, seq = case["bs"], case["seq"]
    # As `tunelab train`: with CUDA graphs, each micro-batch starts a graph generation and accumulated gradients
    # keep buffers of their own (acc0=1: one generation a step and freed gradients, as before session 6)
    keep_grads = bool(cfg.cuda_graphs and case["acc"] > 1 and not case["acc0"])
    if keep_grads:
        from tunelab.train.loop import allocate_grad_buffers

        allocate_grad_buffers(model)
    if cfg.cuda_graphs and case["acc0"]:
        torch.compiler.cudagraph_mark_step_begin()
    x_cpu = torch.randint(0, vocab, (bs, seq))
    x = x_cpu.to("cuda")
    positions = torch.arange(seq, device="cuda").repeat(bs, 1)
    if case["vary"]:
        # Packed rows as `tunelab train` gives them: 1-16 samples a row, 0-127 tokens short of seq, padded to seq
        # (the padding its own segment). Rows of one batch share the cuts.
        import random

        used = seq - random.randrange(128)
        cuts = sorted(random.sample(range(1, used), random.randrange(16))) + [used]
        row = torch.cat([torch.arange(end - start) for start, end in zip([0] + cuts, cuts)] + [torch.arange(seq - used)])
        positions = row.to("cuda").repeat(bs, 1)
    # As `tunelab train`'s collate gives them: the trained positions listed on the CPU, so the loss never syncs.
    index, targets = loss_targets(x_cpu)
    batch = {"input_ids": x, "labels": x, "position_ids": positions,
             "loss_index": index.to("cuda", non_blocking=True), "loss_targets": targets.to("cuda", non_blocking=True)}
    if case["tlog"]:
        loss_module.MAX_CHUNK_LOGITS_TRAINED_HEAD = 2 ** case["tlog"]
    if case["flog"]:
        loss_module.MAX_CHUNK_LOGITS = 2 ** case["flog"]
    loss_fn = causal_lm_loss if case["fce"] else round5_chunked_loss
    for _ in range(case["acc"]):  # micro-batches of one optimiser step (the same rows: only the time matters)
        if cfg.cuda_graphs and not case["acc0"]:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(case["amp"])):
            loss_sum, n_tokens = loss_fn(model, batch, chunk_size=cfg.loss_chunk_size, chunked=cfg.use_chunked_loss)
        loss = loss_sum / n_tokens
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=not keep_grads)
    return loss


def time_steps(model, optimizer, cfg, case, vocab, steps=8, warm=3) -> dict:
    """Median seconds a step over `steps` after `warm` (the first step's time kept apart: it holds compilation)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(warm + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = _step(model, optimizer, cfg, case, vocab)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = sorted(times[warm:])[len(times[warm:]) // 2]
    return dict(median=median, mean_s=round(sum(times[warm:]) / steps, 4), first_s=round(times[0], 2), loss=round(float(loss), 3),
                peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                step_s=[round(t, 3) for t in times])  # every step, warm-up included: where a slow one falls


def matmul_params(shape) -> int:
    """N of the MFU: the weights of the decoder linears and lm_head of a `ModelShape` (attention left out)."""
    return shape.num_hidden_layers * shape.layer_linear_params() + shape.vocab_size * shape.hidden_size


def flops_per_token(cfg, path) -> float:
    """Matmul FLOPs a token: 6N full fine-tuning, 4N LoRA / QLoRA, +2N when checkpointing recomputes the forward."""
    from tunelab.model.memory import model_shape

    n_matmul = matmul_params(model_shape(path))
    ckpt = cfg.resolved_gradient_checkpointing()
    return (6 if cfg.method == "full" else 4) * n_matmul + (2 * n_matmul if ckpt else 0)


def run_ours(case: dict, baseline_path: str, steps: int = 8, warm: int = 3) -> dict:
    """One case on our engine (in this process): the loader, the fast path, the loss, the optimiser of `tunelab train`."""
    from tunelab.model.fast import use_lean_lora
    from tunelab.model.memory import estimate_memory

    model, optimizer, cfg, vocab, path = _load(case, baseline_path)
    if not case["lean"]:
        use_lean_lora(model, on=False)
    timed = time_steps(model, optimizer, cfg, case, vocab, 24 if case["vary"] else steps, warm)
    if case["prof"]:
        timed["profile"] = profile_step(model, optimizer, cfg, case, vocab, timed["median"])
    tok_s = case["bs"] * case["seq"] * case["acc"] / timed["median"]
    return dict(tok_s=round(tok_s, 1), s_per_step=round(timed["median"], 4), mean_s_per_step=timed["mean_s"],
                step_s=timed["step_s"],
                first_step_s=timed["first_s"],
                peak_alloc_gib=timed["peak_alloc_gib"], peak_reserved_gib=timed["peak_reserved_gib"],
                mfu=round(tok_s * flops_per_token(cfg, path) / PEAK_FLOPS, 4), ckpt=cfg.resolved_gradient_checkpointing(),
                plan_gib=round(estimate_memory(cfg).total / 2**30, 2), loss=timed["loss"],
                fast_path=model._tunelab_fast_path, profile=timed.get("profile"))


def set_lora_dropout(model, p: float) -> None:
    """Every LoRA dropout to `p` (0 means nn.Identity, as peft builds it, so no dropout kernel runs)."""
    import torch

    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name in list(dropouts.keys()):
                dropouts[name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()


def run_sweep(case: dict, variants: list[str], baseline_path: str) -> list[dict]:
    """Load the case once, then time each variant (options over the case's, applied in order; compile=1 sticks)."""
    from tunelab.model.fast import use_lean_lora

    model, optimizer, cfg, vocab, path = _load(case, baseline_path)
    # Loaded with compile=1, the fast path compiled the layers already (with CUDA graphs if cg=1): keep that.
    rows, compiled = [], bool(case["compile"])
    for text in variants:
        v = dict(case)
        for item in filter(None, text.split(",")):
            key, value = item.split("=")
            v[key] = int(value)
        use_lean_lora(model, on=bool(v["lean"]))
        if v["method"] == "qlora" and cfg.qlora_dequant_once:
            from tunelab.model.fast import dequantize_once_per_pass

            dequantize_once_per_pass(model, fused=bool(v["nf4"] and v["compile"]))
        set_lora_dropout(model, v["drop"] / 100)
        if v["compile"] and not compiled:
            from tunelab.model.layers import run_decoder_layers

            run_decoder_layers(model_layers(model), compile=True, offload=cfg.offload_activations)
            compiled = True
        try:
            timed = time_steps(model, optimizer, cfg, v, vocab, steps=5, warm=3 if v["compile"] else 2)
        except Exception as error:  # one variant failing (compile, memory) must not lose the others
            rows.append(dict(variant=text, error=repr(error)[:300]))
            print(json.dumps(rows[-1]), flush=True)
            continue
        if v["prof"]:
            timed["profile"] = profile_step(model, optimizer, cfg, v, vocab, timed["median"])
        tok_s = v["bs"] * v["seq"] * v["acc"] / timed.pop("median")
        rows.append(dict(variant=text, tok_s=round(tok_s), mfu=round(tok_s * flops_per_token(cfg, path) / PEAK_FLOPS, 3),
                         **timed))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def model_layers(model):
    from tunelab.model.loss import split_model

    return list(getattr(split_model(model)[0], "layers", []))


def kernel_kind(name: str) -> str:
    """A coarse class for a CUDA kernel's name, to see where a step's GPU time goes."""
    low = name.lower()
    for kind, words in (("compiled (triton)", ("triton",)), ("attention", ("flash", "fmha", "cudnn", "attn")),
                        ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas")),
                        ("copy", ("memcpy", "memset", "copy")), ("optimizer", ("adam", "optimizer", "multi_tensor")),
                        ("loss", ("softmax", "nll", "cross_entropy")), ("nf4", ("dequant",))):
        if any(w in low for w in words):
            return kind
    return "other"


def profile_step(model, optimizer, cfg, case, vocab, step_s: float) -> dict:
    """Profile one more step: kernel count, GPU busy vs wall time, top kernels and CPU ops (full tables to $OUT)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        _step(model, optimizer, cfg, case, vocab)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    # GPU-side copies of user annotations ("Optimizer.step#...") would count their kernels twice.
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and "#" not in e.name]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    averages = prof.key_averages()
    name = f"profile_{case['shape']}_{case['method']}_lean{case['lean']}_drop{case['drop']}_bs{case['bs']}.txt"
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        f.write(averages.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90))
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90))
    top = sorted(averages, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    kinds: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.name)
        kinds[kind] = kinds.get(kind, 0.0) + e.time_range.elapsed_us() / 1e3
    top_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return dict(kernels=len(kernels), gpu_busy_ms=round(busy_us / 1e3, 1), step_ms_unprofiled=round(step_s * 1e3, 1),
                step_ms_profiled=round(wall * 1e3, 1), idle_frac=round(1 - busy_us / 1e6 / step_s, 3),
                gpu_ms_by_kind={k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                top_gpu=[(e.key[:60], e.count, round(e.self_device_time_total / 1e3, 1)) for e in top],
                top_cpu=[(e.key[:60], e.count, round(e.self_cpu_time_total / 1e3, 1)) for e in top_cpu])


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
    return (f"| {row['case']} | {b.get('tok_s', 0):,} | {o['tok_s']:,} | **{ratio:.2f}x** | "
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
    parser.add_argument("--sweep", help="load the one CASE once and time these space-separated variants in order, "
                        "e.g. 'lean=0,prof=1 lean=1,prof=1 drop=0 bs=4 compile=1' (our side only)")
    args = parser.parse_args(argv)
    if args.sweep:
        rows = run_sweep(parse_case(args.cases[0]), args.sweep.split(), args.baseline)
        name = args.cases[0].replace(":", "_").replace("@", "_").replace(",", "_").replace("=", "")
        with open(os.path.join(os.environ.get("OUT", "."), f"sweep_{name}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return 0
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
