"""Attention over packed rows with no padding and no cross-talk between samples.

A packed row holds several samples; their boundaries travel as `position_ids` restarting at 0 (docs/DESIGN.md).
Without help, transformers turns those into a [B, 1, T, T] block-diagonal mask and runs sdpa with it, which rules
out the flash kernel and costs O(T^2) memory. Here the row is flattened to one long sequence of tokens and the
boundaries to `cu_seqlens` (cumulative sample lengths), the form the flash "varlen" kernels take
(`torch.nn.attention.varlen.varlen_attn`, flash-attn's `flash_attn_varlen_func`).

`cu_seqlens` is derived once per forward, in a pre-hook on the decoder, and reaches every layer's attention as the
`cu_seq_lens_q` / `max_length_q` keyword arguments that transformers forwards to attention functions. The function is
registered under ATTN_NAME with `transformers.AttentionInterface`; without the boundaries (generation, a batch
that is not packed) it falls back to sdpa.

Rows that are each one whole sample (long-context training, no packing) need no varlen kernel: plain causal attention
does, and on a GPU it runs cuDNN's kernel, 1.7-2.3x faster than flash on an H100 at 8k-128k tokens with the same
error against an fp32 reference (benchmarks/bench_attention.py).

Under sequence parallelism (`tunelab.model.sequence_parallel`) each rank holds a shard of every row; the objective
passes the whole rows' boundaries and the group with the call, and the attention function exchanges heads for tokens
around the same kernels, so flash, cuDNN and the CPU's sdpa all attend over whole rows.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from tunelab.model.sequence_parallel import attend_over_whole_rows

ATTN_NAME = "tunelab_varlen"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [n_samples + 1], longest sample) of the flattened [B, T] rows.

    A sample starts where its position is 0, and every row starts a sample (a row cut mid-sample still may not
    attend across rows).
    """
    flat = position_ids.reshape(-1)
    b, t = position_ids.shape
    starts = flat == 0
    starts = starts.view(b, t).clone()
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    cu = torch.cat([idx, idx.new_tensor([flat.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return cu, max_len


def _varlen_kernel():
    """(function, its keyword names) of the varlen flash kernel available here, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn, set(inspect.signature(varlen_attn).parameters)
    except Exception:
        return None


_KERNEL = _varlen_kernel()


def _varlen_flash(q, k, v, cu, max_len, scale):
    """q [N, Hq, D], k/v [N, Hkv, D] → [N, Hq, D], causal within each sample (CUDA, fp16/bf16)."""
    fn, names = _KERNEL
    kwargs = {"scale": scale}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if "window_size" in names:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


@torch.compiler.disable  # a loop over the boundaries' values: compiled, it would recompile for every new batch
def _segmented_sdpa(q, k, v, cu, scale):
    """The same computation with plain sdpa, one sample at a time (CPU, fp32, or no varlen kernel)."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if s == e:  # an empty sample (static-shape padding of cu_seqlens)
            continue
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, dim=0), vs.repeat_interleave(rep, dim=0)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, T, D], key/value [B, Hkv, T, D] → ([B, T, Hq, D], None).

    With `sequence_parallel_group` among the keyword arguments, T is this rank's shard of each row and the
    boundaries are the whole rows': the heads are exchanged so that attention runs over whole rows
    (`tunelab.model.sequence_parallel`)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        return _sdpa_fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    max_len = kwargs.get("max_length_q")
    group = kwargs.get("sequence_parallel_group")
    if group is not None:
        return attend_over_whole_rows(packed_attention, query, key, value, group, cu=cu, max_len=max_len,
                                      scale=scaling), None
    return packed_attention(query, key, value, cu=cu, max_len=max_len, scale=scaling), None


def packed_attention(query, key, value, *, cu, max_len, scale):
    """Causal attention within each sample of packed rows: query [B, Hq, T, D], key/value [B, Hkv, T, D], the
    samples' boundaries `cu` over the flattened rows → [B, T, Hq, D]."""
    b, hq, t, d = query.shape
    max_len = max_len or t
    if max_len == t and cu.numel() == b + 1:  # every row one whole sample
        return _whole_rows(query, key, value, scale)
    dtype = attention_dtype(query)
    q = query.transpose(1, 2).reshape(b * t, hq, d).to(dtype)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d).to(dtype)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d).to(dtype)
    fast = _KERNEL is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    out = _varlen_flash(q, k, v, cu, max_len, scale) if fast else _segmented_sdpa(q, k, v, cu, scale)
    return out.view(b, t, hq, d)


def attention_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's, as it would cast sdpa's inputs, else the query's own.

    With fp32 master weights (full fine-tuning) the projections come out of autocast in bf16, but RoPE's fp32 tables
    promote q and k back to fp32; sdpa would be autocast to bf16 again, a custom kernel is not."""
    device = query.device.type
    if query.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


def _whole_rows(query, key, value, scale):
    """Causal attention of [B, H, T, D] rows, each one sample, with sdpa: cuDNN's kernel, else flash's (the CPU's
    flash kernel on a CPU) → [B, T, Hq, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Contiguous as [B, H, T, D]: compiled, inductor hands cuDNN's kernel a contiguous query whatever layout was
    # traced, and the kernel's output follows the query's layout, while torch 2.11's shape function follows the
    # traced one. Compiled code that keeps the output for backward (`save_attention`) checks its strides against
    # the latter; contiguous, both agree (and RoPE's kernel writes the query so: no extra copy).
    query = query.contiguous()
    # In order of preference; older GPUs without cuDNN's or flash's kernel still get an answer.
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                             enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


def _sdpa_fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """sdpa for what is not a packed training batch: generation (with a KV cache, maybe left padding)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 2:
        # Our mask function hands over the 2D padding mask; make it [B, 1, Tq, Tk] causal + padding.
        tq, tk = query.shape[2], key.shape[2]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(diagonal=tk - tq)
        attention_mask = attention_mask.bool()[:, None, None, :] & causal
    for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "sequence_parallel_group"):
        kwargs.pop(name, None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _varlen_mask(*args, **kwargs):
    # Like flash attention: no 4D mask at all (None when there is no padding, else the 2D padding mask).
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"](*args, **kwargs)


def register_varlen_attention() -> str:
    """Register the attention and mask functions with transformers; returns the implementation's name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _varlen_mask)
    return ATTN_NAME


def _static_boundaries(cu: torch.Tensor, max_len: int, b: int, t: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens padded with empty samples to a power of two (at least 16), and the row width as the longest sample.

    CUDA graphs record one graph per input shape, and torch.compile specialises on the longest sample's length, so
    packed rows whose sample count changes every step would record a graph every step; padded, the boundaries come
    in a few fixed shapes.
    An empty sample (two equal offsets at the end) has no queries: the flash kernel skips it. The longest-sample
    length only sizes the kernel's grid, so the width (an upper bound) gives the same result. Rows that are each
    one sample keep their exact boundaries (they take the cuDNN kernel, whose shapes are fixed already).
    """
    n = cu.numel()
    if n == b + 1 and max_len == t:
        return cu, max_len
    size = max(16, 1 << (n - 1).bit_length())
    return torch.cat([cu, cu[-1:].expand(size - n)]), t


def _add_cu_seqlens(module, args, kwargs, *, static_shapes: bool = False):
    """Decoder forward pre-hook: derive the sample boundaries once per forward, for every layer (padded to a few
    fixed shapes for CUDA graphs)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or kwargs.get("cu_seq_lens_q") is not None:
        return None
    if kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None:
        return None  # padding or generation: the sdpa fallback handles it
    cu, max_len = cu_seqlens_from_position_ids(position_ids)
    if static_shapes:
        cu, max_len = _static_boundaries(cu, max_len, *position_ids.shape)
    kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    return args, kwargs


def enable_varlen_attention(model, *, static_shapes: bool = False) -> None:
    """Switch `model` (plain or peft-wrapped) to varlen attention over packed rows; `static_shapes` pads the sample
    boundaries to a few fixed shapes (for CUDA graphs). Called again, it replaces its hook."""
    from tunelab.model.parts import base_model, split_model

    register_varlen_attention()
    decoder, _, _ = split_model(model)
    base = base_model(model)
    if getattr(base, base.base_model_prefix, None) is not decoder:
        base = decoder  # a language model behind a vision tower (LLaVA): its attention only, not the tower's
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(ATTN_NAME)
    else:
        base.config._attn_implementation = ATTN_NAME
    previous = getattr(decoder, "_tunelab_varlen_hook", None)
    if previous is not None:
        previous.remove()
    hook = functools.partial(_add_cu_seqlens, static_shapes=static_shapes)
    decoder._tunelab_varlen_hook = decoder.register_forward_pre_hook(hook, with_kwargs=True)
