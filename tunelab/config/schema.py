"""The settings of a training run: one typed dataclass, one place.

A config file is plain Python whose top-level names are these fields (see `tunelab copy-cfg`).
`tunelab.config.loader.load_config` validates a file against this schema.
Field names follow the XTuner tutorials so their instructions carry over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Optional, Union

Method = Literal["full", "lora", "qlora"]


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    pretrained_model_name_or_path: str = "internlm/internlm2-chat-1_8b"
    """A hub id or a local directory with config.json, weights and tokenizer files."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code. Off by default: only enable for repos you trust."""
    method: Method = "qlora"
    """'full' fine-tunes every weight; 'lora' trains adapters on a bf16 base; 'qlora' on a 4-bit base."""
    quant_bits: Optional[int] = None
    """4 or 8 to quantise the frozen base (bitsandbytes). None: 4 for qlora, unquantised otherwise."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype. 'auto': bf16 where the GPU supports it, else fp16 with loss scaling; fp32 on CPU."""

    # --- LoRA ---------------------------------------------------------------------------------
    lora_r: int = 64
    """Rank of the LoRA matrices: more capacity, more memory."""
    lora_alpha: int = 16
    """LoRA scaling numerator: updates are scaled by lora_alpha / lora_r (or / sqrt(r) with rsLoRA)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input (0 is faster)."""
    lora_target_modules: Union[str, list] = "all-linear"
    """Module names (e.g. ['q_proj', 'v_proj']) or 'all-linear'."""
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train alongside LoRA (peft's `bias`)."""
    lora_modules_to_save: Optional[list] = None
    """Modules trained in full and saved with the adapter, e.g. ['lm_head', 'embed_tokens']."""
    use_dora: bool = False
    """DoRA: weight-decomposed LoRA (peft)."""
    use_rslora: bool = False
    """rsLoRA: scale by lora_alpha / sqrt(r), steadier at high rank."""

    # --- data ---------------------------------------------------------------------------------
    data_path: Union[str, list, None] = "tatsu-lab/alpaca"
    """A file (.json/.jsonl/.parquet/.csv/.txt), a directory of them, or a `datasets` name/directory.
    A list mixes several: [{'path': ..., 'format': ..., 'ratio': 1.0}, ...] or plain paths."""
    data_format: str = "auto"
    """'auto', 'alpaca', 'messages', 'sharegpt', 'conversation', 'text', 'agent'."""
    dataset_map_fn: Optional[Callable] = None
    """Optional function record -> record applied before format detection (define it in the config file)."""
    prompt_template: str = "internlm2_chat"
    """Chat template name (`tunelab.data.templates`); 'hf' uses the tokenizer's own chat_template."""
    SYSTEM: str = ""
    """System prompt for training samples that have none, evaluation and chat."""
    max_length: int = 2048
    """Tokens per sample and per packed row; longer samples are cut."""
    pack_to_max_length: bool = True
    """Concatenate samples into rows of max_length; samples never attend to each other."""
    shuffle_before_pack: bool = True
    """Shuffle samples (seeded) before packing them into rows."""
    train_on: Literal["assistant", "all"] = "assistant"
    """'assistant': loss on replies only (plus their end-of-turn token); 'all': every token (pretraining)."""
    skip_invalid: bool = False
    """Skip and count malformed records instead of stopping with an error."""
    eval_split_ratio: float = 0.0
    """Hold out this fraction of the data to report eval loss at each evaluation."""
    num_proc: int = 1
    """Processes used for tokenising (tunelab preprocess)."""

    # --- preference training (docs/PREFERENCE.md) ----------------------------------------------
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto", "reward"] = "sft"
    """What the run trains: 'sft' supervised fine-tuning; on preference pairs 'dpo', 'orpo', 'simpo' or 'reward'
    (a reward model: a scalar head, Bradley-Terry loss); 'kto' on replies labelled desirable or not."""
    beta: float = 0.1
    """Preference strength: DPO / KTO's beta (distance from the reference), ORPO's lambda (weight of the odds-ratio
    term), SimPO's beta (the SimPO paper uses 2-10)."""
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """DPO's loss: 'sigmoid' (the DPO paper), 'ipo' (on mean token log-probabilities), 'hinge' (SLiC)."""
    label_smoothing: float = 0.0
    """DPO (sigmoid) and SimPO: the assumed fraction of pairs whose labels are flipped (conservative DPO)."""
    simpo_gamma: float = 0.5
    """SimPO's target margin between the chosen and the rejected reply."""
    kto_desirable_weight: float = 1.0
    """KTO: weight of the loss of desirable replies."""
    kto_undesirable_weight: float = 1.0
    """KTO: weight of the loss of undesirable replies (raise it when they are fewer)."""
    reference: Literal["auto", "adapters_off", "copy", "precomputed"] = "auto"
    """DPO / KTO's reference model: 'adapters_off' the base with the LoRA adapters switched off (lora / qlora, no
    second copy); 'copy' a frozen copy (full); 'precomputed' its log-probabilities computed once before training.
    'auto': adapters_off for lora / qlora, for full a copy where the memory plan says it fits, else precomputed."""

    # --- optimisation -------------------------------------------------------------------------
    batch_size: int = 1
    """Rows per device per step (a row is one packed sequence of max_length when packing)."""
    accumulative_counts: int = 16
    """Micro-batches per optimiser step (gradient accumulation)."""
    lr: float = 2e-4
    """Peak learning rate (after warm-up)."""
    betas: tuple = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    max_epochs: int = 3
    """Passes over the training data."""
    max_steps: Optional[int] = None
    """Stop after this many optimiser steps (overrides max_epochs when set)."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up from 0."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate shape after warm-up."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """AdamW (fused on GPU), or bitsandbytes' 8-bit / paged 8-bit AdamW."""
    fp32_master_weights: bool = True
    """Trained weights in fp32 on a GPU, computed in bf16/fp16 under autocast (what matters: full fine-tuning; LoRA
    adapters are fp32 anyway). A bf16 weight rounds away updates below ~1/256 of itself, which lr 2e-5 updates
    mostly are. Full fine-tuning checkpoints are then fp32 (exact resume; `convert pth_to_hf` writes bf16).
    False: bf16 weights and AdamW states, 8 bytes a parameter less."""
    gradient_checkpointing: Optional[bool] = None
    """None: on for lora/qlora, off for full."""
    seed: int = 0
    """Seed for data order, initialisation and dropout: the same seed repeats the run."""

    # --- saving, logging, evaluation ----------------------------------------------------------
    save_steps: int = 500
    """Save a checkpoint every this many optimiser steps (the final step is always saved)."""
    save_total_limit: int = 2
    """How many iter_N checkpoints to keep (-1 keeps all)."""
    logging_steps: int = 10
    """Log loss, lr, grad norm, tokens/s and memory every this many steps."""
    evaluation_freq: int = 500
    """Answer evaluation_inputs every this many steps (and once before training)."""
    evaluation_inputs: list = field(default_factory=lambda: ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"])
    """Questions the model answers during training, so you can watch it learn."""
    eval_max_new_tokens: int = 128
    """Longest answer to an evaluation question, in tokens."""
    report_to: list = field(default_factory=list)
    """Experiment trackers that also get every logged number and the settings: any of 'tensorboard', 'wandb',
    'mlflow', 'swanlab' (each needs its package; where each writes: docs/TRAINING.md). `tunelab board` needs none."""
    use_tensorboard: bool = False
    """Also write TensorBoard logs (the same as 'tensorboard' in report_to)."""
    check_memory: bool = True
    """On a GPU, before loading: stop when the memory estimate (`tunelab plan`) is more than the card, naming settings
    that would fit; a run that fits only without the allocator's usual slack starts with a warning. False: start
    anyway (a warning still says what the estimate is)."""

    # --- speed (each part of the fast path can be switched off) -------------------------------
    use_varlen_attention: bool = True
    """Attention over packed rows with the flash varlen kernel (GPU); masks elsewhere."""
    use_chunked_loss: bool = True
    """Cross-entropy over trained tokens only, in chunks, each chunk's gradient taken as it goes: never builds
    full-vocabulary logits. False: plain full logits (more memory, slower)."""
    loss_chunk_size: int = 4096
    """Most trained positions per chunk of the chunked loss (fewer for large vocabularies: 2^25 logits a chunk with
    a frozen lm_head, 2^29 with a trained one)."""
    use_compile: bool = True
    """torch.compile the decoder layers (GPU only): 1.4-2x faster steps; the first step takes 10-20 s longer."""
    lean_lora: bool = True
    """A LoRA forward with fewer kernels than peft's (same maths, same adapter files; GPU only)."""
    qlora_dequant_once: bool = True
    """QLoRA: dequantise each 4-bit weight twice a step instead of three times (needs gradient checkpointing)."""
    cudnn_attention: bool = True
    """Rows that each hold one whole sample (no packing, e.g. long-context training) use cuDNN's attention kernel:
    1.7-2.3x faster than flash at 8k-128k tokens on an H100, same accuracy (GPU only; packed rows keep varlen flash)."""
    qlora_fused_dequant: bool = True
    """QLoRA with use_compile: dequantise 4-bit weights with plain torch ops that torch.compile fuses into one kernel
    (bitsandbytes' numbers, bit for bit) instead of bitsandbytes' three kernels a weight."""
    offload_activations: bool = False
    """Long context: keep each layer's checkpointed input in CPU memory until backward (GPU only; needs gradient
    checkpointing). Frees hidden_size x 2 bytes x layers a token, e.g. 256 KiB a token for a 7B/8B model."""
    cuda_graphs: Optional[bool] = None
    """With use_compile: replay each compiled layer's forward and backward as CUDA graphs (torch.compile's
    "reduce-overhead"), so the CPU launches one graph instead of hundreds of kernels (Llama-7B QLoRA 2k: 3.0x the
    plain loop instead of 2.5x). Batches are padded to max_length and sample boundaries to a few sizes, one graph
    each; a new size compiles once (~15 s). GPU only; not with offload_activations or MLP slices. None: on when
    pack_to_max_length is (rows are max_length wide anyway) and training runs in one process."""
    embeddings_on_cpu: Optional[bool] = None
    """Keep a frozen input embedding in CPU memory and look up each batch's rows there (GPU only; the same numbers).
    Frees vocab_size x hidden_size x 2 bytes of GPU memory, e.g. 0.71 GiB for InternLM2-7B, for a copy of a few MiB
    a step. None: on for lora / qlora (not when the embedding is trained or shared with lm_head)."""
    mlp_chunk_size: Optional[int] = 8192
    """Long context: when max_length is longer than this, each MLP computes this many tokens at a time (recomputed
    in backward; one more MLP forward a step). None: never."""

    # --- distribution --------------------------------------------------------------------------
    deepspeed: Optional[str] = None
    """None, 'zero1', 'zero2', 'zero2_offload', 'zero3', 'zero3_offload' or a DeepSpeed JSON path."""
    fsdp: bool = False
    """Shard with PyTorch FSDP2 across GPUs (or pass --fsdp)."""

    def resolved_quant_bits(self) -> Optional[int]:
        if self.quant_bits is not None:
            return self.quant_bits
        return 4 if self.method == "qlora" else None

    def resolved_gradient_checkpointing(self) -> bool:
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return self.method in ("lora", "qlora")

    def resolved_cuda_graphs(self, on_gpu: bool) -> bool:
        """CUDA graphs are in use: asked for (or left to None with packed rows in one process), compiled, on a GPU."""
        wanted = self.cuda_graphs
        if wanted is None:  # torchrun / deepspeed set WORLD_SIZE; graphs with several processes are untested
            wanted = self.pack_to_max_length and int(os.environ.get("WORLD_SIZE", "1")) == 1
        return bool(wanted and self.use_compile and on_gpu)

    def resolved_embeddings_on_cpu(self) -> bool:
        if self.embeddings_on_cpu is not None:
            return self.embeddings_on_cpu
        return self.method in ("lora", "qlora")

    def resolved_report_to(self) -> list[str]:
        """The trackers in use: report_to, plus 'tensorboard' when use_tensorboard (the older switch) is on."""
        return list(dict.fromkeys([*self.report_to, *(["tensorboard"] if self.use_tensorboard else [])]))

    def resolved_mlp_chunk_size(self) -> Optional[int]:
        """The MLP slice in use: mlp_chunk_size when max_length is longer than it, else None (no slices)."""
        return self.mlp_chunk_size if self.mlp_chunk_size and self.max_length > self.mlp_chunk_size else None


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Settings as plain data (callables become their names), e.g. for the work dir's resolved config."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if callable(value):
            value = getattr(value, "__name__", repr(value))
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out
