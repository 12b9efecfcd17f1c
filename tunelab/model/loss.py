"""Causal-LM loss over the trained tokens only, without building full-vocabulary logits.

A 7B model with a 128k vocabulary makes fp32 logits of 2 GB for one 4k-token row; in supervised fine-tuning most
positions are prompt tokens whose logits are thrown away. So: run the decoder for hidden states, keep the positions
whose next token is trained, and project those through `lm_head` in chunks, one chunk's logits alive at a time.

Each chunk's gradient is taken in the forward pass (`LinearCrossEntropy`): with the logits at hand, d loss / d
logits is softmax - one-hot, so the gradients for the hidden states (and for lm_head's weight when it is trained)
are two matmuls right there, kept until backward scales them by the incoming gradient. That is three lm_head
matmuls a step instead of the four of a checkpointed chunk (forward, recompute, two for backward), and one pass
over the logits instead of four. On a GPU with compiled layers, the softmax and its gradient are one compiled kernel
that reads the bf16 logits once and writes the bf16 gradient.

Which positions are trained comes from the batch: `tunelab.data.collate` lists them on the CPU (`loss_index`,
`loss_targets`), so nothing here waits for the GPU; batches built by hand without them get them from `labels`.

The loop calls an objective, `objective(model, batch) -> (loss_sum, n_trained_tokens)`: `causal_lm_objective(plan)` is
this loss as the fast-path plan runs it. Another objective (per-sequence log-probabilities for preference training,
say) is another function of the same shape, built on the same chunked projection.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tunelab.config.schema import TrainConfig
from tunelab.data.collate import loss_targets
from tunelab.model.parts import split_model

MAX_CHUNK_LOGITS = 2**25  # logits a chunk when lm_head is frozen: 64 MiB in bf16 (128 MiB fp32 on the eager path)
# A trained lm_head adds its whole weight gradient into an fp32 sum once per chunk: fewer, larger chunks. 2^29
# logits (1 GiB of bf16 logits and as much gradient at once) against 2^28: 45.4% vs 44.6% MFU, +1.5 GiB, on
# Qwen2.5-1.5B full fine-tuning at 16k tokens a step (BENCHMARKS.md). `loss_chunk_size` caps the rows.
MAX_CHUNK_LOGITS_TRAINED_HEAD = 2**29


LOSS_CHUNK_SIZE = TrainConfig.loss_chunk_size
"""The `loss_chunk_size` setting's default: the chunk of a loss called without a plan (a batch by hand, tests)."""


def loss_chunk_rows(chunk_size: int, vocab_size: int, head_trained: bool = False) -> int:
    """Rows projected to logits at a time: `chunk_size`, fewer for large vocabularies."""
    budget = MAX_CHUNK_LOGITS_TRAINED_HEAD if head_trained else MAX_CHUNK_LOGITS
    return max(1, min(chunk_size, budget // vocab_size))


def capped_logsumexp(logits: torch.Tensor, softcap: float | None):
    """(fp32 logits after the model's tanh soft cap, the tanh (None without a cap: the gradient's chain factor is
    1 - tanh^2), logsumexp of each row [rows, 1])."""
    z = logits.float()
    capped = None
    if softcap:
        capped = torch.tanh(z / softcap)
        z = capped * softcap
    return z, capped, torch.logsumexp(z, dim=-1, keepdim=True)


def cross_entropy_and_grad(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    """(summed cross-entropy in fp32, d loss / d logits in the logits' dtype) for rows whose targets all count."""
    z, capped, lse = capped_logsumexp(logits, softcap)
    loss = (lse.squeeze(-1) - z.gather(-1, targets[:, None]).squeeze(-1)).sum()
    if torch.compiler.is_compiling():
        # One elementwise kernel from the bf16 logits to the bf16 gradient: the one-hot as a comparison, so no
        # fp32 copy of the chunk is written (a scatter would need one).
        one_hot = torch.arange(z.shape[-1], device=z.device) == targets[:, None]
        grad = torch.exp(z - lse) - one_hot.float()
    else:  # eager: softmax in place in z's memory when z is a copy, then subtract 1 at each target
        grad = z.sub_(lse).exp_() if z is not logits else (z - lse).exp_()
        grad.scatter_add_(-1, targets[:, None], grad.new_full((targets.shape[0], 1), -1.0))
    if softcap:
        grad = grad * (1 - capped * capped)
    return loss, grad.to(logits.dtype)


@functools.cache
def _compiled_cross_entropy_and_grad():
    return torch.compile(cross_entropy_and_grad)


def compiled_cross_entropy_and_grad(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    """cross_entropy_and_grad compiled once: dynamic in its rows from the start (the last chunk is shorter), the
    vocabulary a constant. With every size dynamic (`dynamic=True`), the softmax gradient's kernel takes 170 us for a
    chunk's 64 MiB of bf16 logits (0.8 TB/s), with the vocabulary known 100 us (BENCHMARKS.md, "four small costs out
    of every step")."""
    torch._dynamo.maybe_mark_dynamic(logits, 0)
    torch._dynamo.maybe_mark_dynamic(targets, 0)
    return _compiled_cross_entropy_and_grad()(logits, targets, softcap)


@functools.cache
def fp32_epilogue_supported(dtype: torch.dtype) -> bool:
    """Whether this torch's CUDA addmm adds a product of two `dtype` matrices into an fp32 sum itself (`out_dtype=`)."""
    x = torch.zeros(2, 2, dtype=dtype, device="cuda")
    acc = torch.zeros(2, 2, dtype=torch.float32, device="cuda")
    try:
        torch.addmm(acc, x.t(), x, out_dtype=torch.float32, out=acc)  # transposed, as the loss calls it
    except (RuntimeError, TypeError):  # a torch without addmm's out_dtype for these dtypes
        return False
    return True


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc fp32 and a, b 16-bit: on CUDA the sum happens in the matmul's fp32 epilogue (no 16-bit
    product written and read back, no rounding of it), elsewhere the 16-bit product is added in."""
    if acc.is_cuda and a.dtype != acc.dtype and fp32_epilogue_supported(a.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        return
    acc.add_(a @ b)


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)), in chunks of rows, gradients taken in forward."""

    @staticmethod
    def forward(ctx, hidden, targets, weight, bias, softcap, chunk_rows, compiled):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        want_h, want_w = hidden.requires_grad, weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        ce = compiled_cross_entropy_and_grad if compiled else cross_entropy_and_grad
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start:start + chunk_rows].to(dtype)
                chunk_loss, grad = ce(F.linear(h, w, b), targets[start:start + chunk_rows], softcap)
                loss += chunk_loss
                if want_h:
                    grad_h[start:start + chunk_rows] = grad @ w
                if want_w:
                    add_product(grad_w, grad.t(), h)
                if want_b:
                    grad_b += grad.float().sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # handed over once; freed with the graph
        out = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return out[0], None, out[1], out[2], None, None, None


def causal_lm_loss(model, batch: dict, *, chunk_size: int = LOSS_CHUNK_SIZE, chunked: bool = True,
                   compiled: bool = False):
    """Sum of token losses and the number of trained tokens for one batch (see docs/DESIGN.md, Loss).

    chunked: the chunked loss (False: full logits); compiled: its softmax gradient compiled, on a GPU. A batch with
    `inputs_embeds` (a LLaVA model's, image features in place: `tunelab.model.llava.llava_objective`) runs the
    decoder on those instead of looking `input_ids` up."""
    if "loss_index" in batch:
        index, targets = batch["loss_index"], batch["loss_targets"]
    else:  # a batch built by hand: find the trained positions here (a GPU sync on GPU labels)
        index, targets = loss_targets(batch["labels"])
    n_tokens = index.shape[0]
    inputs = {"inputs_embeds": batch["inputs_embeds"]} if "inputs_embeds" in batch else \
        {"input_ids": batch["input_ids"]}
    if not chunked:
        logits = model(**inputs, position_ids=batch["position_ids"]).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1)[index], targets, reduction="sum")
        return loss, n_tokens

    decoder, lm_head, softcap = split_model(model)
    # decoder_kwargs: a shard of each row under sequence parallelism (model/sequence_parallel.py) brings the whole
    # rows' sample boundaries and the group, for attention
    hidden = decoder(**inputs, position_ids=batch["position_ids"], **batch.get("decoder_kwargs", {})).last_hidden_state
    hidden = hidden.flatten(0, 1).index_select(0, index)
    weight, bias = lm_head.weight, lm_head.bias
    rows = loss_chunk_rows(chunk_size, weight.shape[0], head_trained=weight.requires_grad)
    compiled = compiled and hidden.is_cuda
    if torch.is_grad_enabled():
        return LinearCrossEntropy.apply(hidden, targets, weight, bias, softcap, rows, compiled), n_tokens
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        logits = F.linear(hidden[start:start + rows], weight, bias).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total = total + F.cross_entropy(logits, targets[start:start + rows], reduction="sum")
    return total, n_tokens


class CausalLMObjective:
    """The supervised loss as the loop calls every objective (tunelab.model.preference has the others):

    objective(model, batch) -> (loss_sum, units)  # units: what the step's loss is averaged over, here trained tokens
    objective.units(batch)                        # the same count, read from the batch on the CPU before the step
    objective.take_metrics()                      # {name: (sum, count)} logged next to the loss: none here
    objective.copy()                              # one with its own metric sums (evaluation): this one
    """

    def __init__(self, *, chunk_size: int, chunked: bool = True, compiled: bool = False):
        self.options = {"chunk_size": chunk_size, "chunked": chunked, "compiled": compiled}

    def __call__(self, model, batch: dict):
        return causal_lm_loss(model, batch, **self.options)

    def units(self, batch: dict) -> int:
        return batch["loss_index"].numel()

    def take_metrics(self) -> dict:
        return {}

    def copy(self) -> "CausalLMObjective":
        return self


def causal_lm_objective(plan) -> CausalLMObjective:
    """The loss the training loop minimises, as `plan` (a `tunelab.model.plan.FastPathPlan`) runs it:
    objective(model, batch) -> (loss_sum, n_trained_tokens)."""
    return CausalLMObjective(chunk_size=plan.loss_chunk_size, chunked=plan.chunked_loss, compiled=plan.compiled_loss)
