"""How much GPU memory a training config needs, before any GPU is touched (`tunelab plan`).

The estimate adds up the parts a training step holds at its peak (the second step, once the optimizer states
exist): frozen weights, trainable parameters with their gradients and AdamW states, the activations kept for
backward (all of them, or one tensor per layer with gradient checkpointing plus one layer's worth being
recomputed), and the logits of the loss. It targets `torch.cuda.max_memory_allocated()` of the run as its fast-path
plan (`tunelab.model.plan`) runs it on a GPU; `fits` adds the CUDA context and allocator slack on top.

Several processes: sequence parallelism (`sequence_parallel_size = N`) gives each GPU 1/N of every row's tokens, so
every per-token term is for max_length / N tokens, plus the all-to-all's buffers; the engine's sharding (ZeRO-1/2/3,
FSDP2) divides optimizer states, gradients and weights over the processes. Both are arithmetic that no measured
peak checks: the peaks in tests/test_memory.py are all of one GPU.

What is decided from the estimate (the plan fitted to a card, the fewest GPUs a row must be split over,
`tunelab plan`'s report) is in `tunelab.model.fit`.

The per-token activation constants are "bytes per token per layer" in units of the hidden and intermediate sizes,
fitted to peaks measured on an H100 (BENCHMARKS.md): `ACT_PER_TOKEN` to the first uncompiled peaks (Llama-7B LoRA and
QLoRA at 2k), `COMPILED_ACT_FACTOR` to the compiled peaks with the checkpoint around and inside the compiled layer.
tests/test_memory.py lists those fitted peaks apart and checks the estimate against later peaks held out of the fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tunelab.model.fast import merges_into_the_weight
from tunelab.model.freeze import lm_head_trains, partial, trained_part
from tunelab.model.lora_params import dora_bytes, lora_params
from tunelab.model.offload import PINNED_MAX_BYTES
from tunelab.model.plan import LONG_CONTEXT_TOKENS, optimizer_in_backward_blockers
from tunelab.model.shapes import ModelShape, model_shape, vision_shape

GIB = 2**30

# Activation bytes kept per token per decoder layer, as (bytes per hidden unit, bytes per intermediate unit).
# Without checkpointing every layer keeps all of these; with it, only one layer at a time does.
# LoRA keeps more per token than full fine-tuning: a dropout copy of each adapted layer's input, and fp32 norms.
ACT_PER_TOKEN = {"full": (20.0, 8.5), "lora": (30.0, 11.5), "qlora": (30.0, 11.5)}
# Of LoRA's, the dropout copies (bf16): the inputs of q/k/v, o, gate and up (six hidden-size ones) and of down (one
# intermediate-size one). With lora_dropout = 0 peft skips dropout: compiled with the checkpoint inside, a layer's
# activations at dropout 0 read about 30% under those at 0.1 (the H200 peaks at Unsloth's settings in
# tests/test_memory.py).
DROPOUT_COPIES_PER_TOKEN = (12.0, 2.0)
# torch.compile (use_compile, on by default on GPU) fuses element-wise ops, so a layer keeps fewer activations:
# a checkpointed layer (True), the whole model without checkpointing (False). The checkpoint inside the compiled
# code (the default) recomputes the layer inside one backward graph, which keeps a quarter more than eager code does
# (fitted with LoRA's dropout copies left out at lora_dropout = 0).
COMPILED_ACT_FACTOR = {True: 0.6, False: 0.75, "inside": 1.25}
# One loss chunk (tunelab.model.loss, gradients taken in forward): its bf16 logits and bf16 gradient, plus an fp32
# copy that the softmax is taken in when that is not compiled into one kernel.
LOSS_BYTES_PER_LOGIT = {"compiled": 4, "eager": 8}
CUDA_CONTEXT_BYTES = 0.6 * GIB  # the CUDA context and cuBLAS workspaces: not in max_memory_allocated
ALLOCATOR_SLACK = 0.08  # reserved over allocated (fragmentation), as a fraction
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64 / 4 + 0.5 / 64  # 4-bit codes + double-quantised absmax per 64-block


CPU_MEMORY_SHARE = 0.9
"""Of the CPU memory available when a run starts, the most that what it offloads may take."""


@dataclass
class MemoryEstimate:
    parts: dict  # name -> bytes, adding up to `total`
    total: int  # estimated peak of torch.cuda.max_memory_allocated()
    with_overhead: int  # plus CUDA context and allocator slack: what the card must have
    world_size: int = 1
    """The processes the estimate is for (the engine's sharding divides states over them)."""
    device_bytes: int | None = None
    device_name: str | None = None
    suggestions: list = field(default_factory=list)
    cpu_offload: dict = field(default_factory=dict)  # setting that moves it -> bytes it keeps in CPU memory

    @property
    def cpu_offload_bytes(self) -> int:
        return sum(self.cpu_offload.values())

    def fits_in_cpu_memory(self, available: int | None) -> bool:
        """What the run offloads fits in CPU_MEMORY_SHARE of `available` bytes (None: unknown, taken as fitting)."""
        return available is None or self.cpu_offload_bytes <= CPU_MEMORY_SHARE * available

    @property
    def fits(self) -> bool | None:
        """Fits with the allocator's slack to spare (None: no device to compare with)."""
        return None if self.device_bytes is None else self.with_overhead <= self.device_bytes

    @property
    def exceeds(self) -> bool | None:
        """The peak and the CUDA context alone are more than the card (None: no device to compare with)."""
        return None if self.device_bytes is None else self.total + CUDA_CONTEXT_BYTES > self.device_bytes

    @property
    def verdict(self) -> str | None:
        """'fits'; 'tight' when only the slack is missing (the estimate is within ~10% of measured peaks, so such
        a run may well fit); 'does NOT fit' when it `exceeds` the card."""
        if self.device_bytes is None:
            return None
        return "fits" if self.fits else "does NOT fit" if self.exceeds else "tight"


def sharded_by_engine(cfg) -> set[str]:
    """What the engine of `cfg` divides over the processes: 'optimizer', 'gradients', 'weights'."""
    if cfg.fsdp:
        return {"optimizer", "gradients", "weights"}
    if not cfg.deepspeed:
        return set()
    from tunelab.train.deepspeed_configs import zero_stage

    return [set(), {"optimizer"}, {"optimizer", "gradients"}, {"optimizer", "gradients", "weights"}][
        min(zero_stage(cfg.deepspeed), 3)]


def estimate_memory(cfg, device=None, plan=None, *, world_size: int | None = None,
                    card_bytes: int | None = None) -> MemoryEstimate:
    """Peak GPU memory of one training step of `cfg` on each GPU; `device` (a torch.device) or `card_bytes` (a card
    that is not here) to check the fit. `plan`: the run's `FastPathPlan` (by default the one `cfg` gets on a GPU).
    `world_size`: the processes of the run (default: sequence_parallel_size, the fewest it runs on)."""
    plan = plan or _plan(cfg, world_size or cfg.sequence_parallel_size)
    est = _estimate(cfg, device, plan, world_size, card_bytes)
    est.suggestions = _suggestions(cfg, est, plan)
    return est


def _plan(cfg, world_size: int = 1):
    from tunelab.model.plan import plan_fast_path

    return plan_fast_path(cfg, "cuda", world_size)


def _estimate(cfg, device, plan, world_size, card_bytes) -> MemoryEstimate:
    world = world_size or plan.sequence_parallel
    shape = model_shape(cfg.pretrained_model_name_or_path)
    bits = cfg.resolved_quant_bits()
    checkpointing = plan.checkpointing
    from tunelab.data.dataset import row_length

    split = plan.sequence_parallel
    if split > 1:
        from tunelab.model.sequence_parallel import check_heads

        check_heads(shape.num_attention_heads, shape.num_key_value_heads, split)
    # this GPU's share of each row (a preference row holds two max_length sequences)
    tokens = -(-row_length(cfg) // split) * cfg.batch_size
    h, layers, vocab = shape.hidden_size, shape.num_hidden_layers, shape.vocab_size

    # peft's preparation of a quantised base upcasts the rest to fp32; the fast path casts the frozen ones back
    other_bytes = 4 if bits and not plan.frozen_weights_in_compute_dtype else 2
    embeddings_on_cpu = plan.embeddings_on_cpu and not shape.tie_word_embeddings
    parts, grads, grads_name = _weights_and_states(cfg, plan, shape, world, other_bytes=other_bytes,
                                                   embeddings_on_cpu=embeddings_on_cpu)
    # partial fine-tuning: the layers before the first trained one keep nothing for a backward that stops there
    backward_layers = trained_part(cfg).backward_layers if partial(cfg) else layers
    if split > 1:
        # q, k, v (KV heads repeated to whole heads a rank) and the output of the layer at work, each sent and
        # received: twice this GPU's share of them (their gradients in backward, when the forward's are gone)
        from tunelab.model.sequence_parallel import kv_repeats

        kv_heads = shape.num_key_value_heads * kv_repeats(shape.num_key_value_heads, split)
        parts["all-to-all buffers"] = 2 * tokens * (2 * shape.num_attention_heads + 2 * kv_heads) * shape.head_dim * 2
    if cfg.resolved_reference(copy_fits=False) == "copy":  # DPO / KTO's frozen copy, in the compute dtype
        parts["reference model (frozen copy)"] = shape.total_params() * 2

    layer_act = _layer_activation_bytes(cfg, plan, shape, tokens)
    dora_kept, dora_norm = dora_bytes(shape, cfg, tokens)
    loss_name, loss_bytes = _loss_bytes(cfg, plan, shape, tokens)
    # From the second micro-batch of an accumulated step on, the first one's gradients are all there while this
    # one's activations build up: they add to the peak whole (measured: +9% for Qwen2.5-1.5B full, bs 8, acc 2).
    accumulating = cfg.accumulative_counts > 1
    grads_name += " (kept across micro-batches)" if accumulating else " at the peak"
    saved_per_layer = tokens * h * 2  # with checkpointing: the layer's input
    if plan.keeps_attention:  # and attention's output and softmax statistics
        saved_per_layer += tokens * shape.num_attention_heads * (shape.head_dim * 2 + 4)
    projections = 0
    if plan.keeps_projections:  # and the q, k, v, o projections' outputs
        q_width, kv_width = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
        projections = tokens * (q_width + 2 * kv_width + h) * 2
    if checkpointing:
        # The peak is early in backward: one saved input per layer, the last layer recomputed, the loss chunk;
        # or late in backward, when the gradients are all there but the saved inputs are gone.
        # Offloaded, two layers' saved tensors are on the GPU: in forward the layer computing and the one whose
        # copy out is still running, in backward the layer recomputed and the next one, fetched ahead; one where
        # they are copied synchronously (model/layers.py).
        on_gpu = 1 if tokens * h * 2 > PINNED_MAX_BYTES else min(2, layers)
        saved = (min(on_gpu, backward_layers) if plan.offload_activations else backward_layers) * saved_per_layer
        # The kept projections replace the recomputed ones of the layer at work (counted in layer_act): only the
        # other layer's on the GPU add to the peak.
        saved += (on_gpu - 1) * projections
        early, late = saved + loss_bytes, grads
        parts["activations (checkpointed)"] = int(saved + (layer_act if backward_layers else 0))
        parts[loss_name] = int(loss_bytes)
        parts[grads_name] = int(grads if accumulating else max(0, late - early))
    else:
        parts["activations"] = int(backward_layers * layer_act)
        parts[loss_name] = int(loss_bytes)
        # Gradients arrive as activations are freed; at the peak (start of backward) only lm_head's exists (a reward
        # model has none), counted with the loss (it is taken in forward) when the loss is chunked.
        head = lm_head_trains(cfg) and cfg.objective != "reward"
        first = vocab * h * 2 if head and not plan.chunked_loss else 0
        parts[grads_name] = int(grads if accumulating else first)

    if dora_kept:  # the layer at work's with checkpointing, every layer's without; one linear's weight norm
        parts["DoRA (peft's forward)"] = int((1 if checkpointing else layers) * dora_kept + dora_norm)
    total = int(sum(parts.values()))
    with_overhead = int(total * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES)
    est = MemoryEstimate(parts=parts, total=total, with_overhead=with_overhead, world_size=world)
    if plan.offload_activations:
        # every layer's input (and the attention block's results, where kept) passes through
        est.cpu_offload["offload_activations"] = layers * (saved_per_layer + projections)
    if embeddings_on_cpu:
        est.cpu_offload["embeddings_on_cpu"] = vocab * h * other_bytes
    if card_bytes is not None:
        est.device_bytes, est.device_name = card_bytes, f"a GPU of {card_bytes / GIB:g} GiB"
    elif device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        est.device_bytes, est.device_name = props.total_memory, props.name
    return est


def _weights_and_states(cfg, plan, shape: ModelShape, world: int, *, other_bytes: int,
                        embeddings_on_cpu: bool) -> tuple[dict, int, str]:
    """(parts, gradient bytes, gradients' name): the weights and optimizer states each GPU holds through the step
    (`other_bytes`: per parameter outside the decoder's linears), and the gradients, which `_estimate` places at the
    peak. The engine's sharding divides them over `world` processes."""
    bits = cfg.resolved_quant_bits()
    h, layers, vocab = shape.hidden_size, shape.num_hidden_layers, shape.vocab_size
    linear = layers * shape.layer_linear_params()
    other = _model_params(cfg, shape) - linear  # embeddings, lm_head, norms: kept in bf16
    parts = {}
    per_param = {4: NF4_BYTES_PER_PARAM, 8: 1.0 + 4 / 64}.get(bits, 2.0)
    parts["frozen/base weights"] = int(linear * per_param + other * other_bytes)
    if embeddings_on_cpu:  # the input embedding is looked up in CPU memory (tunelab.model.fast.EmbeddingOnCPU)
        parts["frozen/base weights"] -= vocab * h * other_bytes
    adam_bytes = 2 if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8
    if cfg.visual_encoder_name_or_path:
        parts.update(vision_parts(cfg, h, adam_bytes))
    if cfg.freeze_llm:  # LLaVA's stage 1: the language model is frozen, only the projector (above) trains
        trainable, grads, grads_name = 0, 0, "gradients"
    elif cfg.method == "full":
        trainable = trained_part(cfg).params if partial(cfg) else _model_params(cfg, shape)
        if cfg.fp32_master_weights:  # fp32 weights, gradients and states, computed in bf16 under autocast
            # (partial fine-tuning: the frozen weights stay in bf16)
            parts["frozen/base weights"] = trainable * 4 + (_model_params(cfg, shape) - trainable) * 2
            # autocast casts each weight to bf16 once a forward and keeps the copy until the forward is done
            parts["bf16 weight copies (autocast)"] = trainable * 2
            grads, grads_name = trainable * 4, "gradients"
        else:  # bf16 weights, and so bf16 gradients and AdamW states
            grads, grads_name = trainable * 2, "gradients"
            adam_bytes //= 2
    else:
        trainable = lora_params(shape, cfg)
        # bf16 adapters with fp32_master_weights = False (tunelab.train.optim.choose_precision), else fp32
        width = 4 if cfg.fp32_master_weights or cfg.dtype in ("fp16", "fp32") else 2
        parts["LoRA params (fp32)" if width == 4 else "LoRA params (bf16)"] = trainable * width
        grads, grads_name = trainable * width, "LoRA gradients"
        if width == 2 and adam_bytes == 8:  # 32-bit AdamW's states follow the weights' dtype
            adam_bytes = 4
    parts["AdamW states"] = trainable * adam_bytes
    sharded = sharded_by_engine(cfg) if world > 1 else set()
    if "optimizer" in sharded:
        parts["AdamW states"] //= world
    if "gradients" in sharded:
        grads //= world
    if "weights" in sharded:
        for name in ("frozen/base weights", "bf16 weight copies (autocast)", "LoRA params (fp32)",
                     "LoRA params (bf16)"):
            if name in parts:
                parts[name] //= world
        # gathered whole while they compute: a layer and the next one (prefetched), and the root (embeddings,
        # lm_head), which the loss reads through the whole step
        parts["gathered weights"] = 2 * shape.layer_linear_params() * 2 + other * 2
    if plan.optimizer_in_backward:  # each layer's gradients freed after its update in backward
        largest = vocab * h if lm_head_trains(cfg) else 0  # (and lm_head's, when trained)
        grads = max(grads // layers, grads * largest // max(trainable, 1))
        grads_name = "gradients (a layer's at a time: optimizer_in_backward)"
    return parts, grads, grads_name


def _model_params(cfg, shape: ModelShape) -> int:
    """The parameters of the model the run trains: a reward model has a one-score head where the language model
    has its vocabulary-wide lm_head (a tied one is the embedding, which stays)."""
    if cfg.objective == "reward" and not shape.tie_word_embeddings:
        return shape.total_params() - shape.vocab_size * shape.hidden_size + shape.hidden_size
    return shape.total_params()


def _layer_activation_bytes(cfg, plan, shape: ModelShape, tokens: int) -> float:
    """What one decoder layer keeps for backward over `tokens` tokens (the layer at work when checkpointing, every
    layer without it)."""
    bits = cfg.resolved_quant_bits()
    h, inter = shape.hidden_size, shape.intermediate_size
    a_h, a_i = ACT_PER_TOKEN["lora" if cfg.freeze_llm else cfg.method]  # frozen weights keep what LoRA's do
    if plan.checkpoint_inside_compile and cfg.method in ("lora", "qlora") and not cfg.lora_dropout:
        a_h, a_i = a_h - DROPOUT_COPIES_PER_TOKEN[0], a_i - DROPOUT_COPIES_PER_TOKEN[1]
    if (plan.fused_dequant and not plan.dequantize_once and cfg.method == "qlora" and not cfg.lora_dropout
            and merges_into_the_weight(tokens, h, inter)):
        # The MLP's gate and up run merged with their adapters (one matmul by W + scale * B @ A): each product is
        # written once, not as the base output and its copy with the adapter added: one intermediate-size tensor a
        # token less where the recomputed MLP peaks (Llama-3.1-8B QLoRA r32 32k: 13.01 GiB allocated, 13.89 without the
        # merge; BENCHMARKS.md, "the checkpoint keeps the q, k, v and o projections at long context")
        a_i -= 1.0
    # With MLP slices (long context), the intermediate-size activations exist for one slice at a time.
    layer_act = tokens * a_h * h + min(tokens, plan.mlp_slice or tokens) * a_i * inter
    if plan.compile:
        layer_act *= COMPILED_ACT_FACTOR["inside" if plan.checkpoint_inside_compile else plan.checkpointing]
    if bits == 4 and plan.dequantize_once and not plan.mlp_slice:
        # The recomputation keeps one layer's weights dequantised to bf16 until that layer's backward is done.
        # (With MLP slices each slice dequantises for its own backward, when the other slices' intermediates,
        # counted above for one slice, are gone: measured within the long-context rows' error without this term.)
        layer_act += shape.layer_linear_params() * 2
    elif bits == 4 and plan.checkpointing:
        # Dequantised again in backward: one linear's bf16 weight at a time.
        layer_act += max(a * b for a, b in shape.linear_shapes().values()) * 2
    return layer_act


def _loss_bytes(cfg, plan, shape: ModelShape, tokens: int) -> tuple[str, int]:
    """(name, bytes) of the loss at its peak over `tokens` tokens: a chunk of logits (and what the chunked loss
    keeps beside it), or the full fp32 logits."""
    h, vocab = shape.hidden_size, shape.vocab_size
    if cfg.objective == "reward":  # one score a sequence, no vocabulary-wide logits: the last hidden states' gradient
        return "loss (reward scores)", tokens * h * 2
    if plan.chunked_loss:
        from tunelab.model.loss import loss_chunk_rows

        head_trained = lm_head_trains(cfg)
        rows = min(tokens, loss_chunk_rows(plan.loss_chunk_size, vocab, head_trained=head_trained))
        per_logit = LOSS_BYTES_PER_LOGIT["compiled" if plan.compiled_loss else "eager"]
        # plus the trained positions' hidden states, their gradient and its scatter back into the full sequence;
        # a trained lm_head's fp32 weight gradient, summed over the chunks in forward (and one chunk's bf16
        # product, where the matmul cannot add into fp32 itself: counted, to stay on the safe side)
        loss_name, loss_bytes = "loss (chunked logits)", rows * vocab * per_logit + 3 * tokens * h * 2
        if head_trained:
            loss_bytes += vocab * h * 6
    else:
        loss_name, loss_bytes = "loss (full fp32 logits)", tokens * vocab * 14
    return loss_name, loss_bytes


def vision_parts(cfg, hidden: int, adam_bytes: int) -> dict[str, int]:
    """A LLaVA run's vision tower (frozen, bf16) and projector (trained: fp32 weights, gradients, AdamW states)."""
    c = vision_shape(cfg.visual_encoder_name_or_path)
    v, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    tower = layers * (4 * v * v + 2 * v * inter) + 3 * c["patch_size"] ** 2 * v + (c["image_size"] // c["patch_size"]) ** 2 * v
    projector = v * hidden + hidden * hidden
    return {"vision tower (frozen, bf16)": tower * 2, "projector (trained)": projector * (4 + 4 + adam_bytes)}


def _suggestions(cfg, est: MemoryEstimate, plan) -> list[str]:
    if est.fits is not False:
        return []
    out = []
    checkpointing = plan.checkpointing
    if not checkpointing:
        out.append("gradient_checkpointing = True  (keeps one tensor per layer instead of all activations)")
    if cfg.method == "full":
        if cfg.fp32_master_weights:
            out.append("fp32_master_weights = False  (bf16 weights: 8 bytes a parameter less; small updates may "
                       "round away)")
        out.append("method = 'qlora'  (4-bit frozen base + small adapters)")
    elif cfg.method == "lora":
        out.append("method = 'qlora'  (4-bit frozen base: about a quarter of the weight memory)")
    if cfg.batch_size > 1:
        out.append(f"batch_size = 1 and accumulative_counts = {cfg.accumulative_counts * cfg.batch_size}")
    if cfg.max_length > 512:
        out.append(f"max_length = {cfg.max_length // 2}")
    if not plan.enabled:
        out.append("fast_path = True  (among others, the chunked loss never builds full-vocabulary logits)")
    if plan.cuda_graphs:
        out.append("cuda_graphs = False  (no private memory pool for the graphs; Llama-7B QLoRA 2k: 0.24-0.28 GiB "
                   "less reserved, 20-34% slower)")
    if checkpointing and not plan.offload_activations and cfg.max_length >= LONG_CONTEXT_TOKENS:
        out.append("offload_activations = True  (each layer's checkpointed input in CPU memory)")
    slice_tokens = LONG_CONTEXT_TOKENS  # the slice that fits the longest rows (BENCHMARKS.md, longest context)
    if cfg.max_length > slice_tokens and not (plan.mlp_slice and plan.mlp_slice <= slice_tokens):
        out.append(f"mlp_chunk_size = {slice_tokens}  (each MLP {slice_tokens} tokens at a time: one more MLP forward "
                   "a step)")
    could_update_in_backward = cfg.optimizer_in_backward is None and not optimizer_in_backward_blockers(
        replace(cfg, max_norm=0.0), plan.on_gpu, est.world_size)
    if plan.enabled and not plan.optimizer_in_backward and could_update_in_backward:
        out.append("max_norm = 0  (no clipping: each layer's update is made in backward, and the gradients never all "
                   "exist)")
    if cfg.optimizer == "adamw" and cfg.method == "full":
        out.append("optimizer = 'adamw_8bit'")
    return out


def available_cpu_memory() -> int | None:
    """Bytes of CPU memory available now (MemAvailable of /proc/meminfo), None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
