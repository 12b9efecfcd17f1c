"""The fast path's levers on the model, switched on after loading as the plan says (`tunelab.model.plan`).

`apply_fast_path(model, plan, device)` is called by the model loader for training. Each lever keeps the maths of the
plain path: tests/test_fast_*.py check that on CPU, scripts/gpu_check.py on a GPU (loss and adapter gradients).

  * varlen attention over packed rows (`tunelab.model.attention`);
  * frozen weights kept in the compute dtype: peft's prepare_model_for_kbit_training upcasts every non-quantised
    weight (embeddings, lm_head, norms) to fp32; frozen ones gain nothing from it and cost memory and fp32 matmuls,
    so they go back to bf16/fp16;
  * QLoRA's 4-bit weight dequantised in ops compile fuses, and (a setting) kept for backward (`patch_4bit_linears`);
  * the lean LoRA forward (`lean_lora_forward`), its dropout masks a hash (`tunelab.model.dropout`); compiled
    4-bit layers over many tokens add the adapter to the weight (`nf4.nf4_linear_with_adapter`);
  * a frozen input embedding looked up in CPU memory (`EmbeddingOnCPU`);
  * how each decoder layer runs: checkpointed (its input optionally in CPU memory), compiled, replayed as CUDA
    graphs, its MLP in slices (`tunelab.model.layers`).
The loss reads the plan itself (`tunelab.model.loss.causal_lm_objective`).
"""

from __future__ import annotations

import logging
import types

import torch

from tunelab.model.dropout import use_hashed_dropout
from tunelab.model.layers import run_decoder_layers
from tunelab.model.nf4 import nf4_linear_forward, nf4_linear_forward_dequantizing_again, nf4_linear_with_adapter
from tunelab.model.parts import decoder_layers

log = logging.getLogger(__name__)


def downcast_frozen_weights(model, dtype: torch.dtype) -> int:
    """Cast frozen fp32 floating-point weights to `dtype`; returns how many bytes that saved."""
    saved = 0
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            saved += param.numel() * (4 - torch.finfo(dtype).bits // 8)
            param.data = param.data.to(dtype)
    return saved


DEQUANTIZES_AGAIN = "_tunelab_dequantizes_again"
"""Set on a 4-bit linear layer by `patch_4bit_linears`: its forward is `nf4.nf4_linear_forward_dequantizing_again`."""


def patch_4bit_linears(model, *, fused: bool, keep_for_backward: bool) -> int:
    """Give every bitsandbytes 4-bit linear layer of `model` the forward the plan chose; returns how many.

    fused: the layers run compiled, where tunelab.model.nf4's plain-op dequantisation fuses into one kernel instead
    of bitsandbytes' three custom-op calls (code outside the compiled layers, such as the MLP slices at long context
    and generation, still gets bitsandbytes' kernel: `nf4.dequantize_4bit_weight`).
    keep_for_backward: the dequantised weight stays for the layer's backward (`nf4.nf4_linear_forward`): with
    checkpointing the forward runs twice, so two dequantisations a step instead of three. False: backward dequantises
    again, which bitsandbytes' own forward already does when not fused.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    if keep_for_backward:
        forward = nf4_linear_forward
    elif fused:
        forward = nf4_linear_forward_dequantizing_again
    else:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.dtype == torch.uint8:
            module.forward = types.MethodType(forward, module)
            # said on the layer, for the LoRA forward: torch 2.11's dynamo does not see the patched forward itself
            setattr(module, DEQUANTIZES_AGAIN, forward is nf4_linear_forward_dequantizing_again)
            count += 1
    return count


def lean_lora_forward(self, x, *args, **kwargs):
    """peft's LoRA Linear forward for the common case (one plain adapter, not merged), in fewer kernels.

    peft computes `result + lora_B(lora_A(dropout(x.to(fp32)))) * scaling`: an fp32 copy of x (and for 4-bit layers a
    clone of the base output), dropout over that copy, casts back, a scale and an add, about nine kernels per linear
    and pass. With ~200 adapted linears and three passes a step (checkpointing recomputes the forward) the step is
    bound by launching them. Here dropout runs on x as it comes (bf16 under autocast) and the scale and the add go
    into one addmm (fp32 accumulation, one rounding): the same function, five kernels. Under torch.compile the add
    of a bf16 layer is left to inductor instead (see below), and a 4-bit layer without dropout over many tokens adds
    the adapter to its dequantised weight and runs one matmul (`nf4.nf4_linear_with_adapter`). Adapter weights, their
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
    lora_b = self.lora_B[name].weight
    if torch.compiler.is_compiling() and not kwargs and _merges_into_the_weight(self.base_layer,
                                                                                 self.lora_dropout[name], x):
        # a compiled 4-bit layer over many tokens: the adapter is added to the weight, one matmul (nf4.py)
        return nf4_linear_with_adapter(self.base_layer, x, lora_a, lora_b, self.scaling[name])
    result = self.base_layer(x, **kwargs)
    if not autocast and result.dtype != x.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    low_rank = torch.nn.functional.linear(self.lora_dropout[name](x), lora_a)
    if torch.compiler.is_compiling() and not hasattr(self.base_layer.weight, "quant_state"):
        # Compiled, the scale and the add go into the next elementwise kernel (RoPE, SwiGLU, the residual), which
        # reads the base output anyway; addmm would first copy the base output into its own (a device-to-device
        # copy per linear and pass: 6 ms of a 200 ms Llama-7B LoRA step). The price: the recomputed layer holds
        # base and adapter outputs apart until its backward, +0.2 GiB at 7B. 4-bit layers, run for memory, keep
        # addmm where they do not merge (Llama-7B QLoRA: 5.91 GiB against 6.10 with the add).
        return result + torch.nn.functional.linear(low_rank, lora_b) * self.scaling[name]
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]), lora_b.t(),
                      alpha=self.scaling[name])
    return out.view(result.shape)


WEIGHT_PASS_COST = 1.0
"""How much a pass over a weight costs against one over an activation of the same size, fitted on an H200. With the
adapter's product added inside the dequantisation's kernel, merging every layer is faster at every length measured:
Llama-3.1-8B QLoRA r32 +1.2% at 2k tokens, +0.5% at 4k (BENCHMARKS.md, "QLoRA merges from 2k"). Below 2k it is not
measured, so the cost is the largest that still merges every layer at 2k: a 4096-wide layer merges from about 820
tokens a row, an 8B MLP's down projection from 1,900."""


def _merges_into_the_weight(base_layer, dropout, x) -> bool:
    """Whether a LoRA layer runs as one matmul by its 4-bit weight plus the adapter (`nf4.nf4_linear_with_adapter`):
    a base layer whose backward dequantises again (the plan's default for QLoRA), no LoRA dropout (the adapter sees
    the x the base layer sees), and enough tokens that the passes over activations it saves (x read by lora_A, the
    output copied and added to: about rows * (in + 4 out)) outweigh the passes over the weight it adds (about
    in * out, times WEIGHT_PASS_COST). Decided when compile traces the layer, not each step."""
    no_dropout = isinstance(dropout, torch.nn.Identity) or getattr(dropout, "p", None) == 0
    if not (getattr(base_layer, DEQUANTIZES_AGAIN, False) and no_dropout):  # first: only a Linear4bit has the flag
        return False
    return merges_into_the_weight(x.numel() // base_layer.in_features, base_layer.in_features,
                                  base_layer.out_features)


def merges_into_the_weight(tokens: int, n_in: int, n_out: int) -> bool:
    """Whether `tokens` rows through an n_in -> n_out 4-bit LoRA layer without dropout run merged (see
    _merges_into_the_weight; `tunelab.model.memory` asks it too)."""
    return tokens * (n_in + 4 * n_out) >= WEIGHT_PASS_COST * n_in * n_out


def use_lean_lora(model, on: bool = True, hashed_dropout: bool = False) -> int:
    """Give every peft LoRA Linear layer (bf16 and 4-bit) of `model` the lean forward (or peft's back); returns how many.

    hashed_dropout: its dropout modules become `HashedDropout` (their masks a hash of position and a seed, cheaper
    than torch's Philox numbers); on=False gives torch's back. Every layer keeps the one
    `lean_lora_forward` function: torch.compile guards on it, and a function per layer would recompile per layer.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A") and isinstance(module.base_layer, torch.nn.Module):
            if type(module).__name__ not in ("Linear", "Linear4bit", "Linear8bitLt"):
                continue
            if on:
                module.forward = types.MethodType(lean_lora_forward, module)
            else:
                module.__dict__.pop("forward", None)
            use_hashed_dropout(module.lora_dropout, on and hashed_dropout)
            count += 1
    return count


def _has_lora_variant(model) -> bool:
    """A LoRA layer of `model` has a peft variant (DoRA), which `lean_lora_forward` leaves to peft's forward."""
    return any(getattr(module, "lora_variant", None) for module in model.modules())


class EmbeddingOnCPU(torch.nn.Module):
    """A frozen input embedding kept in CPU memory: a step looks up its batch's rows there and copies them over.

    In a QLoRA model the input embedding is the largest tensor left on the GPU besides lm_head (0.71 GiB of bf16 for
    InternLM2-7B's 92k vocabulary, against 3.3 GiB for all 4-bit weights), yet a step reads only its own rows: 16 MiB
    for 2k tokens of a 4096-wide model. The lookup is the same F.embedding, so outputs are bit for bit equal. The
    weight is a plain attribute, neither parameter nor buffer: `model.to()`, state_dict and DDP leave it alone (LoRA
    checkpoints hold only the adapters), and `next(model.parameters()).device` still names the GPU.

    Given ids on the GPU, the forward must copy them back first, which waits for all the GPU work queued before,
    and the GPU then idles while the CPU gathers the rows (2-9 ms at 8k tokens). So whoever moves a batch to the
    GPU hands over its CPU ids too (`look_up_ahead`, through `batch_to_device`): the rows are gathered then, while
    the GPU is still busy, and the forward given those very ids on the GPU takes them.
    """

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device):
        super().__init__()
        self.cpu_weight = embedding.weight.detach().to("cpu")
        self.device = torch.device(device)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self._forward_hooks = embedding._forward_hooks  # e.g. peft's "inputs require grad" hook
        self._ahead: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids on the device, their rows there)

    def look_up_ahead(self, cpu_ids: torch.Tensor, device_ids: torch.Tensor) -> None:
        """Gather the rows of `cpu_ids` now and start their copy; the forward called with `device_ids` (the same ids,
        that tensor itself) returns them. One batch ahead at a time; a forward given other ids looks its own up."""
        self._ahead = (device_ids, self._look_up(cpu_ids))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._ahead is not None and self._ahead[0] is input_ids:
            rows, self._ahead = self._ahead[1], None
            return rows
        return self._look_up(input_ids.to("cpu"))

    def _look_up(self, cpu_ids: torch.Tensor) -> torch.Tensor:
        on_gpu = self.device.type == "cuda"
        # Gathered into pinned memory, the copy to the GPU runs at full speed and does not hold the CPU up; the
        # caching host allocator keeps the buffer from reuse until the copy is done.
        ids = cpu_ids.flatten()
        rows = torch.empty((ids.numel(), self.embedding_dim), dtype=self.cpu_weight.dtype, pin_memory=on_gpu)
        torch.index_select(self.cpu_weight, 0, ids, out=rows)
        return rows.view(*cpu_ids.shape, -1).to(self.device, non_blocking=on_gpu)


def batch_to_device(batch: dict, device: torch.device, embedding: torch.nn.Module | None = None) -> dict:
    """`batch`'s tensors on `device` (copies started, not waited for). `embedding`: the model's input embedding
    where the plan gathers its rows ahead (`FastPathPlan.embedding_rows_ahead`); if it lives in CPU memory, the rows
    of these ids are gathered now, from the CPU ids (`EmbeddingOnCPU.look_up_ahead`)."""
    moved = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    if isinstance(embedding, EmbeddingOnCPU) and "input_ids" in batch:
        embedding.look_up_ahead(batch["input_ids"], moved["input_ids"])
    return moved


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


def apply_fast_path(model, plan, device) -> dict:
    """Switch on the levers `plan` (a `tunelab.model.plan.FastPathPlan`) names on `model`; returns what was done, for
    the log ({lever: what it did})."""
    if not plan.enabled:
        return {"fast_path": "off"}
    report = {}
    if plan.varlen_attention:
        from tunelab.model.attention import enable_varlen_attention

        enable_varlen_attention(model, static_shapes=plan.cuda_graphs)
        report["varlen_attention"] = ("on, cuDNN for rows of one sample" if plan.on_gpu
                                      else "on (sdpa a sample at a time on the CPU)")
        if plan.sequence_parallel > 1:
            report["sequence_parallel"] = (f"each row over {plan.sequence_parallel} ranks, attention over whole rows "
                                           "(heads exchanged by all-to-all)")
    else:
        report["varlen_attention"] = "off (sdpa with a block-diagonal mask from position_ids)"
    dtype = compute_dtype(model)
    if plan.frozen_weights_in_compute_dtype and dtype in (torch.bfloat16, torch.float16):
        saved = downcast_frozen_weights(model, dtype)
        report["frozen_weights"] = f"{dtype} (saved {saved / 2**30:.2f} GiB)"
    patched = patch_4bit_linears(model, fused=plan.fused_dequant, keep_for_backward=plan.dequantize_once)
    if patched:
        report["dequant"] = (f"{patched} 4-bit layers, "
                             + ("dequantised once a pass" if plan.dequantize_once else "dequantised again in backward")
                             + (", fused by compile" if plan.fused_dequant else ""))
    if plan.embeddings_on_cpu:
        freed = keep_embeddings_on_cpu(model, device)
        report["embeddings_on_cpu"] = f"{freed / 2**30:.2f} GiB freed" if freed else "no (trained or tied to lm_head)"
    if plan.lean_lora:
        report["lean_lora"] = (f"{use_lean_lora(model, hashed_dropout=plan.hashed_dropout)} LoRA linears"
                               + (", dropout masks hashed" if plan.hashed_dropout else "")
                               + (", but DoRA layers run peft's own forward" if _has_lora_variant(model) else ""))
    report["chunked_loss"] = (f"on, {plan.loss_chunk_size} rows a chunk" if plan.chunked_loss
                              else "off: lm_head has a LoRA adapter, so the loss takes full logits through it")
    if plan.compiled_loss:
        report["chunked_loss"] += ", its softmax gradient compiled"
    if plan.cuda_graphs:
        mark_quant_states_static(model)
    report.update(run_decoder_layers(decoder_layers(model), plan))
    log.info("fast path: %s", report)
    return report
