"""LLaVA training, both stages: tunelab's step against a plain transformers + PEFT loop, same GPU, same samples.

    python benchmarks/bench_llava.py                  # InternLM2-1.8B-shaped LLM + CLIP-L/336 tower, random weights
    python benchmarks/bench_llava.py --tiny           # tiny shapes, runs on a CPU in a minute (a check of the script)
    python benchmarks/bench_llava.py --lora           # stage 2 as bf16 LoRA on both sides (no bitsandbytes needed)

Models (random weights in real shapes, written once to --root): a Llama-layout LLM with InternLM2-chat-1.8B's dims
(tunelab loads InternLM2 as exactly this graph), vocabulary 92544; a CLIPVisionModel with CLIP-L/14-336's dims;
and the two assembled as a HF LLaVA folder (random projector) for the plain loop to load.

Samples, the same for both sides: one image each (576 image tokens) and text around it as the configs' data has it:
stage 1 ("pretrain") a ~20-token prompt and a 30-70 token caption, trained; stage 2 ("finetune") a 20-60 token
question and a 100-600 token answer, trained. A step is --samples samples (32 / 16) and one optimiser update.
* tunelab: the loader, fast path, objective and collate of `tunelab train` (config as the llava configs: stage 1
  freeze_llm with method full, stage 2 qlora (--lora: lora) with LoRA r 128 on the language model, the projector
  trained), samples packed into rows of 2048 tokens (best fit), `--rows` rows a micro-batch, compile on as
  `tunelab train`.
* plain: `LlavaForConditionalGeneration.from_pretrained` (stage 2: 4-bit nf4 language model via bitsandbytes unless
  --lora, `prepare_model_for_kbit_training`, PEFT LoRA r 128 on the same layers, projector in modules_to_save),
  gradient checkpointing on the language model, bf16 autocast, samples padded per micro-batch of --plain-bs with an
  attention mask, the model's own loss; projector trainable in fp32 (as ours).
Both use torch AdamW and the same pixel values (random, prepared once: image decoding is not timed on either side).
Each side runs in its own subprocess (clean peaks). Prints a table: samples/s, peak allocated memory, speed-up.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench import subprocess_json  # noqa: E402  (one subprocess per side, the last JSON line is its result)

LLM = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
           num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768)
TOWER = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336, patch_size=14)
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048)
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=32, patch_size=8)
STAGES = ("pretrain", "finetune")


# --- the models, written once ------------------------------------------------------------------------------------

def write_models(root: Path, tiny: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.model import llava
    from tunelab.model.load import load_causal_lm
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.model.tiny import make_tokenizer, make_vision_tower

    if (root / "hf" / "config.json").is_file():
        return
    dims = TINY_LLM if tiny else LLM
    tokenizer = make_tokenizer(root / "llm")
    config = LlamaConfig(**dims, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "llm")
    make_vision_tower(root / "tower", "clip", **(TINY_TOWER if tiny else TOWER))
    tokenizer = load_tokenizer(str(root / "llm"))
    image_id = llava.add_image_token(tokenizer)
    llm = load_causal_lm(str(root / "llm"), dtype=torch.bfloat16, device="cpu")
    llava.resize_for_image_token(llm, image_id)
    model = llava.assemble(llm, llava.load_vision_tower(root / "tower", dtype=torch.bfloat16, device="cpu"),
                           image_token_id=image_id)
    llava.save_hf_llava(model, tokenizer, llava.load_image_processor(root / "tower"), root / "hf")


# --- the samples -------------------------------------------------------------------------------------------------

def samples(stage: str, n: int, per_image: int, image_id: int, vocab: int, seed: int) -> list[dict]:
    """n rows as the data step makes them: prompt (untrained), the image's tokens (untrained), text (trained)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if stage == "pretrain":
            prompt, answer = rng.randint(15, 25), rng.randint(30, 70)
        else:
            prompt, answer = rng.randint(20, 60), rng.randint(100, 600)
        text = [t + (t >= image_id) for t in (rng.randrange(vocab - 1) for _ in range(prompt + answer))]
        head, tail = text[:prompt], text[prompt:]  # (text never holds the image token)
        ids = head[:5] + [image_id] * per_image + head[5:] + tail
        labels = [-100] * (len(ids) - answer) + tail
        labels[0] = -100
        out.append({"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids))), "images": ["x"]})
    return out


def step_data(stage: str, args, tiny: bool):
    """(samples of each of `args.steps + args.warm` steps, pixel values of one step's images)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(args.root) / "hf")
    per_image, size = config.image_seq_length, config.vision_config.image_size
    n = args.samples or (32 if stage == "pretrain" else 16)
    steps = [samples(stage, n, per_image, config.image_token_id, config.text_config.vocab_size, seed=s)
             for s in range(args.warm + args.steps)]
    return steps, torch.randn(n, 3, size, size)


# --- one side ----------------------------------------------------------------------------------------------------

def quantized(stage: str, args) -> bool:
    """Stage 2's language model in 4 bits (QLoRA, as the llava configs), unless --lora or --tiny."""
    return stage == "finetune" and not args.tiny and not args.lora


def config_for(stage: str, root: Path, tiny: bool, compile_: bool, qlora: bool = True):
    from tunelab.config.schema import TrainConfig

    common = dict(pretrained_model_name_or_path=str(root / "llm"), visual_encoder_name_or_path=str(root / "tower"),
                  prompt_template="qwen_chat", max_length=2048, dtype="fp32" if tiny else "bf16",
                  use_compile=compile_, optimizer="adamw", accumulative_counts=1)
    if stage == "pretrain":
        return TrainConfig(**common, method="full", freeze_llm=True, lr=1e-3)
    return TrainConfig(**common, method="qlora" if qlora and not tiny else "lora", lora_r=128, lora_alpha=256,
                       lora_dropout=0.05, lr=2e-4)


def run_tunelab(stage: str, args) -> dict:
    import torch

    from tunelab.data.collate import collate
    from tunelab.data.packing import pack_rows
    from tunelab.model.fast import batch_to_device
    from tunelab.model.llava import llava_objective
    from tunelab.model.load import load_model_for_training
    from tunelab.model.plan import plan_fast_path
    from tunelab.train.optim import build_optimizer, choose_precision

    root, tiny = Path(args.root), args.tiny
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config_for(stage, root, tiny, compile_=not tiny and not args.no_compile, qlora=quantized(stage, args))
    plan = plan_fast_path(cfg, device)
    model, fast_path = load_model_for_training(cfg, device, plan)
    model.train()
    precision = choose_precision(model, torch.float32 if tiny else torch.bfloat16, device,
                                 fp32_master_weights=cfg.fp32_master_weights)
    optimizer = build_optimizer(model, cfg, device)
    objective = llava_objective(plan)
    steps, pixels = step_data(stage, args, tiny)
    # A step has several micro-batches: under CUDA graphs their gradients must add up in buffers allocated once
    # (a replay overwrites its outputs), as `tunelab train` does with accumulative_counts > 1.
    keep_grads = plan.cuda_graphs
    if keep_grads:
        from tunelab.train.loop import allocate_grad_buffers

        allocate_grad_buffers(model)

    def one_step(rows_of_step):
        rows = pack_rows(rows_of_step, cfg.max_length)
        n_images = 0
        loss_total, tokens_total = 0.0, 0
        micro = [rows[i:i + args.rows] for i in range(0, len(rows), args.rows)]
        batches = []
        for group in micro:
            batch = collate(group, 0, multiple_of=cfg.max_length if plan.cuda_graphs else 1)
            count = sum(len(r["images"]) for r in group)
            batch["pixel_values"] = pixels[n_images:n_images + count]
            n_images += count
            batches.append(batch)
        trained = sum(b["loss_index"].numel() for b in batches)
        for batch in batches:
            if plan.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            batch = batch_to_device(batch, device)
            with precision.autocast(device):
                loss_sum, n = objective(model, batch)
            (loss_sum / trained).backward()
            loss_total += float(loss_sum.detach())
            tokens_total += n
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=not keep_grads)
        return loss_total / max(tokens_total, 1), len(rows)

    return timed(one_step, steps, args, extra={"fast_path": fast_path})


def run_plain(stage: str, args) -> dict:
    """The plain loop: transformers' LlavaForConditionalGeneration + PEFT, as a user writes it."""
    import torch
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    root, tiny = Path(args.root), args.tiny
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if tiny else torch.bfloat16
    kwargs = dict(dtype=dtype)
    if quantized(stage, args):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
            # full module paths: transformers matches these against whole names, so "vision_tower" alone would
            # leave the tower and projector quantized
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
        kwargs["device_map"] = {"": device}
    model = LlavaForConditionalGeneration.from_pretrained(root / "hf", **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    model.config.use_cache = False
    if stage == "pretrain":
        model.requires_grad_(False)
        model.model.multi_modal_projector.float().requires_grad_(True)
        model.model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quantized(stage, args):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.model.multi_modal_projector.float()  # trained in fp32, as prepare_model_for_kbit_training leaves it
            model.model.language_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        targets = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        model = get_peft_model(model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, target_modules=targets,
                                                 modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM"))
        model.base_model.model.model.vision_tower.to(dtype)  # prepare_model_for_kbit_training upcast it
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3 if stage == "pretrain" else 2e-4, fused=device.type == "cuda")
    steps, pixels = step_data(stage, args, tiny)

    def one_step(rows_of_step):
        loss_total, trained = 0.0, sum(sum(label != -100 for label in r["labels"][1:]) for r in rows_of_step)
        for start in range(0, len(rows_of_step), args.plain_bs):
            group = rows_of_step[start:start + args.plain_bs]
            width = max(len(r["input_ids"]) for r in group)
            ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in group])
            labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in group])
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in group])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not tiny):
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                            pixel_values=pixels[start:start + len(group)].to(device, dtype))
            # transformers averages over the micro-batch's trained tokens: weigh it by them, as ours does
            n = int((labels[:, 1:] != -100).sum())
            (out.loss * n / trained).backward()
            loss_total += float(out.loss.detach()) * n
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_total / max(trained, 1), len(rows_of_step)

    return timed(one_step, steps, args)


def timed(one_step, steps, args, extra=None) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss, rows = [], None, None
    for rows_of_step in steps:
        start = time.perf_counter()
        loss, rows = one_step(rows_of_step)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed_ = sorted(times[args.warm:])
    median = timed_[len(timed_) // 2]
    out = dict(samples_per_s=round(len(steps[0]) / median, 2), s_per_step=round(median, 3),
               first_step_s=round(times[0], 1), loss=round(loss, 3), rows_per_step=rows,
               peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
    return {**out, **(extra or {})}


# --- driver ------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, fp32, no compile: a CPU check")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--root", default="/tmp/bench_llava", help="where the random models are written")
    parser.add_argument("--samples", type=int, default=0, help="samples a step (default 32 stage 1, 16 stage 2)")
    parser.add_argument("--rows", type=int, default=4, help="tunelab: packed 2048-token rows a micro-batch")
    parser.add_argument("--plain-bs", type=int, default=8, help="plain loop: samples a micro-batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="tunelab without torch.compile")
    parser.add_argument("--lora", action="store_true",
                        help="stage 2: bf16 LoRA instead of QLoRA on both sides (where bitsandbytes is missing)")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--side", choices=["tunelab", "plain"], help=argparse.SUPPRESS)  # internal: one run
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny and args.root == "/tmp/bench_llava":
        args.root = "/tmp/bench_llava_tiny"
    if args.side:  # one side of one stage, in this process
        result = (run_tunelab if args.side == "tunelab" else run_plain)(args.stage, args)
        print(json.dumps(result, default=str))
        return 0
    write_models(Path(args.root), args.tiny)
    common = ["--root", args.root, "--samples", str(args.samples), "--rows", str(args.rows), "--plain-bs",
              str(args.plain_bs), "--steps", str(args.steps), "--warm", str(args.warm)]
    common += ["--tiny"] * args.tiny + ["--no-compile"] * args.no_compile + ["--lora"] * args.lora
    results = {}
    for stage in args.stages:
        for side in ("plain", "tunelab"):
            cmd = [sys.executable, __file__, *common, "--side", side, "--stage", stage]
            results[(stage, side)] = subprocess_json(cmd, args.timeout)
            print(f"{stage} {side}: {results[(stage, side)]}", file=sys.stderr, flush=True)
    print("| stage | plain samples/s | tunelab samples/s | speed-up | plain peak GiB | tunelab peak GiB |")
    print("|---|---|---|---|---|---|")
    for stage in args.stages:
        p, t = results[(stage, "plain")], results[(stage, "tunelab")]
        speed = t.get("samples_per_s", 0) / p["samples_per_s"] if p.get("samples_per_s") else float("nan")
        print(f"| {stage} | {p.get('samples_per_s', p.get('error'))} | {t.get('samples_per_s', t.get('error'))} | "
              f"{speed:.2f}x | {p.get('peak_alloc_gib')} | {t.get('peak_alloc_gib')} |")
    if args.out:
        Path(args.out).write_text(json.dumps({f"{s}:{side}": r for (s, side), r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
