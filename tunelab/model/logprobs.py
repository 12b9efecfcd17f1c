"""Log-probabilities of the trained tokens, summed per sequence, without full-vocabulary logits in memory.

Preference objectives (DPO, ORPO, SimPO, KTO) compare whole replies: they need log p(reply | prompt) for every
sequence of a batch, the sum of the log-probabilities of its trained tokens. Like the supervised loss
(`tunelab.model.loss`), this runs the decoder once for hidden states, keeps only the positions whose next token is
trained, and projects those through `lm_head` a chunk of rows at a time, so one chunk's logits are alive at once.

The gradient differs from the supervised loss's. There, d loss / d logits (softmax - one-hot) is known in the forward
pass, so both gradients are taken there and scaled in backward. Here the loss is a function of per-sequence sums
that is only known after every sequence of the batch (chosen *and* rejected, and the reference) has been scored, so
the upstream gradient arrives per token in backward. `LinearTokenLogProbs` splits the work by what is known when:

* d logp_t / d hidden_t = (one-hot - softmax)_t @ W depends on token t alone, so it is computed in the forward pass
  (one matmul per chunk, as the supervised loss does) and backward only scales row t by its upstream gradient g_t.
  With a frozen lm_head (LoRA, QLoRA) that is the whole gradient: two lm_head matmuls a step, no recompute.
* d L / d W = sum_t g_t (one-hot - softmax)_t^T hidden_t needs every g_t inside the sum, so when lm_head is trained
  (full fine-tuning) backward recomputes each chunk's logits and adds its share, still one chunk at a time.

The alternative, a per-sequence upstream weight fed in by a second chunked pass after the loss is known, would run
the decoder's output through lm_head twice in forward for every objective; this way only a trained lm_head pays.

Which sequence each trained position belongs to comes from the batch (`loss_sequence`, listed by
`tunelab.data.collate` on the CPU from the rows' `position_ids`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tunelab.model.loss import LOSS_CHUNK_SIZE, add_product, capped_logsumexp, loss_chunk_rows
from tunelab.model.parts import split_model


def logprob_and_grad(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None, want_grad: bool):
    """(log p(target) per row in fp32, d logp / d logits in the logits' dtype or None)."""
    z, capped, lse = capped_logsumexp(logits, softcap)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse.squeeze(-1)
    if not want_grad:
        return logp, None
    one_hot = torch.arange(z.shape[-1], device=z.device) == targets[:, None]
    grad = one_hot.float() - torch.exp(z - lse)
    if softcap:
        grad = grad * (1 - capped * capped)
    return logp, grad.to(logits.dtype)


@functools.cache
def compiled_logprob_and_grad():
    """logprob_and_grad compiled once (one kernel from the bf16 logits to the bf16 gradient), dynamic in rows."""
    return torch.compile(logprob_and_grad, dynamic=True)


class LinearTokenLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[targets] per row, in chunks of rows (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, targets, weight, bias, softcap, chunk_rows, compiled):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        want_h = hidden.requires_grad
        want_w = weight.requires_grad or (bias is not None and bias.requires_grad)
        score = compiled_logprob_and_grad() if compiled else logprob_and_grad
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            jacobian = torch.empty_like(hidden) if want_h else None
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start:start + chunk_rows].to(dtype)
                chunk_logp, grad = score(F.linear(h, w, b), targets[start:start + chunk_rows], softcap, want_h)
                logp[start:start + chunk_rows] = chunk_logp
                if want_h:
                    jacobian[start:start + chunk_rows] = grad @ w
        ctx.jacobian = jacobian
        ctx.settings = (softcap, chunk_rows, dtype, want_w)
        if want_w:  # the weight's gradient is recomputed in backward, chunk by chunk
            ctx.save_for_backward(hidden, targets, weight, bias)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        softcap, chunk_rows, dtype, want_w = ctx.settings
        jacobian, ctx.jacobian = ctx.jacobian, None
        grad_h = None if jacobian is None else (jacobian * grad_logp[:, None]).to(jacobian.dtype)
        grad_w = grad_b = None
        if want_w:
            hidden, targets, weight, bias = ctx.saved_tensors
            with torch.autocast(hidden.device.type, enabled=False):
                w = weight.to(dtype)
                b = None if bias is None else bias.to(dtype)
                acc_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                acc_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                for start in range(0, hidden.shape[0], chunk_rows):
                    h = hidden[start:start + chunk_rows].to(dtype)
                    _, grad = logprob_and_grad(F.linear(h, w, b), targets[start:start + chunk_rows], softcap, True)
                    grad = grad * grad_logp[start:start + chunk_rows, None].to(grad.dtype)
                    add_product(acc_w, grad.t(), h)
                    if acc_b is not None:
                        acc_b += grad.float().sum(0)
            grad_w = acc_w.to(weight.dtype) if weight.requires_grad else None
            grad_b = acc_b.to(bias.dtype) if acc_b is not None and bias.requires_grad else None
        return grad_h, None, grad_w, grad_b, None, None, None


def token_logprobs(model, batch: dict, *, chunk_size: int = LOSS_CHUNK_SIZE, chunked: bool = True,
                   compiled: bool = False) -> torch.Tensor:
    """log p of each trained token of the batch (in `loss_index` order), fp32, differentiable when grad is on."""
    index, targets = batch["loss_index"], batch["loss_targets"]
    if not chunked:  # the plain path: full logits (what `fast_path = False` runs, and what the tests compare with)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        logits = logits.flatten(0, 1).index_select(0, index).float()
        return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    decoder, lm_head, softcap = split_model(model)
    # no KV cache: with one, transformers would not read the sequence boundaries from position_ids
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
                     ).last_hidden_state
    hidden = hidden.flatten(0, 1).index_select(0, index)
    weight, bias = lm_head.weight, lm_head.bias
    rows = loss_chunk_rows(chunk_size, weight.shape[0], head_trained=weight.requires_grad)
    compiled = compiled and hidden.is_cuda
    if torch.is_grad_enabled():
        return LinearTokenLogProbs.apply(hidden, targets, weight, bias, softcap, rows, compiled)
    # Scoring without gradient (DPO's reference pass, evaluation): the same kernel as the policy's pass, so both
    # round alike, and compiled it reads the bf16 logits once instead of writing an fp32 copy (twice a chunk's
    # logits, at the moment that sets DPO's peak memory).
    score = compiled_logprob_and_grad() if compiled else logprob_and_grad
    logp = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        logits = F.linear(hidden[start:start + rows], weight, bias)
        logp[start:start + rows] = score(logits, targets[start:start + rows], softcap, False)[0]
    return logp


def sequence_logprobs(model, batch: dict, **kwargs) -> torch.Tensor:
    """Sum of the trained tokens' log-probabilities of each sequence of the batch: fp32 [num_sequences]."""
    per_token = token_logprobs(model, batch, **kwargs)
    sums = per_token.new_zeros(batch["sequence_kind"].shape[0])
    return sums.index_add(0, batch["loss_sequence"], per_token)
