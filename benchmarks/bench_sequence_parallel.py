"""Sequence parallelism on one machine of several GPUs (issue #23): for each `sequence_parallel_size`, tokens/s per GPU
at given row lengths and the longest row a training step fits.

    python benchmarks/bench_sequence_parallel.py --gpus 8 --sizes 1 2 4 8 \
        --cases qlora:ddp full:zero3 full:fsdp --lengths 32768 131072

This script is a driver (one process, no GPU of its own): for every trial it launches
`torchrun --nproc-per-node GPUS` on itself (`--trial`). A trial loads a random-initialised model of the
Llama-3.1-8B shape (bf16 safetensors, written once into --root) the way `tunelab train` does: `choose_strategy`
(the engine, wrapped by sequence parallelism when SIZE > 1), the fast-path plan, `load_model_for_training`, the
optimiser, `strategy.setup`. The GPUS processes form GPUS / SIZE data-parallel groups of SIZE; each group trains one
row of LENGTH tokens a step, every token trained, as one whole sample (long context: cuDNN's attention kernel), through
the loop's calls (`strategy.forward_loss`, `backward` over the step's trained tokens, `step`). A step that runs out of
memory on any GPU ends the launch (torchrun stops the other ranks), so every length is a launch of its own.

For each CASE (METHOD:ENGINE; QLoRA r=32 runs under DDP or ZeRO-2, which can hold 4-bit weights; full fine-tuning
under ZeRO-3 or FSDP2) and SIZE:
* at each of --lengths: tokens/s per GPU (the tokens of all groups a step / the median step after --warmup / GPUS),
  the largest peak allocated memory over the ranks, the `tunelab plan` estimate for it, the loss;
* with --longest: the longest row that fits: from the longest length that ran, doubled until a step fails, then
  halved in between until the gap is below --precision (lengths are multiples of SIZE x 1024).
Rows go to $OUT/sequence_parallel.json after every trial, so a run cut short keeps what it measured. Gradient
checkpointing is on for every case (long rows need it) and compile too (`tunelab train`'s defaults for long
context); full fine-tuning keeps fp32 master weights.

On a machine without GPUs, `--shape tiny --gpus 2 --sizes 1 2 --lengths 256` runs the same trials over gloo, as a
check that the script works (tokens/s of a CPU mean nothing).

On one GPU (issue #22), `--overhead` measures what sequence parallelism's code costs where it splits nothing: each
case and length trains once through the plain path and once through the split path on a group of one process (the
shard, the exchange of heads between the compiled halves of each layer, the checkpoint around the layer); the
ratio of their tokens/s goes to the table and to $OUT/sequence_parallel_overhead.json:

    python benchmarks/bench_sequence_parallel.py --overhead --shape llama3_1b --cases qlora:ddp --lengths 16384 \
        --steps 8 --warmup 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAPES = {"llama3_8b": "meta-llama/Llama-3.1-8B-Instruct",
          # Llama-3.2-1B's published config.json: a short load, for the one-GPU --overhead check
          "llama3_1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
          "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2)}
MARK = "TRIAL "  # a trial's result line


def write_model(shape: str, out_dir: Path) -> None:
    """A random-initialised Llama of `shape` in bf16 (initialised on a GPU when there is one) and a tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.model.shapes import KNOWN_SHAPES
    from tunelab.model.tiny import make_tokenizer

    dims = SHAPES[shape]
    tokenizer = make_tokenizer(out_dir)
    config = AutoConfig.for_model("llama", **(dims if isinstance(dims, dict) else KNOWN_SHAPES[dims]),
                                  max_position_embeddings=1 << 21, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)


def train_config(model_dir: Path, method: str, engine: str, size: int, length: int):
    from tunelab.config.schema import TrainConfig

    return TrainConfig(pretrained_model_name_or_path=str(model_dir), method=method, lora_r=32, lora_alpha=16,
                       lora_dropout=0.0, max_length=length, batch_size=1, accumulative_counts=1,
                       gradient_checkpointing=True, optimizer="adamw", lr=1e-5, sequence_parallel_size=size,
                       deepspeed=engine if engine.startswith("zero") else None, fsdp=engine == "fsdp",
                       check_memory=False)


def trial(args) -> None:
    """One launch's work (every rank): load, then train `--steps` steps on rows of `--length` tokens."""
    import torch

    from tunelab.data.collate import collate
    from tunelab.model.load import load_model_for_training, resolve_dtype
    from tunelab.model.loss import causal_lm_objective
    from tunelab.model.memory import estimate_memory
    from tunelab.model.plan import plan_fast_path
    from tunelab.model.sequence_parallel import SequenceParallelObjective
    from tunelab.train.distributed import all_reduce_sum, cleanup, init_distributed
    from tunelab.train.optim import ScaledOptimizer, build_optimizer, choose_precision
    from tunelab.train.strategy import choose_strategy

    env = init_distributed("cpu" if args.shape == "tiny" else None, timeout_minutes=10)
    method, engine = args.case.split(":")
    cfg = train_config(Path(args.root) / f"model_{args.shape}", method, engine, args.size, args.length)
    strategy = choose_strategy(cfg, env)
    plan = memory_plan = plan_fast_path(cfg, env.device, env.world_size)
    group = None
    if args.path == "split":  # --overhead: sequence parallelism's code on a group of this one process
        group = one_rank_group(env.device)
        plan = dataclasses.replace(plan, sequence_parallel=2)  # the plan of a split row (checkpoint around the
        # layer, no CUDA graphs, varlen attention), everything else as the plain run's; the group has one rank
    model, _ = load_model_for_training(cfg, env.device, plan)
    precision = choose_precision(model, resolve_dtype(cfg.dtype, env.device), env.device,
                                 fp32_master_weights=cfg.fp32_master_weights)
    optimizer = build_optimizer(model, cfg, env.device)
    stepper = ScaledOptimizer(optimizer, precision.scaler) if precision.scaler else optimizer  # as the loop
    objective = causal_lm_objective(plan)
    if group is not None:
        objective = SequenceParallelObjective(objective, group)
    strategy.setup(model, stepper, objective, precision.autocast_dtype)
    strategy.train()
    groups = strategy.data_env.world_size  # each reads its own row
    generator = torch.Generator().manual_seed(strategy.data_env.rank)
    ids = torch.randint(10, model.config.vocab_size, (args.length,), generator=generator).tolist()
    row = {"input_ids": ids, "labels": [-100] + ids[1:], "position_ids": list(range(args.length))}
    batch = {k: v.to(env.device) for k, v in collate([row], 0).items()}
    trained = groups * batch["loss_index"].numel()
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        with strategy.accumulating(last=True):
            with precision.autocast(env.device):
                loss_sum, _ = strategy.forward_loss(batch)
            strategy.backward(precision.scale(loss_sum / trained))
        strategy.step(1.0)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(all_reduce_sum(loss_sum.detach().float(), env)) / trained)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, device=env.device)
    if env.distributed:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    if env.is_main:
        step_s = statistics.median(times[args.warmup:] or times[-1:])
        plan_gib = estimate_memory(cfg, plan=memory_plan, world_size=env.world_size).total / 2**30 if cuda else None
        print(MARK + json.dumps(dict(
            case=args.case, path=args.path, size=args.size, gpus=env.world_size, groups=groups, length=args.length,
            ok=True,
            step_s=round(step_s, 3), first_step_s=round(times[0], 1),
            tok_s_gpu=round(groups * args.length / step_s / env.world_size, 1), peak_gib=round(float(peak), 2),
            plan_gib=None if plan_gib is None else round(plan_gib, 2), loss=[round(x, 4) for x in losses],
            strategy=strategy.name)), flush=True)
    cleanup(env)
    if group is not None:
        torch.distributed.destroy_process_group()


def one_rank_group(device):
    """A process group of this one process (torchrun's MASTER_ADDR / MASTER_PORT): NCCL on a GPU, gloo on a CPU."""
    import torch

    cuda = device.type == "cuda"
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1,
                                         device_id=device if cuda else None)
    return torch.distributed.group.WORLD


def launch(args, case: str, size: int, length: int, steps: int, path: str = "plain") -> dict:
    """One trial in `--gpus` fresh processes; its result, or {ok: False, error} when it failed (out of memory).
    path "split": sequence parallelism's code on a one-process group (--overhead)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus), "--master-addr",
           "127.0.0.1", "--master-port", str(port), __file__, "--trial", "--case", case, "--size", str(size),
           "--length", str(length), "--steps", str(steps), "--path", path, "--warmup", str(args.warmup), "--shape",
           args.shape, "--root", args.root]
    from tunelab.cli.train_cmds import ALLOC_CONF

    env = {**os.environ, "PYTHONPATH": _pythonpath(), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault(*ALLOC_CONF)  # as `tunelab train` sets it; the user's own setting wins
    if args.shape == "tiny":
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = f"timeout after {args.timeout} s\n{exc.stderr}"
    wall = round(time.perf_counter() - start, 1)
    for line in out.splitlines():
        if line.startswith(MARK):
            return dict(json.loads(line[len(MARK):]), wall_s=wall)
    oom = "OutOfMemoryError" in out or "out of memory" in out
    return dict(case=case, path=path, size=size, gpus=args.gpus, length=length, ok=False, wall_s=wall,
                error="out of memory" if oom else _first_error(out))


def _pythonpath() -> str:
    """This checkout first, then what the caller had (wheels carried to the GPU machine stay importable)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def _first_error(out: str) -> str:
    """The worker's own exception line, not torchrun's summary that follows it."""
    lines = [line for line in out.splitlines() if "Error" in line and not line.startswith(("[", " "))]
    return (lines[0] + "\n" if lines else "") + out.strip()[-400:]


def longest(args, case: str, size: int, known: list[dict], record) -> dict:
    """The longest row that fits: double from the longest that ran until one fails, then bisect."""
    unit = size * 1024
    ok = max((r["length"] for r in known if r["ok"]), default=None)
    failed = min((r["length"] for r in known if not r["ok"]), default=None)
    if ok is None:  # nothing ran: start below the shortest
        ok, failed = 0, min(r["length"] for r in known)
    while failed is None and ok < args.max_length:
        length = min(ok * 2, args.max_length)
        result = record(launch(args, case, size, length, args.search_steps))
        ok, failed = (length, None) if result["ok"] else (ok, length)
    while failed is not None and failed - ok > max(unit, args.precision * failed):
        length = max(unit, (ok + failed) // 2 // unit * unit)
        if length in (ok, failed):
            break
        result = record(launch(args, case, size, length, args.search_steps))
        ok, failed = (length, failed) if result["ok"] else (ok, length)
    return dict(case=case, size=size, longest=ok, first_failed=failed)


def overhead(args) -> int:
    """Issue #22's one-GPU check: what sequence parallelism's code costs where it splits nothing. For each case and
    length, a trial through the plain path (`sequence_parallel_size = 1`, what one GPU runs) and one through the
    split path on a group of one process (the shard of each row, the exchange of heads as eager code between the
    compiled halves of each layer, the checkpoint around the layer, no CUDA graphs), same model, settings and rows."""
    args.gpus = 1
    out_path = Path(os.environ.get("OUT", ".")) / "sequence_parallel_overhead.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows, pairs = [], []
    for case in args.cases:
        for length in args.lengths:
            plain, split = (launch(args, case, 1, length, args.steps, path) for path in ("plain", "split"))
            rows += [plain, split]
            print(json.dumps(plain), json.dumps(split), sep="\n", flush=True)
            ratio = split["tok_s_gpu"] / plain["tok_s_gpu"] if plain["ok"] and split["ok"] else None
            pairs.append(dict(case=case, length=length, plain_tok_s=plain.get("tok_s_gpu"),
                              split_tok_s=split.get("tok_s_gpu"), ratio=None if ratio is None else round(ratio, 3),
                              plain_peak_gib=plain.get("peak_gib"), split_peak_gib=split.get("peak_gib"),
                              losses=[plain.get("loss"), split.get("loss")]))  # the same rows: equal to bf16 noise
            out_path.write_text(json.dumps({"shape": args.shape, "pairs": pairs, "trials": rows}, indent=1))
    print(f"\n{args.shape} on one GPU: tokens/s (median step after {args.warmup}) through the plain path and "
          "through sequence parallelism's code on a group of one process")
    print("| case | row tokens | plain tok/s | split path tok/s | ratio | plain peak GiB | split peak GiB |\n"
          "|---|---|---|---|---|---|---|")
    for p in pairs:
        print(f"| {p['case'].split(':')[0]} | {p['length']:,} | {p['plain_tok_s']} | {p['split_tok_s']} | "
              f"{p['ratio']} | {p['plain_peak_gib']} | {p['split_peak_gib']} |")
    for r in rows:
        if not r["ok"]:
            print(f"{r['case']} {r['path']} {r['length']}: {r['error']}")
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="sequence_parallel_size values")
    parser.add_argument("--cases", nargs="+", default=["qlora:ddp", "full:zero3", "full:fsdp"],
                        help="METHOD:ENGINE, ENGINE one of ddp, zero2, zero3, fsdp")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median (compilation)")
    parser.add_argument("--longest", action="store_true", help="also search the longest row that fits")
    parser.add_argument("--search-steps", type=int, default=2, help="steps a search trial trains (the second has "
                        "the optimizer states)")
    parser.add_argument("--max-length", type=int, default=1 << 21)
    parser.add_argument("--precision", type=float, default=0.05)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds a trial may take")
    parser.add_argument("--shape", default="llama3_8b", choices=sorted(SHAPES))
    parser.add_argument("--root", default="/tmp/tunelab_sp")
    parser.add_argument("--overhead", action="store_true", help="one GPU (issue #22): each case and length "
                        "trained through the plain path and through sequence parallelism's code on a group of one "
                        "process; tokens/s of both and their ratio")
    parser.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)  # a torchrun worker
    parser.add_argument("--path", default="plain", choices=["plain", "split"], help=argparse.SUPPRESS)
    parser.add_argument("--write-model", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trial:
        trial(args)
        return 0
    model_dir = Path(args.root) / f"model_{args.shape}"
    if args.write_model:
        write_model(args.shape, model_dir)
        return 0
    if not (model_dir / "config.json").is_file():  # in a process of its own: the driver keeps no GPU memory
        Path(args.root).mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--write-model", "--shape", args.shape, "--root", args.root],
                       check=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
    if args.overhead:
        return overhead(args)
    out_path = Path(os.environ.get("OUT", ".")) / "sequence_parallel.json"
    rows, longest_rows = [], []

    def record(row: dict) -> dict:
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_path.write_text(json.dumps({"trials": rows, "longest": longest_rows}, indent=1))
        return row

    for case in args.cases:
        for size in args.sizes:
            if args.gpus % size:
                print(f"skipping size {size}: it does not divide {args.gpus} GPUs", flush=True)
                continue
            measured = [record(launch(args, case, size, length, args.steps)) for length in args.lengths]
            if args.longest:
                longest_rows.append(longest(args, case, size, measured, record))
                record(dict(longest_rows[-1], ok=True, note="longest"))
    print(f"\n{args.shape} on {args.gpus} GPUs: tokens/s per GPU (median step after {args.warmup}), largest peak "
          "allocated over the ranks, and the `tunelab plan` estimate")
    print("| case | sequence_parallel_size | data-parallel groups | row tokens | tok/s per GPU | step s | peak GiB | "
          "plan GiB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "note" in r:
            continue
        if not r["ok"]:
            print(f"| {r['case']} | {r['size']} | | {r['length']:,} | {r['error'][:40]} | | | |")
            continue
        print(f"| {r['case']} | {r['size']} | {r['groups']} | {r['length']:,} | {r['tok_s_gpu']:,} | {r['step_s']} | "
              f"{r['peak_gib']} | {r['plan_gib']} |")
    if longest_rows:
        print("\n| case | sequence_parallel_size | longest row that fits | shortest that failed |\n|---|---|---|---|")
        for r in longest_rows:
            print(f"| {r['case']} | {r['size']} | {r['longest']:,} | {r['first_failed'] or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
