"""DPO: `tunelab train` against TRL's DPOTrainer, same model, data and settings, in one session.

    python benchmarks/bench_dpo.py                                    # Llama-2-7B shape, QLoRA, 2k tokens a pair
    python benchmarks/bench_dpo.py --shape tiny --method lora --seq 128 --steps 3 --warmup 1   # CPU: try it out

The model is a random-initialised model of a real shape (bf16 safetensors, written once; benchmarks/bench_scaling.py
writes it) with the tests' small tokenizer. The data is synthetic pairs: a prompt of seq/8 tokens and two replies,
each sequence (prompt + reply) cut at --seq tokens on both sides, so a pair is 2 x seq tokens (2k at --seq 1024).

Both sides train QLoRA (or --method lora) with the same rank, alpha and dropout on every linear layer, the same
batch (--bs pairs a micro-batch x --acc micro-batches a step), optimizer, learning rate, beta and sigmoid loss, bf16
and gradient checkpointing; both take the reference as the base model with the adapters switched off, one extra
forward a step. Each side runs in its own process, so peak memory is its own, reserved (what the card must hold) and
allocated (what the tensors took; the difference is the allocator's cache, and under CUDA graphs their pool):
tunelab's from its train_log.jsonl (`memory_reserved_gb`, `memory_gb`), TRL's torch.cuda.max_memory_reserved() and
max_memory_allocated() at the end. Tokens/s counts the real tokens of both sequences of every pair (prompt included,
padding not), the median over the steps after --warmup (compilation).
Rows also go to $OUT/dpo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench import allocate_as_tunelab_train  # noqa: E402
from bench_scaling import SHAPES, write_model  # noqa: E402

CONFIG = """\
pretrained_model_name_or_path = {model!r}
method = {method!r}
objective = "dpo"
beta = 0.1
dpo_loss = "sigmoid"
reference = "adapters_off"
data_path = {data!r}
prompt_template = "qwen_chat"
max_length = {seq}
batch_size = {bs}
accumulative_counts = {acc}
optimizer = {optimizer!r}
lr = 5e-6
lr_scheduler = "constant"
warmup_ratio = 0.0
lora_r = {rank}
lora_alpha = 16
lora_dropout = {dropout}
max_steps = {steps}
save_steps = 100000
logging_steps = 1
evaluation_freq = 100000
evaluation_inputs = []
seed = 0
"""

# tunelab's optimizer name -> the transformers Trainer's
TRAINER_OPTIMIZERS = {"adamw": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit",
                      "paged_adamw_8bit": "paged_adamw_8bit"}


def write_pairs(path: Path, model_dir: Path, n: int, seq: int) -> None:
    """n pairs whose prompt + reply reaches past seq tokens on each side (both sides cut at seq)."""
    from transformers import AutoTokenizer

    from tunelab.model.tiny import _CORPUS

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = " ".join(_CORPUS).split()
    rng = random.Random(0)

    def text(tokens: int) -> str:
        ids = tokenizer(" ".join(rng.choices(words, k=tokens)), add_special_tokens=False).input_ids[:tokens]
        return tokenizer.decode(ids)

    prompt_tokens = max(seq // 8, 4)
    pairs = [{"prompt": text(prompt_tokens), "chosen": text(seq), "rejected": text(seq)} for _ in range(n)]
    path.write_text("\n".join(json.dumps(p) for p in pairs), encoding="utf-8")


def run_tunelab(args, root: Path, model_dir: Path, data: Path) -> dict:
    work_dir = root / "run_tunelab"
    shutil.rmtree(work_dir, ignore_errors=True)
    config = root / "dpo_tunelab.py"
    config.write_text(CONFIG.format(model=str(model_dir), method=args.method, data=str(data), seq=args.seq,
                                    bs=args.bs, acc=args.acc, optimizer=args.optimizer, rank=args.rank,
                                    dropout=args.dropout, steps=args.steps) + "".join(f"{s}\n" for s in args.set))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "tunelab", "train", str(config), "--work-dir", str(work_dir)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
    side = "tunelab" + (f" ({', '.join(args.set)})" if args.set else "")
    row = {"side": side, "wall_s": round(time.perf_counter() - start, 1)}
    log = work_dir / "train_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    steps = [r for r in records if "tokens_per_s" in r]
    timed = [r["tokens_per_s"] for r in steps if r["step"] > args.warmup]
    if proc.returncode != 0 or not timed:
        row["error"] = (proc.stdout + proc.stderr)[-2000:]
        return row
    row.update(tok_s=round(statistics.median(timed)), steps=len(steps),
               reserved_gib=max(r.get("memory_reserved_gb", r["memory_gb"]) for r in steps),
               allocated_gib=max(r["memory_gb"] for r in steps),
               loss_first=round(steps[0]["loss"], 4), loss_last=round(steps[-1]["loss"], 4),
               margin_last=steps[-1].get("reward_margin"))
    return row


def trl_worker(args) -> None:
    """Runs in its own process: TRL's DPOTrainer on the same model and data; prints one JSON line."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    on_gpu = torch.cuda.is_available()
    _stand_in_for_triton()
    model_dir = args.model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    dtype = torch.bfloat16 if on_gpu else torch.float32
    kwargs = {"dtype": dtype}
    if args.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0 if on_gpu else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if on_gpu and args.method != "qlora":
        model.to("cuda")
    pairs = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    times: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                if on_gpu:
                    torch.cuda.synchronize()
                times.append((time.perf_counter(), float(logs["num_tokens"])))

    config = DPOConfig(output_dir=str(Path(args.root) / "run_trl"), per_device_train_batch_size=args.bs,
                       gradient_accumulation_steps=args.acc, max_steps=args.steps, learning_rate=5e-6,
                       lr_scheduler_type="constant", warmup_steps=0, bf16=on_gpu, use_cpu=not on_gpu,
                       gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                       logging_steps=1, save_strategy="no", report_to=[], beta=0.1, loss_type=["sigmoid"],
                       max_length=args.seq, optim=TRAINER_OPTIMIZERS[args.optimizer], disable_dropout=False,
                       dataloader_num_workers=0, seed=0)
    peft_config = LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=args.dropout, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[Clock()])
    trainer.train()
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(times, times[1:])][max(args.warmup - 1, 0):]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    margins = [h.get("rewards/margins") for h in trainer.state.log_history if "loss" in h]
    print("TRL_RESULT " + json.dumps({
        "tok_s": round(statistics.median(rates)) if rates else None, "steps": len(losses),
        "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if on_gpu else None,
        "allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if on_gpu else None,
        "loss_first": round(losses[0], 4) if losses else None, "loss_last": round(losses[-1], 4) if losses else None,
        "margin_last": margins[-1] if margins else None}), flush=True)


def _stand_in_for_triton() -> None:
    """TRL computes log-probabilities with a Triton kernel, which exists where torch has CUDA; without Triton (the
    CPU check of this script) it has none, so a plain-torch one stands in. Never used on the GPU."""
    import trl.trainer.utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is not None:
        return
    import torch

    class PlainLogProbs:
        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
            logits = torch.nn.functional.linear(hidden, weight, bias).float() * (logit_scale or 1.0) / temperature
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            all_logp = torch.log_softmax(logits, -1)
            p = all_logp.exp()
            return (all_logp.gather(-1, targets[:, None]).squeeze(-1), -(p * all_logp).sum(-1),
                    torch.log((p * p).sum(-1)), logits.mean(-1), logits.argmax(-1) == targets)

    trl_utils._ChunkedLogProbFunction = PlainLogProbs


def run_trl(args, root: Path, model_dir: Path, data: Path) -> dict:
    cmd = [sys.executable, __file__, "--trl-worker", "--model-dir", str(model_dir), "--data", str(data),
           "--root", str(root), "--method", args.method, "--seq", str(args.seq), "--bs", str(args.bs),
           "--acc", str(args.acc), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--optimizer", args.optimizer, "--rank", str(args.rank), "--dropout", str(args.dropout)]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
    row = {"side": "trl", "wall_s": round(time.perf_counter() - start, 1)}
    found = [line for line in proc.stdout.splitlines() if line.startswith("TRL_RESULT ")]
    if proc.returncode != 0 or not found:
        row["error"] = (proc.stdout + proc.stderr)[-2000:]
        return row
    row.update(json.loads(found[-1][len("TRL_RESULT "):]))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama7b", choices=sorted(SHAPES))
    parser.add_argument("--method", default="qlora", choices=["lora", "qlora"])
    parser.add_argument("--seq", type=int, default=1024, help="tokens a sequence (prompt + reply); a pair is 2x")
    parser.add_argument("--bs", type=int, default=1, help="pairs a micro-batch")
    parser.add_argument("--acc", type=int, default=8, help="micro-batches a step")
    parser.add_argument("--optimizer", default="adamw", choices=sorted(TRAINER_OPTIMIZERS))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median (compilation)")
    parser.add_argument("--sides", nargs="+", default=["trl", "tunelab"], choices=["trl", "tunelab"])
    parser.add_argument("--timeout", type=int, default=540, help="seconds a side")
    parser.add_argument("--root", default="/tmp/tunelab_dpo")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="a line added to tunelab's config, e.g. --set cuda_graphs=False (repeatable)")
    parser.add_argument("--out", help="write the rows as JSON here (default $OUT/dpo.json)")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    allocate_as_tunelab_train()  # the TRL worker's too; `tunelab train` sets the same
    if args.trl_worker:
        trl_worker(args)
        return 0

    root = Path(args.root)
    model_dir = root / f"model_{args.shape}"
    if not (model_dir / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        write_model(args.shape, model_dir)
    data = root / f"pairs_{args.seq}.jsonl"
    if not data.is_file():
        write_pairs(data, model_dir, n=int(1.2 * args.steps * args.bs * args.acc) + 8, seq=args.seq)
    out_path = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "dpo.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for side in args.sides:
        row = (run_trl if side == "trl" else run_tunelab)(args, root, model_dir, data)
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_path.write_text(json.dumps(rows, indent=1))
    print(f"\n{args.shape} {args.method} DPO, {2 * args.seq} tokens a pair x {args.bs} pairs x {args.acc} micro-batches "
          f"a step, median of steps after {args.warmup}")
    print("| side | tokens/s | peak reserved GiB | peak allocated GiB | loss step 1 -> last | reward margin last | run s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("tok_s") is None:
            print(f"| {r['side']} | failed | | | | | {r['wall_s']} |")
            continue
        print(f"| {r['side']} | {r['tok_s']:,} | {r.get('reserved_gib')} | {r.get('allocated_gib')} | "
              f"{r['loss_first']} -> {r['loss_last']} | {r.get('margin_last')} | {r['wall_s']} |")
    rates = {r["side"]: r.get("tok_s") for r in rows}
    for side, rate in rates.items():
        if rates.get("trl") and rate and side.startswith("tunelab"):
            print(f"{side} / TRL tokens/s: {rate / rates['trl']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
