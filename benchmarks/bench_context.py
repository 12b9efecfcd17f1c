"""The longest sequence one training step fits in, under GPU memory caps that emulate smaller cards.

    python benchmarks/bench_context.py --baseline PATH/hf_peft_baseline.py \
        --case 'llama3_8b:qlora:0:32@drop=0,offload=1,opt8=1' --caps 8:2972 12:21848 16:40724 24:78475

Each CAP_GB:TOKENS pair caps the process at CAP_GB x 1e9 bytes (`torch.cuda.set_per_process_memory_fraction`, so
the CUDA context is not counted, as on a real card it would be) and trains one step (forward, backward, optimizer
step) on one sequence of TOKENS tokens, every token trained. TOKENS is the figure to reach (the issue quotes
Unsloth's); on success the length grows by --grow (until a step takes longer than --max-step-s), on failure it shrinks
by 15% (at most --tries times). The model is loaded once (same loader, fast path and optimizer as `tunelab train`);
the optimizer states exist before the first cap, as they would in the middle of a run. Caps run in the order given:
give them ascending. Rows go to $OUT/context.json after every attempt, so a run cut short keeps what it measured.
The case syntax and options are bench.py's (the SEQ field is unused).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402


def try_length(run: bench.Run, case: dict, tokens: int) -> dict:
    """One training step on `tokens` tokens: {ok, s, peak_alloc_gib} or {ok: False, error}."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    error = None
    start = time.perf_counter()
    try:
        bench._step(run, dict(case, seq=tokens, bs=1))
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as exc:
        error = str(exc).split("\n")[0][:160]
    except RuntimeError as exc:  # a kernel refusing the length: record it, keep the other caps
        error = repr(exc)[:300]
    seconds = time.perf_counter() - start
    if error:  # drop the half-built graph and any gradients before the next try
        run.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return dict(tokens=tokens, ok=False, s=round(seconds, 1), error=error)
    return dict(tokens=tokens, ok=True, s=round(seconds, 1),
                peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", required=True)
    parser.add_argument("--caps", nargs="+", required=True, help="CAP_GB:TOKENS ...")
    parser.add_argument("--baseline", default=os.path.join(bench.REPO, "..", "shared", "baselines", "hf_peft_baseline.py"))
    parser.add_argument("--grow", type=float, default=1.25)
    parser.add_argument("--max-step-s", type=float, default=20.0, help="stop growing once a step takes longer")
    parser.add_argument("--tries", type=int, default=4)
    args = parser.parse_args(argv)
    import torch

    caps = [(float(c), int(t)) for c, t in (item.split(":") for item in args.caps)]
    case = bench.parse_case(args.case)
    case["seq"] = max(t for _, t in caps)  # max_length: decides whether the MLP runs in slices
    run = bench._load(case, args.baseline)
    print("fast path", run.model._tunelab_fast_path, flush=True)
    total = torch.cuda.get_device_properties(0).total_memory
    print("warm-up", try_length(run, case, 1024), flush=True)  # optimizer states exist now
    out_path = os.path.join(os.environ.get("OUT", "."), "context.json")
    rows = []
    for cap_gb, target in caps:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total))
        attempts, tokens = [], target
        for _ in range(args.tries + 8):
            result = try_length(run, case, tokens)
            attempts.append(result)
            print(cap_gb, json.dumps(result), flush=True)
            best = max((a["tokens"] for a in attempts if a["ok"]), default=0)
            failed = [a["tokens"] for a in attempts if not a["ok"]]
            if result["ok"] and not failed and result["s"] < args.max_step_s:
                tokens = int(tokens * args.grow)
            elif not result["ok"] and not best and len(failed) < args.tries:
                tokens = int(tokens * 0.85)
            else:
                break
            rows_now = rows + [dict(cap_gb=cap_gb, target=target, max_ok=best, attempts=attempts)]
            with open(out_path, "w") as f:
                json.dump(rows_now, f, indent=1)
        rows.append(dict(cap_gb=cap_gb, target=target, max_ok=best, attempts=attempts))
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| GPU memory cap | target tokens | longest step that fit | seconds a step | peak allocated GiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        ok = [a for a in row["attempts"] if a["ok"] and a["tokens"] == row["max_ok"]]
        s, peak = (ok[0]["s"], ok[0]["peak_alloc_gib"]) if ok else ("-", "-")
        print(f"| {row['cap_gb']:g} GB | {row['target']:,} | {row['max_ok']:,} | {s} | {peak} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
