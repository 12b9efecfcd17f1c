"""How each decoder layer runs in training: checkpointed (its input optionally in CPU memory), compiled, and with
the MLP in slices of the sequence for long context.

transformers checkpoints a layer in `GradientCheckpointingLayer`, around `__call__` in 5.17 and around `forward` in
later releases, so `torch.compile` of the layer ends up inside the checkpoint on one version and outside on the
other. `run_decoder_layers(layers, plan)` takes that over, the same on every version:

* compiled and checkpointed, the layer's forward becomes compiled(checkpoint(forward)). Dynamo traces the checkpoint
  and AOTAutograd puts the recomputation into the layer's compiled backward graph: fewer launches (Llama-7B QLoRA
  2k: 1.72x -> 2.52x the plain loop), and CUDA graphs can replay forward and backward (3.09x);
* with MLP slices, which need eager code inside the layer, and for offloaded rows past 32k tokens (the plan's
  `checkpoint_around`), it is checkpoint(compiled forward); that is also the fallback when compiling the first
  arrangement fails (`_Fallback`). Offloading the input needs eager code only around the layer (saved-tensor hooks
  that see what the compiled function saves), so it works with either.

Passes without gradient that score whole rows (the reference pass of DPO / KTO, evaluation loss) run the layer's
forward compiled as well, without CUDA graphs: the same fused kernels, so the same bf16 rounding, as the training
pass. Eager, the reference differed from the policy by several nats a sequence on Llama-7B, and DPO's first loss
read 0.634 instead of ln 2. Generation (a KV cache, a new shape every token) runs the plain forward.

Long context: with checkpointing a decoder keeps one tensor per layer for backward, the layer's input hidden state
(hidden_size x 2 bytes a token: 8 KiB for a 4096-wide model, so 32 layers x 100k tokens = 26 GB); everything else
is recomputed one layer at a time in backward. Two things still grow with the sequence:

* the checkpoints themselves: `LayerInputOffload` (tunelab.model.offload) copies a layer's input to CPU memory as
  the forward passes it and back as backward reaches the layer, on a copy stream beside the compute. Only what
  grows with the row moves; tensors every layer shares (RoPE cos/sin) and the weights stay on the GPU. With the
  inputs offloaded and the checkpoint inside the compiled layer, the checkpoint also keeps attention's output and
  softmax statistics (`_keep_attention_outputs`, the plan's `save_attention`), so backward runs attention's
  backward without running its forward again, whose cost grows with the row's length (Llama-3.1-8B QLoRA: +3% at
  8k, +16% at 32k), and where the host's memory allows, the q, k, v and o projections' outputs
  (`_keep_attention_block`, the plan's `save_projections`), so backward does not compute those matmuls again
  either (+5% at 8k, +3% at 32k); what it keeps waits in CPU memory beside the input.
* the working set of the one layer being recomputed, largest in the MLP: gate, up, act(gate) and their product are
  four intermediate-size tensors a token (4 x 14336 x 2 bytes = 112 KiB for Llama-3.1-8B, more than the rest of the
  layer together). `_mlp_in_slices` runs the MLP `mlp_chunk_size` tokens at a time, each slice checkpointed, so one
  slice's intermediates exist at a time. The MLP is position-wise: slicing changes only the order of the sums in
  the adapters' gradients. It costs one more MLP forward a step, so it is used only when the configured
  row exceeds the slice (by default 32k with offloaded layer inputs, whose freed memory pays for the whole MLP's
  intermediates, else 8k: BENCHMARKS.md, "long rows offloaded by default").

tests/test_layers.py checks loss and gradients of every combination against the plain path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types

import torch
from torch.utils.checkpoint import checkpoint

from tunelab.model.offload import LayerInputOffload, plain_checkpoint

log = logging.getLogger(__name__)


def _mlp_in_slices(mlp, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    forward = type(mlp).forward
    if x.shape[:-1].numel() <= chunk_size:
        return forward(mlp, x)
    flat = x.reshape(-1, x.shape[-1])
    slices = []
    for start in range(0, flat.shape[0], chunk_size):
        piece = flat[start:start + chunk_size]
        slices.append(checkpoint(forward, mlp, piece, use_reentrant=False) if torch.is_grad_enabled()
                      else forward(mlp, piece))
    return torch.cat(slices).view(*x.shape[:-1], -1)


@functools.cache
def _attention_ops() -> frozenset:
    """The attention kernels' ops as autograd sees them in a layer (those this torch has): cuDNN's, flash's and the
    memory-efficient one behind sdpa on a GPU, flash's on the CPU, and the varlen kernel of packed rows."""
    names = [("aten", "_scaled_dot_product_cudnn_attention"), ("aten", "_scaled_dot_product_flash_attention"),
             ("aten", "_scaled_dot_product_efficient_attention"),
             ("aten", "_scaled_dot_product_flash_attention_for_cpu"), ("torch_attn", "_varlen_attn")]
    ops = set()
    for namespace, name in names:
        try:
            ops.add(getattr(getattr(torch.ops, namespace), name).default)
        except AttributeError:  # not in this torch
            pass
    return frozenset(ops)


def _recompute_all_but(keep):
    """Selective checkpointing's contexts that keep for backward the outputs of the ops `keep(op, args)` names and
    recompute every other op (the plain checkpoint's choice, taken op by op as they are traced)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(
        lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_SAVE if keep(op, args)
        else CheckpointPolicy.PREFER_RECOMPUTE)


def _recompute_every_op():
    """checkpoint's context_fn that recomputes every op: the plain checkpoint, tagged op by op (see
    FastPathPlan.checkpoint_tags_each_op)."""
    return _recompute_all_but(lambda op, args: False)


def _keep_attention_outputs():
    """checkpoint's context_fn that keeps what the attention kernel returns (its output and softmax statistics, what
    its backward reads) and recomputes every other op (FastPathPlan.save_attention)."""
    attention = _attention_ops()
    return _recompute_all_but(lambda op, args: op in attention)


def _projection_into_or_out_of_attention(op, args) -> bool:
    """A matmul whose output is at most as wide as its input and at least an eighth of it: the q, k, v and o
    projections (grouped KV heads are down to an eighth of the width), and down_proj, whose output backward does not
    read, so nothing keeps it. Not the MLP's gate and up (wider: the largest activations of a layer), a fused qkv
    projection (wider too: Phi-3 keeps only o), nor a LoRA A (rank r: cheap to recompute, too small to be
    worth parking)."""
    if op is torch.ops.aten.mm.default:
        width_in, width_out = args[0].shape[-1], args[1].shape[-1]
    elif op is torch.ops.aten.addmm.default:
        width_in, width_out = args[1].shape[-1], args[2].shape[-1]
    else:
        return False
    return width_in >= width_out and 8 * width_out >= width_in


def _keep_attention_block():
    """checkpoint's context_fn that keeps what the attention block's expensive ops return: the attention kernel's
    output and softmax statistics, and the q, k, v and o projections' outputs. Backward then runs attention's
    backward without its forward again (whose cost grows with the row) and recomputes only the norms, RoPE and the
    MLP's gate and up projections, whose outputs are too large to keep (FastPathPlan.save_projections)."""
    attention = _attention_ops()
    return _recompute_all_but(lambda op, args: op in attention or _projection_into_or_out_of_attention(op, args))


def _checkpointed(cls_forward, context_fn=None):
    """cls_forward under a non-reentrant checkpoint, as one function that torch.compile traces whole; `context_fn`
    makes it selective (a module-level function: dynamo traces no other kind)."""
    options = {"context_fn": context_fn} if context_fn else {}

    def forward(layer, *args, **kwargs):
        return checkpoint(cls_forward, layer, *args, use_reentrant=False, **options, **kwargs)

    return forward


@dataclasses.dataclass
class _Fallback:
    """The checkpoint around the compiled forward, for when compiling it inside fails (shared by a layer class).

    torch 2.11's inductor fails ("Node ... was invalid, but is output") on the checkpoint inside compiled code when
    torch's dropout meets shapes that change between steps (packed rows): dynamo recompiles with dynamic shapes and
    inductor raises before anything runs. The fast path's hashed LoRA dropout (`tunelab.model.dropout`) compiles
    there (tests/test_layers.py; checked with torch 2.11's inductor on the CPU), so this is a safety net. The layer
    then runs with the checkpoint around its compiled forward, which compiles fine, and every later call of that
    class goes there directly.
    """

    compiled_forward: object
    checkpoint: object  # plain_checkpoint, or LayerInputOffload.checkpoint with offloaded inputs
    active: bool = False


def _generating(kwargs) -> bool:
    """Whether a layer call carries a KV cache (named `cache` after transformers 5.17, `past_key_values` before)."""
    return bool(kwargs.get("use_cache")) or any(kwargs.get(name) is not None
                                                for name in ("cache", "past_key_values", "past_key_value"))


def _training_forward(layer, *args, inner, checkpoint_fn, fallback: _Fallback | None = None, scoring=None, **kwargs):
    if scoring is not None and not torch.is_grad_enabled() and not _generating(kwargs):
        return scoring(layer, *args, **kwargs)
    if not (layer.training and torch.is_grad_enabled()):
        # With layer.gradient_checkpointing False, transformers' own forward: no checkpoint, not compiled.
        return type(layer).forward(layer, *args, **kwargs)
    if fallback is not None and fallback.active and args:
        return _around_compiled(fallback, layer, args, kwargs)
    try:
        if checkpoint_fn is None or not args:
            return inner(layer, *args, **kwargs)
        return checkpoint_fn(functools.partial(inner, layer, **kwargs), *args)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        if fallback is None or not args:
            raise
        fallback.active = True
        log.warning("compiling %s with its checkpoint inside failed (%s); running it with the checkpoint around the "
                    "compiled forward instead (slower; CUDA graphs off for it).", type(layer).__name__,
                    str(error).splitlines()[-1][:120])
        return _around_compiled(fallback, layer, args, kwargs)


def _around_compiled(fallback: _Fallback, layer, args, kwargs):
    """The fallback: the checkpoint around the compiled forward."""
    return fallback.checkpoint(functools.partial(fallback.compiled_forward, layer, **kwargs), *args)


def run_decoder_layers(layers, plan) -> dict:
    """Set how each decoder layer runs in training, as `plan` (a `tunelab.model.plan.FastPathPlan`) says (see the
    module docstring); returns a report for the log."""
    report, compiled, plain, fallbacks = {}, {}, {}, {}
    n_mlp = n_inside = n_graphed = 0
    inside = plan.checkpoint_inside_compile
    context_fn = (_keep_attention_block if plan.keeps_projections  # these tag each op as traced, too
                  else _keep_attention_outputs if plan.keeps_attention
                  else _recompute_every_op if plan.checkpoint_tags_each_op else None)
    if plan.compile and inside:
        # transformers 5.25 (with `kernels`, which it installs) wraps attention's forward in code that sets and
        # resets a context variable every call. Dynamo refuses a side effect inside a compiled checkpoint unless told
        # that the recompute need not replay it: this one is undone before the call returns, and tunelab's layer
        # code has none of its own (tests/test_layers.py compiles the layers on whichever transformers is installed).
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    checkpoint_fn = offload = None
    if plan.checkpointing:
        offload = LayerInputOffload() if plan.offload_activations else None
        checkpoint_fn = offload.checkpoint if offload else plain_checkpoint
    for layer in layers:
        cls_forward = type(layer).forward
        inner, layer_checkpoint, fallback, scoring = cls_forward, checkpoint_fn, None, None
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = False  # transformers' own checkpoint off: ours wraps the compiled code
        if plan.compile:
            # One compiled function per layer class: the layers share the compiled code (a 7B layer compiles in
            # ~12 s once). The layer's own forward compiled without CUDA graphs (`plain`) serves the passes without
            # gradient (module docstring), the fallback, and training with the checkpoint around it.
            if cls_forward not in plain:
                plain[cls_forward] = torch.compile(cls_forward)
            scoring = plain[cls_forward]
            target = _checkpointed(cls_forward, context_fn) if inside else cls_forward
            key = (cls_forward, inside)
            if key not in compiled:
                # Without graphs dynamic=None: static shapes first, dynamic after a shape changes. With graphs the
                # shapes come from a small fixed set (the loop pads rows to max_length, attention pads the sample
                # boundaries), so dynamic=False compiles each once, away from the dynamic-shape case torch 2.11's
                # partitioner fails on (see _Fallback).
                compiled[key] = (torch.compile(target, mode="reduce-overhead", dynamic=False) if plan.cuda_graphs
                                 else scoring if target is cls_forward else torch.compile(target))
            n_graphed += plan.cuda_graphs
            inner = compiled[key]
            if inside:
                # The checkpoint is compiled in; what stays eager is parking the input the compiled code saves.
                layer_checkpoint = offload.call if offload else None
                n_inside += 1
                if cls_forward not in fallbacks:
                    fallbacks[cls_forward] = _Fallback(scoring, checkpoint_fn)
                fallback = fallbacks[cls_forward]
        layer.forward = types.MethodType(
            functools.partial(_training_forward, inner=inner, checkpoint_fn=layer_checkpoint, fallback=fallback,
                              scoring=scoring),
            layer)
        mlp = getattr(layer, "mlp", None)
        if plan.mlp_slice and isinstance(mlp, torch.nn.Module):
            # Outside torch.compile: dynamo would trace the slices into one graph and keep them all alive.
            sliced = torch.compiler.disable(functools.partial(_mlp_in_slices, chunk_size=plan.mlp_slice))
            mlp.forward = types.MethodType(sliced, mlp)
            n_mlp += 1
    n_ckpt = len(layers) if plan.checkpointing else 0
    report["checkpointing"] = (f"{n_ckpt} layers"
                               + (", inputs offloaded to CPU memory" if plan.offload_activations and n_ckpt else ""))
    inside_note = f", {n_inside} with the checkpoint inside" if n_inside else ""
    kept = {_keep_attention_block: " (attention's inputs and outputs kept)",
            _keep_attention_outputs: " (attention's outputs kept)"}
    inside_note += kept.get(context_fn, "") if n_inside else ""
    report["compile"] = (f"{len(layers)} decoder layers" + inside_note
                         + (f", {n_graphed} as CUDA graphs" if n_graphed else "")) if plan.compile else "off"
    report["mlp_slices"] = f"{n_mlp} layers, {plan.mlp_slice} tokens a slice" if n_mlp else "off"
    return report
