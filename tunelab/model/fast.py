"""The GPU fast path: switch on, after loading, each speed lever the config allows.

`apply_fast_path(model, cfg, device)` is called by the model loader for training. Each lever has its own config
switch (TrainConfig, "speed" section) and each one keeps the maths of the plain path: the guard in
scripts/gpu_check.py (and tests/test_fast_*.py on CPU) checks that loss and adapter gradients match.

Levers (measured in BENCHMARKS.md, see docs/SPEED.md for what paid and what did not):
  * use_varlen_attention: flash varlen attention over packed rows (tunelab.model.attention), GPU only; with
    cudnn_attention, rows that hold one whole sample use cuDNN's kernel instead.
  * frozen weights kept in the compute dtype: peft's prepare_model_for_kbit_training upcasts every
    non-quantised weight (embeddings, lm_head, norms) to fp32; frozen ones gain nothing from it and cost
    memory and fp32 matmuls, so they go back to bf16/fp16. Always on with a GPU.
  * use_chunked_loss / loss_chunk_size: read by tunelab.model.loss.causal_lm_loss, nothing to do here.
  * offload_activations, mlp_chunk_size, use_compile: how each decoder layer runs (tunelab.model.layers): its
    checkpointed input in CPU memory, its MLP in slices of a long sequence, its forward compiled.
  * qlora_dequant_once (needs gradient checkpointing): the 4-bit weight is
    dequantised twice a step (forward, recompute) instead of three times.
  * qlora_fused_dequant (with use_compile): the dequantisation in plain torch ops, fused into one kernel.
  * lean_lora: peft's LoRA forward in fewer kernels (see lean_lora_forward).
  * embeddings_on_cpu: a frozen input embedding looked up in CPU memory (see EmbeddingOnCPU).
"""

from __future__ import annotations

import logging

import torch

from tunelab.model.layers import run_decoder_layers

log = logging.getLogger(__name__)


def _decoder_layers(model):
    from tunelab.model.loss import split_model

    decoder, _, _ = split_model(model)
    return getattr(decoder, "layers", None)


def downcast_frozen_weights(model, dtype: torch.dtype) -> int:
    """Cast frozen fp32 floating-point weights to `dtype`; returns how many bytes that saved."""
    saved = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            saved += param.numel() * (4 - torch.finfo(dtype).bits // 8)
            param.data = param.data.to(dtype)
    return saved


def _linear4bit_dequant_once(self, x, *args, **kwargs):
    """bitsandbytes Linear4bit.forward, with the dequantised weight kept for this layer's backward.

    bitsandbytes dequantises the 4-bit weight in forward and again in backward; with gradient checkpointing
    the forward runs twice, so three times a step. Here F.linear saves the bf16 weight it was given: in the
    checkpointed first pass nothing is saved, in the recompute it lives until this layer's backward is done
    (one layer's bf16 weights at a time), so two dequantisations instead of three.
    """
    import bitsandbytes.functional as bnbf

    weight = bnbf.dequantize_4bit(self.weight.data, self.weight.quant_state).to(x.dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def dequantize_once_per_pass(model, fused: bool = False) -> int:
    """Patch every bitsandbytes 4-bit linear layer of `model`; returns how many.

    fused: dequantise with plain torch ops (tunelab.model.nf4) that torch.compile turns into one kernel, instead of
    bitsandbytes' three custom-op calls; only worth it inside compiled layers (eager, it is slower).
    """
    from tunelab.model.nf4 import nf4_linear_forward

    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    import types

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.dtype == torch.uint8:
            module.forward = types.MethodType(nf4_linear_forward if fused else _linear4bit_dequant_once, module)
            count += 1
    return count


# Inside torch.compile, the adapter's output added by an elementwise kernel rather than addmm (bench.py addmm=1: off).
ADD_UNDER_COMPILE = True


def lean_lora_forward(self, x, *args, **kwargs):
    """peft's LoRA Linear forward for the common case (one plain adapter, not merged), in fewer kernels.

    peft computes `result + lora_B(lora_A(dropout(x.to(fp32)))) * scaling`: an fp32 copy of x (and for 4-bit layers a
    clone of the base output), dropout over that copy, casts back, a scale and an add, about nine kernels per linear
    and pass. With ~200 adapted linears and three passes a step (checkpointing recomputes the forward) the step is
    bound by launching them. Here dropout runs on x as it comes (bf16 under autocast) and the scale and the add go
    into one addmm (fp32 accumulation, one rounding): the same function, five kernels. Under torch.compile the add
    is left to inductor instead (see ADD_UNDER_COMPILE). Adapter weights, their
    names and peft's save format are untouched; anything else (several or disabled adapters, DoRA, merged weights,
    mixed dtypes without autocast) takes peft's own forward.
    """
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    lora_a = self.lora_A[name].weight if name in self.lora_A else None
    usual = (lora_a is not None and not self.disable_adapters and not self.merged and name not in self.lora_variant
             and "adapter_names" not in kwargs and not args)
    autocast = torch.is_autocast_enabled(x.device.type)
    if not usual or not (autocast or x.dtype == lora_a.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, **kwargs)
    if not autocast and result.dtype != x.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    lora_b = self.lora_B[name].weight
    low_rank = torch.nn.functional.linear(self.lora_dropout[name](x), lora_a)
    if ADD_UNDER_COMPILE and torch.compiler.is_compiling() and not hasattr(self.base_layer.weight, "quant_state"):
        # Compiled, the scale and the add go into the next elementwise kernel (RoPE, SwiGLU, the residual), which
        # reads the base output anyway; addmm would first copy the base output into its own (a device-to-device
        # copy per linear and pass: 6 ms of a 200 ms Llama-7B LoRA step). The price: the recomputed layer holds
        # base and adapter outputs apart until its backward, +0.2 GiB at 7B. 4-bit layers, run for memory, keep
        # addmm (Llama-7B QLoRA: 6.10 GiB against 5.91, BENCHMARKS.md round 6).
        return result + torch.nn.functional.linear(low_rank, lora_b) * self.scaling[name]
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]), lora_b.t(),
                      alpha=self.scaling[name])
    return out.view(result.shape)


def use_lean_lora(model, on: bool = True) -> int:
    """Give every peft LoRA Linear layer (bf16 and 4-bit) of `model` the lean forward (or peft's back); returns how many."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    import types

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A") and isinstance(module.base_layer, torch.nn.Module):
            if type(module).__name__ not in ("Linear", "Linear4bit", "Linear8bitLt"):
                continue
            if on:
                module.forward = types.MethodType(lean_lora_forward, module)
            else:
                module.__dict__.pop("forward", None)
            count += 1
    return count


class EmbeddingOnCPU(torch.nn.Module):
    """A frozen input embedding kept in CPU memory: a step looks up its batch's rows there and copies them over.

    In a QLoRA model the input embedding is the largest tensor left on the GPU besides lm_head (0.71 GiB of bf16 for
    InternLM2-7B's 92k vocabulary, against 3.3 GiB for all 4-bit weights), yet a step reads only its own rows: 16 MiB
    for 2k tokens of a 4096-wide model. The lookup is the same F.embedding, so outputs are bit for bit equal. The
    weight is a plain attribute, neither parameter nor buffer: `model.to()`, state_dict and DDP leave it alone (LoRA
    checkpoints hold only the adapters), and `next(model.parameters()).device` still names the GPU.
    """

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device):
        super().__init__()
        self.cpu_weight = embedding.weight.detach().to("cpu")
        self.device = torch.device(device)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self._forward_hooks = embedding._forward_hooks  # e.g. peft's "inputs require grad" hook

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu").flatten()
        on_gpu = self.device.type == "cuda"
        # Gathered into pinned memory, the copy to the GPU runs at full speed and does not hold the CPU up; the
        # caching host allocator keeps the buffer from reuse until the copy is done.
        rows = torch.empty((ids.numel(), self.embedding_dim), dtype=self.cpu_weight.dtype, pin_memory=on_gpu)
        torch.index_select(self.cpu_weight, 0, ids, out=rows)
        return rows.view(*input_ids.shape, -1).to(self.device, non_blocking=on_gpu)


def keep_embeddings_on_cpu(model, device) -> int:
    """Move `model`'s input embedding to CPU memory (EmbeddingOnCPU) when it is a plain frozen nn.Embedding that
    lm_head does not share; returns the bytes freed on `device` (0 when it stays)."""
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if type(embedding) is not torch.nn.Embedding or embedding.weight.requires_grad:
        return 0
    if output is not None and output.weight.data_ptr() == embedding.weight.data_ptr():
        return 0  # tied to lm_head, which the loss needs on the GPU
    freed = embedding.weight.numel() * embedding.weight.element_size()
    model.set_input_embeddings(EmbeddingOnCPU(embedding, device))
    return freed


def mark_quant_states_static(model) -> int:
    """Tell torch.compile that the 4-bit weights' scales and codebooks stay at one address (they are plain tensors,
    not parameters), so CUDA graphs read them in place instead of copying each one in before every replay."""
    count = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        for holder in (state, getattr(state, "state2", None)):
            for tensor in vars(holder).values() if holder is not None else ():
                if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                    torch._dynamo.mark_static_address(tensor)
                    count += 1
    return count


def compute_dtype(model) -> torch.dtype:
    config = getattr(model, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


def apply_fast_path(model, cfg, device) -> dict:
    """Switch on the levers `cfg` allows on `device`; returns {lever: on/off or a note}, for the log."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    graphed = cfg.resolved_cuda_graphs(on_gpu)
    report = {}
    if on_gpu and cfg.use_varlen_attention:
        from tunelab.model import attention
        from tunelab.model.attention import enable_varlen_attention

        enable_varlen_attention(model)
        attention.USE_CUDNN_FOR_WHOLE_ROWS = bool(cfg.cudnn_attention)
        attention.STATIC_SHAPES = graphed
        report["varlen_attention"] = "on" + (", cuDNN for rows of one sample" if cfg.cudnn_attention else "")
    else:
        report["varlen_attention"] = "off (sdpa with a block-diagonal mask from position_ids)"
    dtype = compute_dtype(model)
    if on_gpu and dtype in (torch.bfloat16, torch.float16):
        saved = downcast_frozen_weights(model, dtype)
        report["frozen_weights"] = f"{dtype} (saved {saved / 2**30:.2f} GiB)"
    if on_gpu and cfg.qlora_dequant_once and cfg.resolved_gradient_checkpointing():
        fused = cfg.qlora_fused_dequant and cfg.use_compile
        report["dequant_once"] = (f"{dequantize_once_per_pass(model, fused)} 4-bit layers"
                                  + (", fused by compile" if fused else ""))
    if on_gpu and cfg.resolved_embeddings_on_cpu():
        freed = keep_embeddings_on_cpu(model, device)
        report["embeddings_on_cpu"] = f"{freed / 2**30:.2f} GiB freed" if freed else "no (trained or tied to lm_head)"
    if on_gpu and cfg.lean_lora:
        report["lean_lora"] = f"{use_lean_lora(model)} LoRA linears"
    report["chunked_loss"] = f"on, {cfg.loss_chunk_size} rows a chunk" if cfg.use_chunked_loss else "off"
    if cfg.use_chunked_loss and cfg.use_compile and on_gpu:
        model._tunelab_compile_loss = True  # read by tunelab.model.loss: the softmax and its gradient compiled
        report["chunked_loss"] += ", its softmax gradient compiled"
    if graphed:
        mark_quant_states_static(model)
    report.update(run_decoder_layers(_decoder_layers(model) or [], compile=cfg.use_compile and on_gpu,
                                     offload=cfg.offload_activations and on_gpu,
                                     mlp_chunk_size=cfg.resolved_mlp_chunk_size(),
                                     cuda_graphs=graphed))
    log.info("fast path: %s", report)
    return report
