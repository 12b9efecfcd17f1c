"""Sequence parallelism in training: the process groups, the rows each rank reads, and the strategy that runs it.

`sequence_parallel_size = N` arranges the processes as data-parallel x sequence-parallel (world = dp x N). Ranks
0..N-1 form the first sequence-parallel group, N..2N-1 the second, and so on: consecutive ranks, so a group sits on
one machine's GPUs when N divides the GPUs per machine. Every rank of a group reads the same rows (`data_env`: this
group's rank among the dp groups) and runs its own shard of each row (`tunelab.model.sequence_parallel`).

`SequenceParallel` wraps the strategy of the engine (DDP, FSDP2 or DeepSpeed, chosen as it would be without
sequence parallelism) and changes three things, nothing else:

* the objective runs on this rank's shard of each row, in training and in evaluation;
* the rows are sharded over the data-parallel ranks only, and the loop counts a step's trained tokens over them,
  so each token is counted once;
* (nothing to do for gradients) the engines reduce gradients over every process, averaging, and the loop's backward
  undoes the average (x world size). Each rank of a group holds its part of the gradient of the group's loss, and
  each loss is divided by the trained tokens of the whole step, so that sum over every process is the gradient of
  one process on the same rows. tests/test_sequence_parallel.py checks it to 1e-5.
"""

from __future__ import annotations

import dataclasses

import torch

from tunelab.errors import TunelabError
from tunelab.model.sequence_parallel import SequenceParallelObjective, check_heads
from tunelab.train.distributed import DistEnv


def check_layout(size: int, world_size: int) -> None:
    """Refuse a sequence-parallel size the processes cannot be grouped by."""
    if world_size == 1:
        raise TunelabError(f"sequence_parallel_size = {size} splits each row over {size} processes, and this run is "
                           f"one process. Start {size} (or a multiple of {size}): NPROC_PER_NODE={size} tunelab train "
                           f"CFG (on a machine without GPUs, CPU processes over gloo).")
    if world_size % size:
        raise TunelabError(f"sequence_parallel_size = {size} with {world_size} processes: the processes form "
                           f"groups of {size} that share rows, so their number must be a multiple of {size}. Set "
                           f"NPROC_PER_NODE (x NNODES) to a multiple of {size}, or sequence_parallel_size to a "
                           f"divisor of {world_size}.")


def _heads_before_loading(cfg) -> tuple[int, int] | None:
    """(attention heads, key/value heads) from the model's config.json, when it can be read without loading."""
    from tunelab.model.shapes import model_shape

    try:
        shape = model_shape(cfg.pretrained_model_name_or_path)
    except TunelabError:  # not downloaded yet: checked on the loaded model instead
        return None
    return shape.num_attention_heads, shape.num_key_value_heads


def check_before_loading(cfg, world_size: int) -> None:
    """The processes can form the groups, and the model's heads (from its config.json, when here) split over them:
    `tunelab train` asks before it starts the processes (one message, not one per process), the strategy in each
    process (also for a run torchrun or a script started)."""
    check_layout(cfg.sequence_parallel_size, world_size)
    heads = _heads_before_loading(cfg)
    if heads:
        check_heads(*heads, cfg.sequence_parallel_size)


class SequenceParallel:
    """The engine's strategy, with every row split over `cfg.sequence_parallel_size` ranks."""

    def __init__(self, engine, cfg, env: DistEnv):
        from torch.distributed.device_mesh import init_device_mesh

        size = cfg.sequence_parallel_size
        check_before_loading(cfg, env.world_size)
        self.engine = engine
        self.size = size
        mesh = init_device_mesh(env.device.type, (env.world_size // size, size), mesh_dim_names=("dp", "sp"))
        self.group = mesh.get_group("sp")
        self.data_env = dataclasses.replace(env, rank=mesh.get_local_rank("dp"), world_size=env.world_size // size,
                                            group=mesh.get_group("dp"))
        """The ranks that read different rows: one per sequence-parallel group."""
        self.name = f"{engine.name}, each row over {size} ranks (sequence parallel)"

    def setup(self, model, optimizer, objective, compute_dtype: torch.dtype | None = None) -> None:
        """The engine's setup, its objective run on this rank's shard of each row."""
        from tunelab.model.parts import split_model

        config = split_model(model)[0].config
        check_heads(config.num_attention_heads, getattr(config, "num_key_value_heads", None)
                    or config.num_attention_heads, self.size)
        self.engine.setup(model, optimizer, SequenceParallelObjective(objective, self.group), compute_dtype)

    def __getattr__(self, name):
        # Everything else (forward_loss, backward, step, module, checkpoints) is the engine's.
        if name == "engine":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)
