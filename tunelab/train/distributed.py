"""The processes of a run (torchrun): who this process is, the process group, and the collectives the loop needs.

`init_distributed` reads torchrun's environment into a `DistEnv` (rank, world size, device) and starts the process
group when there are several processes; `validate_distributed` refuses the combinations of engines and settings that
cannot run, before any weight is loaded. How the model is wrapped and stepped in those processes is the strategy's
(`tunelab.train.strategy`). In one process every collective here is the identity.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class DistEnv:
    """This process among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: object = field(default=None, compare=False)
    """The process group these ranks form (None: every process). Sequence parallelism's data-parallel ranks, one
    per group of ranks that share rows, are a group of their own (`tunelab.train.sequence_parallel`)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, timeout_minutes: int = 30) -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group when there are several."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        from tunelab.model.load import check_device

        dev = check_device(device)  # "gpu", cuda on a CPU-only torch: the message chat and merge give
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def validate_distributed(cfg, env: DistEnv) -> None:
    """Refuse, before any weight is loaded, the combinations the engines cannot run, saying why."""
    from tunelab.train import deepspeed_configs as dsc

    bits = cfg.resolved_quant_bits()
    if cfg.deepspeed and cfg.fsdp:
        raise TunelabError("config sets both 'deepspeed' and 'fsdp': they are two ways of sharding the same states; "
                           "choose one (--deepspeed zero3 or --fsdp).")
    if cfg.fsdp:
        if env.world_size == 1:  # fully_shard needs a group of processes to shard over (torch: "RANK expected")
            raise TunelabError("fsdp = True in one process: FSDP2 shards the weights over several processes. Launch "
                               "several with --nproc-per-node N (one per GPU), or set fsdp = False (drop --fsdp) "
                               "to train in this one.")
        if bits:
            raise TunelabError(f"fsdp = True with method={cfg.method!r} ({bits}-bit base): FSDP2's fully_shard "
                               "cannot shard bitsandbytes' packed quantized weights. Use --deepspeed zero2 for QLoRA "
                               "on several GPUs, or method='lora' with fsdp.")
        if cfg.optimizer != "adamw":
            raise TunelabError(f"fsdp = True with optimizer={cfg.optimizer!r}: bitsandbytes' 8-bit optimizers do not "
                               "step sharded (DTensor) parameters. Set optimizer = 'adamw'.")
    if cfg.deepspeed:
        dsc.require_deepspeed()
        stage, offload = dsc.zero_stage(cfg.deepspeed), dsc.offloads(cfg.deepspeed)
        if bits and stage == 3:
            raise TunelabError(f"deepspeed = {cfg.deepspeed!r} with method={cfg.method!r}: ZeRO-3 partitions every "
                               "weight, and bitsandbytes' packed 4/8-bit weights cannot be partitioned (it would need "
                               "bnb_4bit_quant_storage equal to the compute dtype, which tunelab does not set). "
                               "Use --deepspeed zero2 (or zero2_offload) for QLoRA, or method='lora' with zero3.")
        if offload and env.device.type != "cuda":
            raise TunelabError(f"deepspeed = {cfg.deepspeed!r} offloads to CPU memory, but this run is already on "
                               "the CPU. Use zero1/zero2/zero3 (or no deepspeed) on CPU.")
        if offload and cfg.optimizer != "adamw":
            raise TunelabError(f"deepspeed = {cfg.deepspeed!r} offloads optimizer states to the CPU, where "
                               f"optimizer={cfg.optimizer!r} (a GPU 8-bit optimizer) cannot run. Set optimizer = 'adamw'.")
    if env.distributed and env.device.type == "cuda" and env.local_rank >= torch.cuda.device_count():
        raise TunelabError(f"LOCAL_RANK {env.local_rank} but this machine has {torch.cuda.device_count()} GPUs: "
                           "set NPROC_PER_NODE (or --nproc-per-node) to at most the number of GPUs.")


def all_reduce_sum(value, env: DistEnv) -> torch.Tensor:
    """Sum over the ranks of `env` (e.g. the trained-token count). Ints and floats become tensors on this rank's
    device."""
    if not torch.is_tensor(value):
        value = torch.tensor(value, device=env.device)
    if env.distributed:
        value = value.clone()
        torch.distributed.all_reduce(value, group=env.group)
    return value


def rank_shard(indices: list[int], env: DistEnv) -> list[int]:
    """This rank's share of a list of row indices (every rank gets the same count)."""
    usable = len(indices) - len(indices) % env.world_size if env.world_size > 1 else len(indices)
    return indices[env.rank:usable:env.world_size]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        torch.distributed.barrier()


def cleanup(env: DistEnv) -> None:
    if env.distributed and torch.distributed.is_initialized():
        # All ranks arrive before any tears the group down: a gloo peer that vanishes while another is still
        # sending or waiting makes that one abort ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
