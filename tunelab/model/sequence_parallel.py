"""Sequence parallelism (DeepSpeed-Ulysses): each packed row's tokens spread over N ranks, attention over whole rows.

Layout. Each row of a batch is padded to a multiple of N (the padding its own segment, nothing trained) and cut
into N contiguous shards; rank r of a sequence-parallel group holds shard r of every row (`shard_batch`). The
embedding, every layer's projections, norms and MLP, and the loss run on that shard alone. Only attention needs the
whole row: there one all-to-all turns [this rank's tokens, all heads] into [every token of the row, 1/N of the heads]
(`exchange`), attention runs over whole rows with the kernels it always uses (`tunelab.model.attention`: varlen
flash on a GPU, sdpa a sample at a time on the CPU) and the sample boundaries of the whole row, and a second
all-to-all turns [every token, 1/N of the heads] back into [this rank's tokens, all heads]. Every rank has the whole
row's `position_ids`, so every rank derives the same boundaries (`cu_seqlens`); RoPE uses each shard's own slice.

Heads. The query heads must divide by N (`check_heads` says so before training). Grouped key/value heads that do
not divide by N (fewer than N, say) are repeated, each `N / gcd(kv_heads, N)` times: the fewest copies that give
every rank whole KV heads for its query heads. Copies cost all-to-all traffic; their gradients add up in backward.

Gradients. The all-to-all's backward is the inverse all-to-all, so one rank's backward reaches the tokens of every
rank of its group: each rank ends with the gradient of the group's whole loss through the computations it ran, and
the parameter gradient is the *sum* over the group (and over data-parallel groups, the loss being divided by the
trained tokens of the whole step). The engines' gradient all-reduce over every process gives that sum once the loop
has undone their average (`tunelab.train.sequence_parallel`, docs/DISTRIBUTED.md).

The process groups and the data layout are `tunelab.train.sequence_parallel`'s; here is what runs inside the model:
the sharding of a batch, the objective that runs on a shard, and the exchange of heads that attention calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunelab.data.collate import loss_targets
from tunelab.errors import TunelabError


def check_heads(num_heads: int, num_kv_heads: int, size: int) -> None:
    """Refuse a sequence-parallel size the attention heads cannot be shared by."""
    if size > 1 and num_heads % size:
        divisors = [n for n in range(2, num_heads + 1) if num_heads % n == 0]
        raise TunelabError(
            f"sequence_parallel_size = {size}: the model has {num_heads} attention heads ({num_kv_heads} key/value "
            f"heads), and each rank of a sequence-parallel group attends with an equal share of the query heads, so "
            f"the size must divide {num_heads}: one of {divisors}.")


def kv_repeats(num_kv_heads: int, size: int) -> int:
    """How many copies of each key/value head give every one of `size` ranks whole KV heads (1: none needed)."""
    return size // math.gcd(num_kv_heads, size)


# --- the all-to-all ---------------------------------------------------------------------------------------------

def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Piece j of `x` along scatter_dim goes to rank j; the pieces received are joined along gather_dim, in rank
    order."""
    size = torch.distributed.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim))  # [size, ...]: contiguous, one piece per rank
    received = torch.empty_like(send)
    torch.distributed.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """`_all_to_all` whose backward is the inverse all-to-all (the gradient goes back to where each piece came
    from)."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def exchange(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable all-to-all over `group`: split `x` along scatter_dim over the ranks, gather along gather_dim."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


@torch.compiler.disable  # a collective: eager code between the compiled halves of a layer
def attend_over_whole_rows(attend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group,
                           **attend_kwargs):
    """Attention of this rank's shard of each row, computed over whole rows with a share of the heads.

    query [B, Hq, t, D], key / value [B, Hkv, t, D]: this rank's t tokens of each row, every head.
    attend(q, k, v, **attend_kwargs) -> [B, T, h, D]: attention over whole rows (T = t x ranks) of h heads.
    Returns [B, t, Hq, D], as transformers' attention functions do.
    """
    size = torch.distributed.get_world_size(group)
    repeats = kv_repeats(key.shape[1], size)
    if repeats > 1:
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    hq, hkv = query.shape[1] // size, key.shape[1] // size
    # One all-to-all for q, k and v: the heads grouped by the rank they go to, that rank's q, k and v side by side.
    per_rank = [x.unflatten(1, (size, -1)) for x in (query, key, value)]
    qkv = exchange(torch.cat(per_rank, dim=2).flatten(1, 2), group, scatter_dim=1, gather_dim=2)
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)  # [B, h, T, D]: whole rows, this rank's heads
    out = attend(q, k, v, **attend_kwargs)  # [B, T, hq, D]
    return exchange(out, group, scatter_dim=1, gather_dim=2)  # [B, t, Hq, D]: this rank's tokens, every head


# --- a batch, one rank's share ----------------------------------------------------------------------------------

def shard_batch(batch: dict, rank: int, size: int) -> dict:
    """Rank `rank`'s shard of every row of a collated batch (`tunelab.data.collate`), for the objective.

    The rows are padded to a multiple of `size` (a segment of its own, nothing trained) and cut into `size`
    contiguous shards. The trained positions are those of the whole row (the label of a shard's last token is the
    next shard's first token), renumbered within the shard. `decoder_kwargs` carries the whole rows' sample
    boundaries, which attention needs (transformers hands these keyword arguments to every attention call).
    """
    from tunelab.model.attention import cu_seqlens_from_position_ids

    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    if "loss_index" in batch:
        index, targets = batch["loss_index"], batch["loss_targets"]
    else:  # a batch built by hand
        index, targets = loss_targets(batch["labels"])
    rows, width = input_ids.shape
    padded = -(-width // size) * size
    if padded > width:
        extra = padded - width
        input_ids = F.pad(input_ids, (0, extra))
        tail = torch.arange(extra, device=position_ids.device, dtype=position_ids.dtype).expand(rows, extra)
        position_ids = torch.cat([position_ids, tail], dim=1)
    cu, longest = cu_seqlens_from_position_ids(position_ids)
    part = padded // size
    row, column = index // width, index % width
    mine = (column // part == rank).nonzero().squeeze(1)  # one sync here; indexing by it then waits for nothing
    columns = slice(rank * part, (rank + 1) * part)
    return {
        "input_ids": input_ids[:, columns],
        "position_ids": position_ids[:, columns],
        "loss_index": row[mine] * part + column[mine] - rank * part,
        "loss_targets": targets[mine],
        "decoder_kwargs": {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
                           "max_length_k": longest},
    }


class SequenceParallelObjective:
    """An objective (`tunelab.model.loss.CausalLMObjective`'s four parts) run on this rank's shard of each row.

    Every rank of `group` is given the same batch; the shards' loss sums and token counts add up to the batch's.
    `units(batch)`, counted by the loop on the whole batch before the step, is the inner objective's."""

    def __init__(self, objective, group):
        self.objective, self.group = objective, group
        self.rank, self.size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)

    def __call__(self, model, batch: dict):
        shard = shard_batch(batch, self.rank, self.size)
        shard["decoder_kwargs"]["sequence_parallel_group"] = self.group
        return self.objective(model, shard)

    def units(self, batch: dict) -> int:
        return self.objective.units(batch)

    def take_metrics(self) -> dict:
        return self.objective.take_metrics()

    def copy(self) -> "SequenceParallelObjective":
        return SequenceParallelObjective(self.objective.copy(), self.group)

