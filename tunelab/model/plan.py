"""The fast path, decided once: which of tunelab's speed levers a training run uses.

`plan_fast_path(cfg, device, world_size)` turns the settings into a frozen `FastPathPlan` before anything is loaded,
and everything that runs the fast path reads that one object: the model loader (`load_model_for_training` passes it to
`fast.apply_fast_path`), the decoder layers (`layers.run_decoder_layers`), attention (`attention.enable_varlen_attention`),
the loss (`loss.causal_lm_objective`), the memory estimate (`memory.estimate_memory`), the training loop (batch shapes
and gradient buffers under CUDA graphs) and the benchmarks. No module keeps a switch of its own.

The levers that compute the plain path's numbers are simply on (those that need a GPU, on a GPU): attention over packed
rows with the flash varlen kernel (cuDNN's for rows of one sample), the loss over trained tokens in chunks, frozen
weights in the compute dtype, the lean LoRA forward, QLoRA's 4-bit dequantisation in ops compile fuses, and tunelab's
own per-layer checkpointing. With compiled layers, LoRA dropout's masks are hashed: torch.nn.Dropout's distribution,
other random draws; and where layer inputs are offloaded, the compiled checkpoint keeps attention's output instead of
recomputing it. The settings that remain are trade-offs a user makes: `use_compile` (a slower first
step), `cuda_graphs` (padding to fixed shapes), `offload_activations` (None: on for long rows) and `mlp_chunk_size`
(memory for time at long context), `embeddings_on_cpu` (GPU memory for a copy a step), `qlora_dequant_once` (memory
for one dequantisation a pass), `loss_chunk_size`, and `optimizer_in_backward` (on by itself
where nothing needs every gradient first). `fast_path = False` turns every lever off: transformers
and peft as they come, for debugging, and the reference of scripts/gpu_check.py.

A new lever is a field here, its decision in `plan_fast_path`, and its use in the module that runs it. A model with
more than a language model (a vision tower in front) gets the plan for its language model: the levers act on the
decoder that `tunelab.model.parts.split_model` finds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError

LONG_CONTEXT_TOKENS = 8192
"""Rows this long or longer (each rank's share) are long context: `offload_activations = None` offloads their layer
inputs (at 8k without CUDA graphs as fast as with graphs and the inputs on the GPU, in 2 GiB less: InternLM2-7B
QLoRA; BENCHMARKS.md, "offloading from 8k on"), and `mlp_chunk_size = 'auto'` without offloading runs the MLP in
slices this long past it."""
OFFLOADED_INSIDE_MAX_TOKENS = 32768
"""Offloaded rows up to this many tokens keep the checkpoint inside the compiled layer; longer ones put it around.
Inside, the recomputation is part of one compiled backward, which skips what backward does not need (o_proj's and
down_proj's forward) and keeps the attention block's results (`save_attention`), but holds more of the recomputed
MLP at once. Llama-3.1-8B QLoRA r32 at 32k: 7,445 tokens/s in 14.2 GiB reserved inside with attention's output
kept, 6,437 in 12.7 around (Unsloth: 6,513 in 15.3; BENCHMARKS.md, "the checkpoint keeps attention's output at long
context"); with the q, k, v, o projections kept too 8,118 in 14.66 (Unsloth: 6,449 in 15.31; BENCHMARKS.md, "the
checkpoint keeps the q, k, v and o projections at long context"). Past 32k the MLP runs in slices
(OFFLOADED_MLP_TOKENS), eager code that puts the checkpoint around anyway."""
OFFLOADED_MLP_TOKENS = 32768
"""`mlp_chunk_size = 'auto'` with offloaded layer inputs: the MLP runs whole up to this many tokens, in slices this
long past it (Llama-3.1-8B QLoRA 32k: faster than 8k slices, and still leaner than inputs on the GPU;
BENCHMARKS.md, "long rows offloaded by default")."""


@dataclass(frozen=True)
class FastPathPlan:
    """What the fast path does in one run. The defaults are the plain path (`fast_path = False`)."""

    enabled: bool = False
    """tunelab runs the decoder layers and the loss; False: transformers and peft as they come."""
    on_gpu: bool = False
    checkpointing: bool = False
    """Gradient checkpointing of every decoder layer (tunelab's own when enabled, transformers' otherwise)."""
    varlen_attention: bool = False
    """Flash varlen attention over packed rows, cuDNN attention for rows of one sample (`attention.py`)."""
    frozen_weights_in_compute_dtype: bool = False
    """Frozen fp32 weights (peft's 4-bit preparation upcasts norms and embeddings) back to bf16 / fp16."""
    lean_lora: bool = False
    """peft's LoRA forward in fewer kernels (`fast.lean_lora_forward`)."""
    hashed_dropout: bool = False
    """The lean LoRA forward's dropout masks are a hash of position and one random seed a call
    (`tunelab.model.dropout`): a few integer ops an element instead of torch's Philox rounds."""
    four_bit: bool = False
    """The frozen base weights are bitsandbytes 4-bit (QLoRA)."""
    dequantize_once: bool = False
    """QLoRA with checkpointing: the 4-bit weight dequantised once a pass and kept for that layer's backward; False:
    backward dequantises it again (one layer's 16-bit weights less memory)."""
    embeddings_on_cpu: bool = False
    """A frozen input embedding looked up in CPU memory (`fast.EmbeddingOnCPU`)."""
    compile: bool = False
    """torch.compile each decoder layer."""
    cuda_graphs: bool = False
    """Replay the compiled layers as CUDA graphs; batches padded to max_length, sample boundaries to a few sizes."""
    offload_activations: bool = False
    """Each checkpointed layer input waits in CPU memory until backward."""
    checkpoint_around: bool = False
    """Offloaded rows longer than OFFLOADED_INSIDE_MAX_TOKENS keep the checkpoint around the compiled layer (and
    shorter ones on a card that holds only that: `tunelab.model.fit.fit_plan_to_card`, which the training loop and
    `tunelab plan` apply to this plan)."""
    save_attention: bool = False
    """With the checkpoint inside the compiled layer, it keeps attention's output and softmax statistics for backward
    instead of recomputing attention (selective checkpointing); with offloaded inputs they wait in CPU memory beside
    the input. Attention's cost grows with the row, the copy's does not outgrow the layer's compute."""
    save_projections: bool = False
    """With `save_attention`, the checkpoint also keeps the q, k, v and o projections' outputs, so backward recomputes
    only the norms, RoPE and the MLP's gate and up; they wait in CPU memory too (2.5 times the layer input more at
    7B/8B, 5 GiB a step at 8k). `fit.fit_plan_to_card` turns it off where the host's memory cannot hold that."""
    mlp_slice: int | None = None
    """Tokens each MLP computes at a time (long context), None: the whole sequence."""
    optimizer_in_backward: bool = False
    """Each parameter updated as soon as backward has its gradient, which is then freed
    (`tunelab.train.optim.StepsInBackward`): the gradients never all exist at once."""
    chunked_loss: bool = False
    """The loss over trained tokens only, lm_head in chunks, gradients taken in forward; False: full logits."""
    loss_chunk_size: int = TrainConfig.loss_chunk_size
    """Most trained positions a chunk of the chunked loss."""
    sequence_parallel: int = 1
    """Ranks each row is split over (`sequence_parallel_size`); above 1, attention exchanges heads for tokens
    (`sequence_parallel.attend_over_whole_rows`), so tunelab's attention runs on any device."""

    @property
    def checkpoint_inside_compile(self) -> bool:
        """The checkpoint goes inside the compiled layer, so its recomputation is part of one compiled backward graph.
        MLP slices and sequence parallelism's all-to-all need eager code inside the layer, so they keep the
        checkpoint outside. (Offloading the input is eager code around the layer: it works with either.)"""
        return (self.compile and self.checkpointing and not self.mlp_slice and not self.checkpoint_around
                and self.sequence_parallel == 1)

    @property
    def keeps_attention(self) -> bool:
        """The checkpoint keeps attention's output for backward: `save_attention` where the checkpoint is inside the
        compiled layer (around it, the compiled forward runs again whole)."""
        return self.save_attention and self.checkpoint_inside_compile

    @property
    def keeps_projections(self) -> bool:
        """The checkpoint keeps the q, k, v and o projections' outputs as well (`save_projections`)."""
        return self.save_projections and self.keeps_attention

    @property
    def fused_dequant(self) -> bool:
        """The 4-bit dequantisation in plain torch ops that compile fuses into one kernel, in the compiled layers
        (outside them, bitsandbytes' kernel: `nf4.dequantize_4bit_weight`)."""
        return self.four_bit and self.compile

    @property
    def checkpoint_tags_each_op(self) -> bool:
        """The checkpoint inside compiled code tags each op for recomputation as it is traced (selective
        checkpointing with every op recomputed), instead of tagging the layer's graph before autograd.Functions
        in it are traced through. torch 2.11 does the latter and misses the ops of the 4-bit linear that
        dequantises again in backward (an autograd.Function): its partitioner then saves their activations
        instead of recomputing them (11.0 GiB instead of 6.5 on Llama-7B QLoRA 2k, H200; fixed upstream by
        pytorch PR 177396)."""
        return self.checkpoint_inside_compile and self.fused_dequant and not self.dequantize_once

    @property
    def embedding_rows_ahead(self) -> bool:
        """A batch's rows of the input embedding in CPU memory are gathered when the batch is sent to the GPU
        (`fast.batch_to_device`), during the step before, so the GPU never waits for the lookup. Not under sequence
        parallelism: its objective cuts each row into shards first, and the whole rows' embeddings would wait
        unused on the GPU."""
        return self.embeddings_on_cpu and self.sequence_parallel == 1

    @property
    def compiled_loss(self) -> bool:
        """The loss's softmax and its gradient compiled into one kernel."""
        return self.chunked_loss and self.compile

    def describe(self) -> str:
        """The levers that are on, for the log: 'varlen_attention, chunked_loss (4096 rows a chunk), compile, ...'."""
        if not self.enabled:
            return "off (fast_path = False: transformers and peft as they come)"
        on = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            skip = f.name in ("enabled", "on_gpu", "four_bit", "loss_chunk_size") or not value
            if skip or (f.name == "sequence_parallel" and value == 1):
                continue
            detail = {"mlp_slice": f" ({value} tokens a slice)", "sequence_parallel": f" ({value} ranks a row)"}
            on.append(f.name + detail.get(f.name, ""))
        for name in ("checkpoint_inside_compile", "checkpoint_tags_each_op", "fused_dequant", "compiled_loss"):
            if getattr(self, name):
                on.append(name)
        return ", ".join(on) or "nothing on this device"


def plan_fast_path(cfg, device: torch.device | str = "cuda", world_size: int = 1) -> FastPathPlan:
    """The fast path of `cfg` on `device` with `world_size` processes. Touches no GPU: `tunelab plan` plans a GPU run
    on any machine."""
    on_gpu = torch.device(device).type == "cuda"
    checkpointing = cfg.resolved_gradient_checkpointing()
    if not cfg.fast_path:
        return FastPathPlan(on_gpu=on_gpu, checkpointing=checkpointing, loss_chunk_size=cfg.loss_chunk_size)
    compile_layers = bool(cfg.use_compile and on_gpu)
    sequence_parallel = cfg.sequence_parallel_size
    row_share = -(-cfg.max_length // sequence_parallel)  # the tokens of a row each rank runs through the layers
    offload = cfg.offload_activations
    if offload is None:  # long rows: the saved layer inputs outgrow the rest; several processes are untested
        offload = row_share >= LONG_CONTEXT_TOKENS and world_size == 1
    offload = bool(offload and on_gpu and checkpointing)
    chunk = cfg.mlp_chunk_size
    if chunk == "auto":
        chunk = OFFLOADED_MLP_TOKENS if offload else LONG_CONTEXT_TOKENS
    mlp_slice = chunk if chunk and row_share > chunk else None
    graphs = cfg.cuda_graphs
    if graphs is None:
        # Rows packed to max_length have one shape anyway; several processes are untested. A reference scored every
        # step is a second pass whose memory the graphs' private pool cannot share. (Full fine-tuning with reference
        # 'auto' counts as a copy here: the memory plan that may precompute it instead needs this plan first, and
        # graphs off is the leaner side of that choice.)
        graphs = (cfg.pack_to_max_length and world_size == 1
                  and cfg.resolved_reference() not in ("adapters_off", "copy"))
    # CUDA graphs record a compiled layer whose checkpoint is inside the compiled code, or which has none: an eager
    # checkpoint around compiled code (MLP slices) frees an input the recording still holds. With offloaded inputs
    # the graphs are recorded again every step (InternLM2-7B QLoRA 8k: 4 s steps instead of 0.8; BENCHMARKS.md,
    # "offloading from 8k on").
    # Sequence parallelism's all-to-all is eager code inside the layer.
    graphs = bool(graphs and compile_layers and (not checkpointing or not (offload or mlp_slice))
                  and sequence_parallel == 1)
    four_bit = cfg.resolved_quant_bits() == 4
    embeddings_on_cpu = cfg.embeddings_on_cpu
    if embeddings_on_cpu is None:
        embeddings_on_cpu = cfg.method in ("lora", "qlora") and not embedding_trained(cfg)
    plan = FastPathPlan(
        enabled=True, on_gpu=on_gpu, checkpointing=checkpointing,
        varlen_attention=on_gpu or sequence_parallel > 1, frozen_weights_in_compute_dtype=on_gpu, lean_lora=on_gpu,
        hashed_dropout=compile_layers,  # eager, HashedDropout is torch's dropout anyway
        four_bit=four_bit, dequantize_once=four_bit and on_gpu and checkpointing and cfg.qlora_dequant_once,
        embeddings_on_cpu=bool(on_gpu and embeddings_on_cpu and cfg.method != "full"),  # full trains it
        compile=compile_layers, cuda_graphs=graphs, offload_activations=offload,
        checkpoint_around=offload and row_share > OFFLOADED_INSIDE_MAX_TOKENS, mlp_slice=mlp_slice,
        optimizer_in_backward=_optimizer_in_backward(cfg, on_gpu, world_size),
        chunked_loss=not lora_on_lm_head(cfg),
        loss_chunk_size=cfg.loss_chunk_size, sequence_parallel=sequence_parallel)
    # Attention's output and the projections are kept where the inputs are offloaded anyway: in CPU memory they cost
    # a copy beside the compute; on the GPU they would be 2-3 more saved tensors a layer, each as large as the input.
    keep = plan.offload_activations and plan.checkpoint_inside_compile
    return dataclasses.replace(plan, save_attention=keep, save_projections=keep)


def names_module(entry: str, names) -> bool:
    """A list entry of lora_target_modules / lora_modules_to_save names one of the modules `names` as peft matches
    it: the whole name, or its last parts."""
    return any(name == entry or name.endswith("." + entry) for name in names)


def lora_adapts(cfg, path: str) -> bool:
    """lora_target_modules puts a LoRA adapter on the module of whole name `path`, as peft matches: a list entry
    (`names_module`), a string as a regular expression over the whole name. 'all-linear' adapts the decoder's
    linears only."""
    import re

    targets = cfg.lora_target_modules
    if cfg.method == "full" or targets == "all-linear":
        return False
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, path) is not None
        except re.error:  # reported with the fix before the model loads (targets.check_lora_targets)
            return False
    return any(names_module(t, [path]) for t in targets)


def lora_on_lm_head(cfg) -> bool:
    """An adapter on lm_head. The chunked loss multiplies by lm_head's own weight, which would leave that adapter
    out: no gradient for it and another loss than peft's."""
    return lora_adapts(cfg, "lm_head")


def embedding_trained(cfg) -> bool:
    """The input embedding trains (a LoRA adapter, or a whole copy in lora_modules_to_save): no frozen nn.Embedding
    is left for `fast.EmbeddingOnCPU` to move."""
    saved = any(m.rsplit(".", 1)[-1] == "embed_tokens" for m in cfg.lora_modules_to_save or ())
    return cfg.method != "full" and (saved or lora_adapts(cfg, "model.embed_tokens"))


def optimizer_in_backward_blockers(cfg, on_gpu: bool, world_size: int = 1) -> list[str]:
    """Why each parameter cannot be updated inside backward in this run: an update made as soon as one gradient is
    there must not need the others (a clipping norm, an fp16 loss scale's overflow check, a skipped step) nor more
    micro-batches, and it runs on whole parameters in one process."""
    blockers = []
    if cfg.max_norm > 0:
        blockers.append(f"max_norm = {cfg.max_norm:g} (clipping needs the norm of all gradients first; 0 turns it off)")
    if cfg.accumulative_counts > 1:
        blockers.append(f"accumulative_counts = {cfg.accumulative_counts} (the update waits for every micro-batch)")
    if cfg.optimizer == "paged_adamw_8bit":
        blockers.append("optimizer = 'paged_adamw_8bit' (use 'adamw' or 'adamw_8bit')")
    if cfg.nonfinite == "skip":
        blockers.append("nonfinite = 'skip' (a step cannot be left out once its updates are made)")
    if cfg.dtype == "fp16" or (cfg.dtype == "auto" and on_gpu and not _gpu_has_bf16()):
        blockers.append("fp16 (its loss scale skips a step whose gradients overflowed; use dtype = 'bf16')")
    if world_size > 1 or cfg.deepspeed or cfg.fsdp:
        blockers.append("several processes (their engines reduce and shard the gradients themselves)")
    return blockers


def _optimizer_in_backward(cfg, on_gpu: bool, world_size: int) -> bool:
    blockers = optimizer_in_backward_blockers(cfg, on_gpu, world_size)
    if cfg.optimizer_in_backward is None:
        # On wherever it can be: the same updates in less memory for at most 1.6% of the tokens/s (torch's AdamW
        # steps a layer at a time, one fused launch each; H200, BENCHMARKS.md, "a layer's updates in one launch").
        return not blockers
    if cfg.optimizer_in_backward and blockers:
        raise TunelabError("optimizer_in_backward = True cannot run with " + "; ".join(blockers)
                           + ". Change those settings, or set optimizer_in_backward = None (on where it can be).")
    return cfg.optimizer_in_backward


def _gpu_has_bf16() -> bool:
    """dtype 'auto' on this machine's GPU is bf16 (planning for a GPU elsewhere: assumed, as on every card since
    Ampere)."""
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
