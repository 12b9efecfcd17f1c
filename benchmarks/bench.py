"""tunelab's training step against the plain transformers + PEFT baseline, on the same GPU, same shapes, one call.

    python benchmarks/bench.py --baseline PATH/hf_peft_baseline.py llama7b:qlora:2048 internlm2_7b:qlora:8192 ...

A case is SHAPE:METHOD:SEQ[:RANK][@opt=value,...]; SHAPE is one of the baseline's random-initialised real shapes.
Options after '@' change our side only, and each is a setting a user chooses (docs/SPEED.md):
  compile=0/1   use_compile (0 by default here; `tunelab train` compiles by default)
  cg=0/1        cuda_graphs (with compile=1)
  fast=0        fast_path = False: transformers + peft as they come, the plain reference of our own code
  ckpt=0/1      gradient_checkpointing (default: the method's)
  bs=N          rows per micro-batch;  acc=N  micro-batches per optimiser step
  drop=N        LoRA dropout in percent (10, as the baseline)
  opt8=1        optimizer = 'adamw_8bit' (tunelab's: bitsandbytes' without its sync per parameter)
  offload=0/1   offload_activations;  mlp=N  mlp_chunk_size (0 = None);  both: the config's default if not given
  emb=0         embeddings_on_cpu = False
  dq=1          qlora_dequant_once (the 16-bit weight kept for backward instead of dequantised again)
  ibw=0/1       optimizer_in_backward (default: the plan's, on with acc=1: this loop, like the peers' loops,
                does not clip, so the cases set max_norm = 0)
  around=0/1    not a setting: overrides the plan's checkpoint_around, to measure both arrangements of offloaded rows
  hash=0/1      not a setting: overrides the plan's hashed_dropout (0: torch's dropout in the lean LoRA forward)
  sattn=0/1     not a setting: overrides the plan's save_attention (0: the checkpoint recomputes attention too)
  sproj=0/1     not a setting: overrides the plan's save_projections (0: the q, k, v, o projections recomputed)
and two that say what to measure: vary=1 (packed rows of 1-16 samples that change from step to step, padded to
seq), prof=1 (profile one more step: GPU time by kernel kind, the compute stream's idle gaps, top kernels and CPU
ops; benchmarks/step_profile.py, tables and the trace to $OUT).
Every run is its own subprocess, so peaks do not leak between cases, and every process (the baseline's too) runs with
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`, as `tunelab train` sets it. `--sweep 'V1 V2 ...' CASE` loads CASE once
and times each variant (drop, bs, acc, vary, prof, and compile=1, which stays on once set), our side only, rows to
$OUT/sweep_CASE.json; with CUDA graphs only the first variant's peak counts the graphs' memory (later ones replay
graphs recorded before the peak was reset).
The baseline runs once per SHAPE:METHOD:SEQ:RANK. Prints one table (tok/s, peak allocated and reserved while
training, peak reserved while loading (a card must hold it too), ratios, MFU, the `tunelab plan` estimate against
the measured peak) and writes the rows as JSON to --out.

MFU counts matmul FLOPs of the N non-embedding weights, attention left out: 6N per token for full fine-tuning,
4N for LoRA / QLoRA (forward + input gradients), plus 2N where gradient checkpointing recomputes the forward (also
where our checkpoint keeps the q, k, v and o projections and recomputes less: every row is counted alike, so those
rows read a few points high).
"+attn" adds attention's matmuls (QK^T and PV over the causal half of each row, forward, twice that backward, once
more recomputed unless our checkpoint keeps attention's output): at long context they are as much work as the
weights' (32k on an 8B shape), so only this figure says how close a step is to the chip's limit. Peak: 989 TFLOP/s
(H100 / H200 dense bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

from step_profile import profile_step

PEAK_FLOPS = 989e12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = dict(ckpt=None, bs=1, acc=1, compile=0, cg=0, fast=1, drop=10, opt8=0, offload=None, mlp=None, emb=1, dq=0,
               ibw=None, around=None, hash=None, sattn=None, sproj=None, vary=0, prof=0)


def parse_case(text: str) -> dict:
    head, _, opts = text.partition("@")
    shape, method, seq, *rank = head.split(":")
    case = dict(shape=shape, method=method, seq=int(seq), rank=int(rank[0]) if rank else 64, **OPTIONS)
    for item in filter(None, opts.split(",")):
        key, value = item.split("=")
        if key not in OPTIONS:
            raise SystemExit(f"{text}: unknown option {key!r}; options are {', '.join(OPTIONS)}")
        case[key] = int(value)
    case["baseline_key"] = head
    return case


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("hf_peft_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_config(case: dict, path: str):
    from tunelab.config.schema import TrainConfig

    return TrainConfig(
        pretrained_model_name_or_path=path, method=case["method"], dtype="bf16", max_length=case["seq"],
        batch_size=case["bs"], accumulative_counts=case["acc"], lora_r=case["rank"], lora_alpha=16,
        lora_dropout=case["drop"] / 100, lora_target_modules="all-linear",
        gradient_checkpointing=None if case["ckpt"] is None else bool(case["ckpt"]),
        fast_path=bool(case["fast"]), use_compile=bool(case["compile"]), cuda_graphs=bool(case["cg"]),
        embeddings_on_cpu=bool(case["emb"]), optimizer="adamw_8bit" if case["opt8"] else "adamw",
        qlora_dequant_once=bool(case["dq"]), max_norm=0.0,  # no clipping: the step below (and the peers') has none
        **({} if case["ibw"] is None else dict(optimizer_in_backward=bool(case["ibw"]))),
        # not given: the config's defaults (None and 'auto': the plan decides by the row's length)
        **({} if case["offload"] is None else dict(offload_activations=bool(case["offload"]))),
        **({} if case["mlp"] is None else dict(mlp_chunk_size=case["mlp"] or None)),
    )


@dataclasses.dataclass
class Run:
    """A case loaded the way `tunelab train` loads it: the model with its fast path, the optimiser, the loss."""
    model: object
    optimizer: object
    cfg: object
    plan: object
    fast_path: dict
    """What the fast path switched on ({lever: what it did}), for the results."""
    objective: object
    vocab: int
    path: str


def _load(case: dict, baseline_path: str) -> Run:
    import torch

    from tunelab.model.load import load_model_for_training
    from tunelab.model.loss import causal_lm_objective
    from tunelab.model.plan import plan_fast_path
    from tunelab.train.optim import StepsInBackward, build_optimizer, choose_precision

    baseline = load_baseline(baseline_path)
    path = f"/tmp/m_{case['shape']}"
    baseline.build(case["shape"], path)
    torch.cuda.empty_cache()  # building the random weights is not loading them: its peak is not counted
    torch.cuda.reset_peak_memory_stats()
    device = torch.device("cuda")
    if case.get("mem_gb"):
        torch.cuda.set_per_process_memory_fraction(case["mem_gb"] * 1e9 / torch.cuda.get_device_properties(0).total_memory)
    cfg = train_config(case, path)
    plan = plan_fast_path(cfg, device)
    if case["around"] is not None:
        plan = dataclasses.replace(plan, checkpoint_around=bool(case["around"]))
    if case["hash"] is not None:
        plan = dataclasses.replace(plan, hashed_dropout=bool(case["hash"]))
    if case["sattn"] is not None:
        plan = dataclasses.replace(plan, save_attention=bool(case["sattn"]))
    if case["sproj"] is not None:
        plan = dataclasses.replace(plan, save_projections=bool(case["sproj"]))
    model, fast_path = load_model_for_training(cfg, device, plan)
    model.train()
    choose_precision(model, torch.bfloat16, device, fp32_master_weights=cfg.fp32_master_weights)  # as `tunelab train`
    optimizer = build_optimizer(model, cfg, device)
    if plan.optimizer_in_backward:  # as `tunelab train`: each layer updated in backward
        optimizer = StepsInBackward(optimizer, model)
    return Run(model, optimizer, cfg, plan, fast_path, causal_lm_objective(plan),
               baseline.SHAPES[case["shape"]]["vocab_size"], path)


def _batch(run: Run, case: dict) -> dict:
    """A batch of random tokens on the CPU, as `tunelab train`'s collate gives it: the trained positions listed on
    the CPU, so the loss never syncs."""
    import torch

    from tunelab.data.collate import loss_targets

    bs, seq = case["bs"], case["seq"]
    x = torch.randint(0, run.vocab, (bs, seq))
    positions = torch.arange(seq).repeat(bs, 1)
    if case["vary"]:
        # Packed rows as `tunelab train` gives them: 1-16 samples a row, 0-127 tokens short of seq, padded to seq
        # (the padding its own segment). Rows of one batch share the cuts.
        import random

        used = seq - random.randrange(128)
        cuts = sorted(random.sample(range(1, used), random.randrange(16))) + [used]
        row = torch.cat([torch.arange(end - start) for start, end in zip([0] + cuts, cuts)] + [torch.arange(seq - used)])
        positions = row.repeat(bs, 1)
    index, targets = loss_targets(x)
    return {"input_ids": x, "labels": x, "position_ids": positions, "loss_index": index, "loss_targets": targets}


class Steps:
    """Optimiser steps of `case` as `tunelab train` runs them (`tunelab.train.loop`): each step's first batch is
    made and sent to the GPU, its embedding rows gathered from the CPU ids, during the step before, after its last
    backward and before the update; `ahead=False` makes each step's batch at its start (a new length each step)."""

    def __init__(self, run: Run, case: dict, ahead: bool = True):
        self.run, self.case, self.ahead = run, case, ahead
        self.embedding = run.model.get_input_embeddings() if run.plan.embedding_rows_ahead else None
        # As `tunelab train`: with CUDA graphs, each micro-batch starts a graph generation and accumulated gradients
        # keep buffers of their own, allocated once
        self.keep_grads = run.plan.cuda_graphs and case["acc"] > 1
        if self.keep_grads:
            from tunelab.train.loop import allocate_grad_buffers

            allocate_grad_buffers(run.model)
        self.upcoming = self._make() if ahead else None

    def _make(self) -> tuple[dict, dict]:
        from tunelab.model.fast import batch_to_device

        batch = _batch(self.run, self.case)
        return batch, batch_to_device(batch, "cuda", self.embedding)

    def __call__(self):
        import torch

        from tunelab.model.fast import batch_to_device

        run, case = self.run, self.case
        cpu_batch, batch = self.upcoming or self._make()
        for i in range(case["acc"]):  # micro-batches of one optimiser step (the same rows: only the time matters)
            if run.plan.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            if i > 0:
                batch = batch_to_device(cpu_batch, "cuda", self.embedding)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss_sum, n_tokens = run.objective(run.model, batch)
            loss = loss_sum / n_tokens
            loss.backward()
        self.upcoming = self._make() if self.ahead else None
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=not self.keep_grads)
        return loss


def _step(run: Run, case: dict):
    """One optimiser step of `case` on a batch made now (bench_context.py: each step a new length)."""
    return Steps(run, case, ahead=False)()


def time_steps(run: Run, case: dict, steps=8, warm=3) -> dict:
    """Median seconds a step over `steps` after `warm` (the first step's time kept apart: it holds compilation)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    step = Steps(run, case)
    for _ in range(warm + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
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


def flops_per_token(cfg, shape) -> float:
    """Matmul FLOPs a token: 6N full fine-tuning, 4N LoRA / QLoRA, +2N when checkpointing recomputes the forward."""
    n_matmul = matmul_params(shape)
    ckpt = cfg.resolved_gradient_checkpointing()
    return (6 if cfg.method == "full" else 4) * n_matmul + (2 * n_matmul if ckpt else 0)


def attention_flops_per_token(cfg, shape, kept: bool = False) -> float:
    """FLOPs a token of attention's two matmuls for rows of one `cfg.max_length` sample: QK^T and PV take s x
    heads x head_dim multiply-adds each per token and layer, averaged over the causal half; backward twice the
    forward (input gradients: attention has no weights), and once more where checkpointing recomputes it (not where
    the checkpoint keeps attention's output: `kept`). Flash's backward also recomputes the scores; that is not
    counted, as MFU counts the work the model needs."""
    forward = 2 * 2 * (cfg.max_length / 2) * shape.num_attention_heads * shape.head_dim * shape.num_hidden_layers
    return forward * (3 + (1 if cfg.resolved_gradient_checkpointing() and not kept else 0))


def mfu(tok_s: float, cfg, path, with_attention: bool = True, plan=None) -> dict:
    """{mfu, mfu_attn} at `tok_s` (mfu_attn None when rows are not one sample each: `with_attention` False); `plan`:
    ours, whose checkpoint may keep attention's output (a peer's recomputes it)."""
    from tunelab.model.shapes import model_shape

    shape = model_shape(path)
    weights = flops_per_token(cfg, shape)
    kept = plan is not None and plan.keeps_attention
    attention = attention_flops_per_token(cfg, shape, kept) if with_attention else None
    return dict(mfu=round(tok_s * weights / PEAK_FLOPS, 4),
                mfu_attn=None if attention is None else round(tok_s * (weights + attention) / PEAK_FLOPS, 4))


def mfu_at(case: dict, tok_s: float, baseline_path: str) -> dict:
    """Both MFU figures of `case` at `tok_s` (no GPU, no weights: the shape's config.json alone), so a peer's
    tokens/s is counted by the same formula as ours."""
    import tempfile

    path = tempfile.mkdtemp(prefix="tunelab_mfu_")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(load_baseline(baseline_path).SHAPES[case["shape"]], f)
    cfg = train_config(case, path)
    return dict(case=case["baseline_key"], tok_s=tok_s, **mfu(tok_s, cfg, path))


def run_ours(case: dict, baseline_path: str, steps: int = 8, warm: int = 3) -> dict:
    """One case on our engine (in this process): the loader, the fast path, the loss, the optimiser of `tunelab train`."""
    import torch

    from tunelab.model.memory import estimate_memory

    run = _load(case, baseline_path)
    load_peak_reserved = torch.cuda.max_memory_reserved()  # loading quantises from 16-bit copies: a peak of its own
    timed = time_steps(run, case, 24 if case["vary"] else steps, warm)
    if case["prof"]:
        timed["profile"] = profile_step(Steps(run, case), profile_label(case), timed["median"])
    tok_s = case["bs"] * case["seq"] * case["acc"] / timed["median"]
    return dict(tok_s=round(tok_s, 1), s_per_step=round(timed["median"], 4), mean_s_per_step=timed["mean_s"],
                step_s=timed["step_s"], first_step_s=timed["first_s"],
                peak_alloc_gib=timed["peak_alloc_gib"], peak_reserved_gib=timed["peak_reserved_gib"],
                load_peak_reserved_gib=round(load_peak_reserved / 2**30, 2),
                **mfu(tok_s, run.cfg, run.path, with_attention=not case["vary"], plan=run.plan), ckpt=run.plan.checkpointing,
                in_backward=run.plan.optimizer_in_backward,
                plan_gib=round(estimate_memory(run.cfg, plan=run.plan).total / 2**30, 2), loss=timed["loss"],
                fast_path=run.fast_path, profile=timed.get("profile"))


def set_lora_dropout(model, p: float, hashed: bool) -> None:
    """Every LoRA dropout to `p` (0 means nn.Identity, as peft builds it, so no dropout kernel runs), its masks
    hashed or torch's as the plan says."""
    import torch

    from tunelab.model.dropout import use_hashed_dropout

    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name in list(dropouts.keys()):
                dropouts[name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()
            use_hashed_dropout(dropouts, hashed)


SWEEP_OPTIONS = ("drop", "bs", "acc", "vary", "prof", "compile")


def run_sweep(case: dict, variants: list[str], baseline_path: str) -> list[dict]:
    """Load the case once, then time each variant (options over the case's, applied in order; compile=1 sticks)."""
    from tunelab.model.layers import run_decoder_layers
    from tunelab.model.parts import decoder_layers

    run = _load(case, baseline_path)
    # Loaded with compile=1, the fast path compiled the layers already (with CUDA graphs if cg=1): keep that.
    rows, compiled = [], bool(case["compile"])
    for text in variants:
        v = dict(case)
        for item in filter(None, text.split(",")):
            key, value = item.split("=")
            if key not in SWEEP_OPTIONS:
                raise SystemExit(f"--sweep {text}: {key!r} is set when the model loads; sweep only {SWEEP_OPTIONS}")
            v[key] = int(value)
        if v["acc"] > 1 and run.plan.optimizer_in_backward:
            raise SystemExit(f"--sweep {text}: acc > 1 needs the case loaded with ibw=0 (its updates wait for every "
                             f"micro-batch)")
        set_lora_dropout(run.model, v["drop"] / 100, run.plan.hashed_dropout)
        if v["compile"] and not compiled:
            run.plan = dataclasses.replace(run.plan, compile=True)
            run_decoder_layers(decoder_layers(run.model), run.plan)
            compiled = True
        try:
            timed = time_steps(run, v, steps=5, warm=3 if v["compile"] else 2)
        except Exception as error:  # one variant failing (compile, memory) must not lose the others
            rows.append(dict(variant=text, error=repr(error)[:300]))
            print(json.dumps(rows[-1]), flush=True)
            continue
        if v["prof"]:
            timed["profile"] = profile_step(Steps(run, v), profile_label(v), timed["median"])
        tok_s = v["bs"] * v["seq"] * v["acc"] / timed.pop("median")
        rows.append(dict(variant=text, tok_s=round(tok_s),
                         **mfu(tok_s, run.cfg, run.path, with_attention=not v["vary"], plan=run.plan),
                         **timed))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def profile_label(case: dict) -> str:
    return f"{case['shape']}_{case['method']}_{case['seq']}_fast{case['fast']}_cg{case['cg']}_drop{case['drop']}_bs{case['bs']}"


def allocate_as_tunelab_train() -> None:
    """Expandable segments for this process and every one it starts, ours and the peers', as `tunelab train` sets them
    (a PYTORCH_CUDA_ALLOC_CONF already set wins): reserved memory, what a card must hold, is then what a user of
    either side gets, under one allocator setting. Call it before CUDA allocates; export it for a peer's own script."""
    from tunelab.cli.train_cmds import ALLOC_CONF

    os.environ.setdefault(*ALLOC_CONF)


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
    # reserved: what a card must hold (under CUDA graphs allocated reads low)
    mem_ratio = o["peak_reserved_gib"] / b["peak_reserved_gib"] if b.get("peak_reserved_gib") else float("nan")
    plan_err = (o["plan_gib"] - o["peak_alloc_gib"]) / o["peak_alloc_gib"] * 100
    attn = f" ({o['mfu_attn'] * 100:.1f}% +attn)" if o.get("mfu_attn") else ""
    return (f"| {row['case']} | {b.get('tok_s', 0):,} | {o['tok_s']:,} | **{ratio:.2f}x** | "
            f"{b.get('peak_alloc_gib', '-')} / {b.get('peak_reserved_gib', '-')} | "
            f"{o['peak_alloc_gib']} / {o['peak_reserved_gib']} ({o['load_peak_reserved_gib']}) | {mem_ratio:.2f} | "
            f"{o['mfu'] * 100:.1f}%{attn} | {o['plan_gib']} ({plan_err:+.0f}%) | {'on' if o['ckpt'] else 'off'} |")


HEADER = ("| case | baseline tok/s | ours tok/s | speed-up | baseline peak alloc / reserved GiB | "
          "ours peak alloc / reserved (loading: reserved) GiB | reserved ratio | MFU | plan GiB (error) | ckpt |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def host_cpu() -> str:
    """The host's CPU model and core count: eager peers (HF's loop) wait on the CPU, so their speed, and every ratio
    against them, moves with the lent machine's host (BENCHMARKS.md, "HF amp on LoRA bf16 again")."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--baseline", default=os.path.join(REPO, "..", "shared", "baselines", "hf_peft_baseline.py"))
    parser.add_argument("--no-baseline", action="store_true", help="only our side")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench.json"))
    parser.add_argument("--timeout", type=int, default=300, help="seconds per subprocess")
    parser.add_argument("--steps", type=int, default=8, help="timed steps a case (the median counts)")
    parser.add_argument("--warm", type=int, default=3, help="untimed steps before them (compilation, graphs)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    parser.add_argument("--mfu-at", type=float, metavar="TOK_S",
                        help="print the MFU figures of the one CASE at TOK_S tokens/s (a peer's, say) and exit")
    parser.add_argument("--sweep", help="load the one CASE once and time these space-separated variants in order, "
                        "e.g. 'prof=1 drop=0 bs=4 compile=1' (our side only)")
    args = parser.parse_args(argv)
    allocate_as_tunelab_train()
    if args.mfu_at:
        print(json.dumps(mfu_at(parse_case(args.cases[0]), args.mfu_at, args.baseline)))
        return 0
    if args.sweep:
        rows = run_sweep(parse_case(args.cases[0]), args.sweep.split(), args.baseline)
        name = args.cases[0].replace(":", "_").replace("@", "_").replace(",", "_").replace("=", "")
        with open(os.path.join(os.environ.get("OUT", "."), f"sweep_{name}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return 0
    if args.one:
        print(json.dumps(run_ours(parse_case(args.cases[0]), args.baseline, args.steps, args.warm)), flush=True)
        return 0
    import torch
    import transformers
    import peft

    host = host_cpu()
    print(f"device {torch.cuda.get_device_name(0)}, host {host}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}", flush=True)
    baselines, rows = {}, []
    for text in args.cases:
        case = parse_case(text)
        key = case["baseline_key"]
        if not args.no_baseline and key not in baselines:
            baselines[key] = subprocess_json([sys.executable, args.baseline, key], args.timeout)
            print("baseline", key, baselines[key], flush=True)
        ours = subprocess_json([sys.executable, __file__, "--one", "--baseline", args.baseline, "--steps", str(args.steps),
                                "--warm", str(args.warm), text], args.timeout)
        print("ours", text, ours, flush=True)
        rows.append(dict(case=text, host=host, baseline=baselines.get(key), ours=ours))
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        gc.collect()
    print("\n" + HEADER)
    for row in rows:
        print(fmt(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
