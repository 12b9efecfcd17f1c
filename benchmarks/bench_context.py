"""The longest sequence one training step fits in, under GPU memory caps that emulate smaller cards.

    python benchmarks/bench_context.py --baseline PATH/hf_peft_baseline.py \
        --case 'llama3_8b:qlora:0:32@drop=0,offload=1,opt8=1,mlp=8192' --caps 8:2972 12:21848 16:40724 24:78475

Each CAP_GB:TOKENS pair caps the process at CAP_GB x 1e9 bytes (`torch.cuda.set_per_process_memory_fraction`, so
the CUDA context is not counted, as on a real card it would be) and trains one step (forward, backward, optimizer
step) on one sequence of TOKENS tokens, every token trained. TOKENS is the figure to reach (the issue quotes
Unsloth's); on success the length grows by --grow (until a step takes longer than --max-step-s), on failure it shrinks
by 15% (at most --tries times). The model is loaded once (same loader, fast path and optimizer as `tunelab train`);
the optimizer states exist before the first cap, as they would in the middle of a run. Caps run in the order given:
give them ascending. Rows go to $OUT/context.json after every attempt, so a run cut short keeps what it measured.
The case syntax and options are bench.py's (the SEQ field is unused).

    python benchmarks/bench_context.py --peer unsloth --baseline PATH/hf_peft_baseline.py --case ... --caps ...

runs the same search with Unsloth instead (unsloth_baseline.py, next to --baseline, and its wheels on PYTHONPATH):
the same random-weight model, `FastLanguageModel` with its own gradient checkpointing ("unsloth": layer inputs in
CPU memory), the case's rank, alpha 16, dropout and optimizer (torch AdamW, or bitsandbytes' AdamW8bit with
opt8=1), one sequence a step trained on every token as its baseline loop does. Run it in a process of its own
(Unsloth patches transformers when imported); rows go to $OUT/context_unsloth.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402


@dataclasses.dataclass
class Stepper:
    """One side's training step on one sequence of a given length, and its optimizer (to drop a failed step's
    gradients)."""
    step: Callable[[int], None]
    optimizer: object
    label: str
    """What runs the step, for the log: tunelab's fast path, or the peer's name."""


def tunelab_side(case: dict, baseline_path: str) -> Stepper:
    """tunelab's model, fast path and optimizer, loaded as `tunelab train` loads them (bench.py's loader)."""
    run = bench._load(case, baseline_path)
    return Stepper(lambda tokens: bench._step(run, dict(case, seq=tokens, bs=1)), run.optimizer,
                   str(run.fast_path))


def unsloth_side(case: dict, baseline_path: str) -> Stepper:
    """Unsloth's model and optimizer as its baseline (unsloth_baseline.py) builds them, with the case's settings."""
    importlib.import_module("unsloth")  # before transformers and peft are used, so its patches apply
    import torch
    from unsloth import FastLanguageModel

    peer = bench.load_baseline(os.path.join(os.path.dirname(os.path.abspath(baseline_path)), "unsloth_baseline.py"))
    path = f"/tmp/m_{case['shape']}"
    peer.prepare(case["shape"], path)  # the HF baseline's model, built by its build() in a child process
    vocab = bench.load_baseline(baseline_path).SHAPES[case["shape"]]["vocab_size"]
    model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=case["seq"], dtype=torch.bfloat16,
                                                 load_in_4bit=case["method"] == "qlora")
    model = FastLanguageModel.get_peft_model(
        model, r=case["rank"], lora_alpha=16, lora_dropout=case["drop"] / 100, random_state=3407,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth")
    FastLanguageModel.for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if case["opt8"]:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=2e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=2e-4)

    def step(tokens: int):
        # Unsloth cuts inputs longer than max_seq_length and builds its RoPE table that long: set it to the length
        # tried, as a user training at that length would (the table only grows, by under 1 KiB a token).
        for module in model.modules():
            if hasattr(module, "max_seq_length"):
                module.max_seq_length = tokens
        x = torch.randint(0, vocab, (1, tokens), device="cuda")
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Stepper(step, optimizer, "unsloth")


def try_length(side: Stepper, tokens: int) -> dict:
    """One training step on `tokens` tokens: {ok, s, peak_alloc_gib} or {ok: False, error}."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    error = None
    start = time.perf_counter()
    try:
        side.step(tokens)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as exc:
        error = str(exc).split("\n")[0][:160]
    except RuntimeError as exc:  # a kernel refusing the length: record it, keep the other caps
        error = repr(exc)[:300]
    seconds = time.perf_counter() - start
    if error:  # drop the half-built graph and any gradients before the next try
        side.optimizer.zero_grad(set_to_none=True)
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
    parser.add_argument("--peer", choices=["unsloth"], help="run the search with this peer instead of tunelab")
    args = parser.parse_args(argv)
    bench.allocate_as_tunelab_train()
    caps = [(float(c), int(t)) for c, t in (item.split(":") for item in args.caps)]
    case = bench.parse_case(args.case)
    case["seq"] = max(t for _, t in caps)  # max_length: decides whether the MLP runs in slices
    side = unsloth_side(case, args.baseline) if args.peer == "unsloth" else tunelab_side(case, args.baseline)
    import torch

    print("side", side.label, flush=True)
    total = torch.cuda.get_device_properties(0).total_memory
    print("warm-up", try_length(side, 1024), flush=True)  # optimizer states exist now
    out_path = os.path.join(os.environ.get("OUT", "."), "context_unsloth.json" if args.peer else "context.json")
    rows = []
    for cap_gb, target in caps:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total))
        attempts, tokens = [], target
        for _ in range(args.tries + 8):
            result = try_length(side, tokens)
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
