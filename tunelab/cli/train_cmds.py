"""`tunelab train` (fine-tune as a config says) and `tunelab plan` (the memory estimate alone)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from tunelab.train.launch import LAUNCH_FLAGS, add_launch_arguments

TRAIN_DESCRIPTION = """\
Fine-tune the model a config file describes (full, LoRA or QLoRA) on one GPU, on the CPU, or on several GPUs
(--nproc-per-node N, see docs/DISTRIBUTED.md). The work dir receives the resolved config, train_log.jsonl,
loss_curve.png, the evaluation answers (eval_outputs_iter_N.txt) and checkpoints iter_N/ (with checksums); one run
at a time trains in a work dir. Ctrl-C (or SIGTERM) saves a checkpoint and stops; `--resume auto` continues from the
newest sound checkpoint with the same loss curve. A work dir that holds checkpoints is never trained into from step 0
unless you say --overwrite. See docs/TRAINING.md.

example:
  tunelab train my_config.py --work-dir work_dirs/run1
  tunelab train my_config.py --work-dir work_dirs/run1 --resume auto
  tunelab train my_config.py --work-dir work_dirs/run1 --overwrite
  tunelab train my_config.py --cfg-options lr=1e-4 max_epochs=1 --seed 42
  tunelab train my_config.py --device cpu --cfg-options max_steps=20
  tunelab train my_config.py --nproc-per-node 8 --deepspeed zero2
"""

PLAN_DESCRIPTION = """\
Estimate the GPU memory one training step of a config needs (weights, gradients, optimiser states, activations,
loss) against this machine's GPU, and suggest settings that would fit. Nothing is downloaded or loaded: the
model's shape comes from its config.json (or a table of known models).

example:
  tunelab plan my_config.py
  tunelab plan my_config.py --cfg-options max_length=4096 batch_size=2
  tunelab plan my_config.py --gpu-memory 80 --cfg-options max_length=131072 deepspeed=zero3
      (a card that is not here; a row too long for it gets the sequence_parallel_size it needs)
  tunelab plan my_config.py --gpus 8 --cfg-options sequence_parallel_size=4
"""


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("train", help="fine-tune a model as a config file says",
                              description=TRAIN_DESCRIPTION, formatter_class=fmt)
    p.add_argument("config", metavar="CFG", help="a config file (tunelab copy-cfg makes one)")
    p.add_argument("--work-dir", "--work_dir", metavar="DIR",
                   help="where logs and checkpoints go (default: work_dirs/<config name>)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="'auto': continue from the work dir's newest sound checkpoint (start fresh if none); "
                        "or a checkpoint directory WORK_DIR/iter_N")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the work dir's checkpoints this run would overwrite (from step 0: all of them); "
                        "without it such a start is refused")
    p.add_argument("--seed", type=int, help="random seed (overrides the config's seed)")
    p.add_argument("--cfg-options", "--cfg_options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override settings, e.g. --cfg-options lr=1e-4 max_epochs=1")
    p.add_argument("--device", metavar="cpu|cuda", help="default: cuda if a GPU is present, else cpu")
    p.add_argument("--deepspeed", metavar="PRESET|JSON",
                   help="zero1, zero2, zero2_offload, zero3, zero3_offload or a DeepSpeed .json (several GPUs)")
    p.add_argument("--fsdp", action="store_true", help="shard with PyTorch FSDP2 (several GPUs)")
    add_launch_arguments(p)
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("plan", help="estimate the GPU memory a config needs, and what would fit",
                              description=PLAN_DESCRIPTION, formatter_class=fmt)
    p.add_argument("config", metavar="CFG")
    p.add_argument("--cfg-options", "--cfg_options", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", metavar="cpu|cuda", help="the GPU to check against (default: cuda if present)")
    p.add_argument("--gpu-memory", type=_gib, metavar="GIB",
                   help="check against a card of this many GiB instead (e.g. 80 for an H100, 141 for an H200)")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="GPUs of the run: ZeRO / FSDP divide states over them (default: sequence_parallel_size)")
    p.set_defaults(func=run_plan)


def _gib(text: str) -> float:
    """argparse type for --gpu-memory: a positive, finite number of GiB (0 was ignored, -5 checked against, nan and
    inf were tracebacks)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, e.g. 80, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB, e.g. 80, got {text}")
    return value


def _flags(args) -> dict[str, tuple[str, object]]:
    """The settings with a flag of their own (key -> (flag, value)), for load_config: a bad value's error names the
    flag, not --cfg-options. Applied after --cfg-options, so the flag wins."""
    flags: dict[str, tuple[str, object]] = {}
    if getattr(args, "seed", None) is not None:
        flags["seed"] = ("--seed", args.seed)
    if getattr(args, "deepspeed", None):
        flags["deepspeed"] = ("--deepspeed", args.deepspeed)
    if getattr(args, "fsdp", False):
        flags["fsdp"] = ("--fsdp", True)
    return flags


def _argv(args) -> list[str]:
    """These arguments as a command line again, for the torchrun re-launch (see tunelab/train/launch.py)."""
    argv = ["train", args.config]
    for flag, value in [("--work-dir", args.work_dir), ("--resume", args.resume), ("--device", args.device),
                        ("--seed", args.seed), ("--deepspeed", args.deepspeed)]:
        if value is not None:
            argv += [flag, str(value)]
    if args.fsdp:
        argv.append("--fsdp")
    if args.overwrite:
        argv.append("--overwrite")
    if args.cfg_options:
        argv += ["--cfg-options", *args.cfg_options]
    for flag in LAUNCH_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            argv += [flag, str(value)]
    return argv


# Segments that grow instead of fixed blocks, so a long step does not fail on fragmented GPU memory (the long-context
# figures of BENCHMARKS.md are measured with it). Read when CUDA first allocates; torchrun's workers inherit it.
ALLOC_CONF = ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def run_train(args) -> int:
    from tunelab.config.loader import load_config
    from tunelab.train.launch import launch_world_size, maybe_relaunch
    from tunelab.train.trackers import check_installed

    os.environ.setdefault(*ALLOC_CONF)  # the user's own setting wins
    # checked here, before torchrun starts N processes that would each stop on them (torchrun's failure report
    # burying the N copies of the message)
    cfg = load_config(args.config, args.cfg_options, _flags(args))
    check_installed(cfg.resolved_report_to())  # before minutes of loading, not after
    if cfg.sequence_parallel_size > 1 and "LOCAL_RANK" not in os.environ:  # a worker's strategy checks it itself
        from tunelab.train.sequence_parallel import check_before_loading

        check_before_loading(cfg, launch_world_size(_argv(args), args.nproc_per_node))
    code = maybe_relaunch(_argv(args), args.nproc_per_node)
    if code is not None:  # this process launched torchrun, which ran the training
        return code
    speaks = os.environ.get("RANK", "0") == "0"  # the other ranks read the same model and data: rank 0 speaks
    if not speaks:
        from transformers.utils import logging as transformers_logging

        logging.getLogger("tunelab").setLevel(logging.ERROR)  # their errors still show
        transformers_logging.disable_progress_bar()  # "Loading weights" once, not once per rank
    from tunelab.train.loop import train

    work_dir = Path(args.work_dir) if args.work_dir else Path("work_dirs") / Path(args.config).stem
    result = train(cfg, work_dir, resume=args.resume, overwrite=args.overwrite, config_path=args.config,
                   device=args.device)
    if not speaks:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"stopped at step {result.step}; saved {result.last_checkpoint}.\n"
              f"continue with: tunelab train {args.config} --work-dir {work_dir} --resume auto", file=sys.stderr)
        return 130
    if result.already_finished:
        print(f"already finished at step {result.step}: nothing trained; last checkpoint {result.last_checkpoint}\n"
              f"next: tunelab convert pth_to_hf {args.config} {result.last_checkpoint} {work_dir / 'hf'}")
        return 0
    from tunelab.data.reports import counted

    skipped = f" ({result.skipped_steps} skipped: an inf / NaN loss or gradients)" if result.skipped_steps else ""
    print(f"done: {counted(result.step, 'step')}{skipped}; last checkpoint {result.last_checkpoint}\n"
          f"next: tunelab convert pth_to_hf {args.config} {result.last_checkpoint} {work_dir / 'hf'}")
    return 0


def run_plan(args) -> int:
    import torch

    from tunelab.config.loader import load_config
    from tunelab.errors import TunelabError
    from tunelab.model.fit import plan_report

    cfg = load_config(args.config, args.cfg_options, _flags(args))
    if args.gpus is not None and (args.gpus < 1 or args.gpus % cfg.sequence_parallel_size):
        raise TunelabError(f"--gpus {args.gpus}: give a positive multiple of sequence_parallel_size "
                           f"({cfg.sequence_parallel_size}).")
    from tunelab.model.load import check_device

    device = check_device(args.device) if args.device else (
        torch.device("cuda") if torch.cuda.is_available() else None)
    if device is not None and device.type != "cuda":
        device = None  # only a GPU has a budget to check against
    card_bytes = int(args.gpu_memory * 2**30) if args.gpu_memory is not None else None
    print(plan_report(cfg, device, world_size=args.gpus, card_bytes=card_bytes))
    if device is None and card_bytes is None:
        print("  (no GPU here: compare the total with your GPU's memory, or give it: --gpu-memory GIB)")
    return 0
