"""`tunelab train` on 1 and N GPUs of one machine, one engine at a time: tokens/s, scaling, peak memory, loss.

    python benchmarks/bench_scaling.py --shape qwen2_5_1_5b --method full --seq 2048 --bs 4 --steps 14 \
        --runs 1:none 2:ddp 2:fsdp 2:zero2 2:zero3

Unlike bench.py, which times our training step in one process, this runs the user's command itself: a config file,
`NPROC_PER_NODE=N tunelab train CFG --work-dir DIR [--deepspeed zero2 | --fsdp]`, with the defaults of `tunelab train`
(fast path, compile, chunked loss). The model is a random-initialised model of a real shape (bf16 safetensors,
written once), with the tests' small tokenizer: its token ids are below any real vocabulary, and only the token count
matters here. The data is synthetic alpaca rows of instruction-data lengths, packed into rows of --seq tokens, so
every micro-batch holds nearly bs x seq tokens on each GPU.

Tokens are counted as the peer baseline (shared/baselines/hf_peft_baseline.py) counts them: tokens trained. The
baseline trains every token of full rows (labels = input_ids); here `train_on = 'all'` trains every token of every
sample (but each sample's first, which has nothing before it to be predicted from), and `tunelab train`'s log counts
the real tokens of its rows, leaving out the padding that ends a packed row (~1.5% with best-fit packing). The table
shows both: tok/s (real tokens, all trained but the samples' first) and how full the rows were.

From each run's train_log.jsonl: tokens/s of the whole machine (median over the steps after --warmup, which compile),
the same per GPU and as a fraction of the first run's per-GPU figure (scaling efficiency), MFU per GPU (as bench.py
counts it, on real tokens), rank 0's peak allocated and reserved memory, and the loss at the first and last step:
every engine starts from the same weights and sees the same global batches when N is the same, so their losses
should agree. Rows also go to $OUT/scaling.json after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # bench.py's MFU count
# bench name -> (transformers model_type, the hub id whose shape tunelab.model.memory knows, or the shape itself;
# "tiny" tries the script out on a CPU)
SHAPES = {"qwen2_5_0_5b": ("qwen2", "Qwen/Qwen2.5-0.5B-Instruct"),
          "qwen2_5_1_5b": ("qwen2", "Qwen/Qwen2.5-1.5B-Instruct"),
          "llama7b": ("llama", "meta-llama/Llama-2-7b-chat-hf"),
          "tiny": ("qwen2", dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2))}
ENGINE_FLAGS = {"none": [], "ddp": [], "fsdp": ["--fsdp"], "zero2": ["--deepspeed", "zero2"],
                "zero3": ["--deepspeed", "zero3"],
                # CUDA graphs, which the default leaves off with several processes
                "graphs": ["--cfg-options", "cuda_graphs=True"]}

CONFIG = """\
pretrained_model_name_or_path = {model!r}
method = {method!r}
data_path = {data!r}
data_format = "alpaca"
train_on = "all"
prompt_template = "qwen_chat"
max_length = {seq}
batch_size = {bs}
accumulative_counts = {acc}
optimizer = {optimizer!r}
lr = 1e-5
lora_r = 64
lora_alpha = 16
max_steps = {steps}
save_steps = 100000
logging_steps = 1
evaluation_freq = 100000
evaluation_inputs = []
seed = 0
"""


def shape_config(shape: str, tokenizer):
    """The transformers config of `shape` (bench.py's table of real shapes, or a dict of sizes), with `tokenizer`'s
    special tokens."""
    from transformers import AutoConfig

    from tunelab.model.shapes import KNOWN_SHAPES

    model_type, dims = SHAPES[shape]
    dims = dims if isinstance(dims, dict) else KNOWN_SHAPES[dims]
    return AutoConfig.for_model(model_type, **{k: v for k, v in dims.items() if k != "model_type"},
                                max_position_embeddings=32768, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)


def write_model(shape: str, out_dir: Path) -> None:
    """A random-initialised model of `shape` in bf16 (initialised on the GPU: seconds, not minutes), and a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.model.tiny import make_tokenizer

    config = shape_config(shape, make_tokenizer(out_dir))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)


def write_data(path: Path, rows: int) -> None:
    """Alpaca rows of ~60-600 tokens (about 330 on average), like instruction data: packed rows come out nearly full.
    (Samples longer than half a row would each take a row of their own, padded: the tokens/s of `tunelab train`
    counts real tokens, so it would fall by the padding.)"""
    from tunelab.model.tiny import _CORPUS

    words = " ".join(_CORPUS).split()
    rng = random.Random(0)
    data = [{"instruction": " ".join(rng.choices(words, k=20)), "input": "",
             "output": " ".join(rng.choices(words, k=rng.randint(30, 430)))} for _ in range(rows)]
    path.write_text(json.dumps(data), encoding="utf-8")


def run_one(args, nproc: int, engine: str, root: Path) -> dict:
    work_dir = root / f"run_{nproc}_{engine}"
    shutil.rmtree(work_dir, ignore_errors=True)  # a fresh run, not a continuation of an earlier invocation's
    config = root / f"{args.method}.py"
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "tunelab", "train", str(config), "--work-dir", str(work_dir), *ENGINE_FLAGS[engine]]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
        failed = proc.returncode != 0
        tail = (proc.stdout + proc.stderr)[-1500:]
        said = [line for line in (proc.stdout + proc.stderr).splitlines()
                if line.startswith(("fast path", "memory plan", "data:"))]
    except subprocess.TimeoutExpired as exc:
        failed, tail, said = True, f"timeout after {args.timeout} s: {str(exc.stderr)[-1200:]}", []
    row = dict(gpus=nproc, engine=engine, wall_s=round(time.perf_counter() - start, 1), said=said)
    log = work_dir / "train_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    steps = [r for r in records if "tokens_per_s" in r]
    timed = [r["tokens_per_s"] for r in steps if r["step"] > args.warmup]
    if timed:
        row.update(tok_s=round(statistics.median(timed)), tok_s_gpu=round(statistics.median(timed) / nproc),
                   peak_gib=max(r["memory_gb"] for r in steps),
                   reserved_gib=max(r.get("memory_reserved_gb", 0) for r in steps), loss_first=round(steps[0]["loss"], 4),
                   loss_last=round(steps[-1]["loss"], 4), steps=len(steps))
        row["mfu_gpu"] = mfu_per_gpu(row["tok_s_gpu"], root / f"model_{args.shape}", args.method, said)
        row.update(data_counts(said, args.seq))
    if failed or not timed:
        row["error"] = tail
    return row


def data_counts(said: list[str], seq: int) -> dict:
    """How full the packed rows were and what share of their tokens is trained, from `tunelab train`'s data line
    ("... N train samples in R rows, T tokens (K trained) ...")."""
    found = re.search(r"(\d+) train samples? in (\d+) rows?, (\d+) tokens? \((\d+) trained\)", " ".join(said))
    if not found:
        return {}
    samples, rows, tokens, trained = map(int, found.groups())
    return dict(rows_full=round(tokens / max(rows * seq, 1), 4), trained_share=round(trained / max(tokens, 1), 4))


def mfu_per_gpu(tok_s_gpu: float, model_dir: Path, method: str, said: list[str]) -> float:
    """Model FLOPs utilisation of one GPU, counted as bench.py counts it: matmul FLOPs of the decoder linears and
    lm_head (attention left out), 6N a token for full fine-tuning, 4N for LoRA / QLoRA, plus 2N for each layer that
    `tunelab train` said it checkpoints (recomputed forward); against 989 TFLOP/s (H100 / H200 dense bf16)."""
    from bench import PEAK_FLOPS, matmul_params
    from tunelab.model.shapes import model_shape

    shape = model_shape(str(model_dir))
    n_matmul = matmul_params(shape)
    found = re.search(r"'checkpointing': '(\d+) layers'", " ".join(said))
    recomputed = int(found.group(1)) / shape.num_hidden_layers if found else 0.0
    flops = (6 if method == "full" else 4) * n_matmul + 2 * n_matmul * recomputed
    return round(tok_s_gpu * flops / PEAK_FLOPS, 3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2_5_1_5b", choices=sorted(SHAPES))
    parser.add_argument("--method", default="full", choices=["full", "lora", "qlora"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--acc", type=int, default=1, help="accumulative_counts (micro-batches a step)")
    parser.add_argument("--optimizer", default="adamw", help="the config's optimizer (the qlora configs ship with "
                        "adamw_8bit); tunelab train checks the name")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the median (compilation)")
    parser.add_argument("--runs", nargs="+", default=["1:none", "2:ddp"], help="GPUS:ENGINE, ENGINE one of "
                        + ", ".join(ENGINE_FLAGS))
    parser.add_argument("--timeout", type=int, default=240, help="seconds per run")
    parser.add_argument("--root", default="/tmp/tunelab_scaling")
    args = parser.parse_args(argv)

    root = Path(args.root)
    model_dir = root / f"model_{args.shape}"
    if not (model_dir / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        write_model(args.shape, model_dir)
    max_gpus = max(int(r.split(":")[0]) for r in args.runs)
    # enough samples for every step on every GPU, with room to spare
    data = root / "data.json"
    write_data(data, rows=int(1.5 * args.steps * args.acc * args.bs * max_gpus * args.seq / 300) + 16)
    (root / f"{args.method}.py").write_text(CONFIG.format(model=str(model_dir), method=args.method, data=str(data),
                                                          seq=args.seq, bs=args.bs, acc=args.acc, steps=args.steps,
                                                          optimizer=args.optimizer))
    out_path = Path(os.environ.get("OUT", ".")) / "scaling.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.runs:
        nproc, engine = spec.split(":")
        row = run_one(args, int(nproc), engine, root)
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_path.write_text(json.dumps(rows, indent=1))
    base = next((r["tok_s_gpu"] for r in rows if "tok_s_gpu" in r), None)
    print(f"\n{args.shape} {args.method}, {args.seq} tokens x {args.bs} rows x {args.acc} micro-batches a GPU, "
          f"median of steps after {args.warmup}")
    print("tok/s: the real tokens of the packed rows (padding left out), every one trained but each sample's first "
          "(train_on = 'all'), as the peer baseline counts the tokens of its full rows, all trained.")
    print("| GPUs | engine | tok/s | tok/s per GPU | scaling | MFU | rows full / tokens trained "
          "| peak alloc / reserved GiB (rank 0) | loss step 1 -> last | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "tok_s" not in r:
            print(f"| {r['gpus']} | {r['engine']} | failed | | | | | | | {r['wall_s']} |")
            continue
        scaling = f"{r['tok_s_gpu'] / base:.0%}" if base else "-"
        counted = f"{r['rows_full']:.1%} / {r['trained_share']:.1%}" if "rows_full" in r else "-"
        print(f"| {r['gpus']} | {r['engine']} | {r['tok_s']:,} | {r['tok_s_gpu']:,} | {scaling} | {r['mfu_gpu']:.1%} "
              f"| {counted} | {r['peak_gib']:.2f} / {r['reserved_gib']:.2f} | {r['loss_first']} -> {r['loss_last']} "
              f"| {r['wall_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
