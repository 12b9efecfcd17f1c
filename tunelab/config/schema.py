"""The settings of a training run: one typed dataclass, each field with its default and docstring.

A config file is plain Python whose top-level names are these fields (see `tunelab copy-cfg`); `tunelab.config.loader`
runs the file and hands each value to `tunelab.config.checks.check_setting`. A field's type annotation says what kind
of value it takes, its `Rule` (field metadata, `tunelab.config.rules`) what values are allowed;
`checks.combination_errors` says which settings exclude each other. Field names follow the XTuner tutorials so their
instructions carry over.
"""

from __future__ import annotations

import ast
import functools
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from tunelab.config.rules import (ACTIVATION, BETAS, DATA_FORMAT, DATA_PATH, DEEPSPEED, DPO_LOSS, EVALUATION_IMAGES,
                                  EVALUATION_INPUTS, POSITIVE, POSITIVE_NUMBER, POSITIVE_OR_NONE, PROMPT_TEMPLATE,
                                  MODULE_NAMES, QUANT_BITS, REFERENCE, REPORT_TO, TARGET_MODULES,
                                  TRAINABLE_MODULES, Rule, fraction, setting)


Method = Literal["full", "lora", "qlora"]
Objective = Literal["sft", "dpo", "orpo", "simpo", "kto", "reward"]


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    pretrained_model_name_or_path: str = "internlm/internlm2-chat-1_8b"
    """A hub id or a local directory with config.json, weights and tokenizer files."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code. Off by default: only enable for repos you trust."""
    method: Method = "qlora"
    """'full' fine-tunes every weight (or those trainable_layers, trainable_modules and trainable_extra_modules
    name); 'lora' trains adapters on a bf16 base; 'qlora' on a 4-bit base."""
    quant_bits: Optional[int] = setting(None, QUANT_BITS)
    """4 or 8 to quantise the frozen base (bitsandbytes). None: 4 for qlora, unquantised otherwise."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype. 'auto': bf16 where the GPU supports it, else fp16 with loss scaling; fp32 on CPU."""

    # --- LoRA ---------------------------------------------------------------------------------
    lora_r: int = setting(64, POSITIVE)
    """Rank of the LoRA matrices: more capacity, more memory."""
    lora_alpha: int = setting(16, POSITIVE)
    """LoRA scaling numerator: updates are scaled by lora_alpha / lora_r (or / sqrt(r) with rsLoRA)."""
    lora_dropout: float = setting(0.1, fraction())
    """Dropout on the LoRA input (0 is faster)."""
    lora_target_modules: Union[str, list] = setting("all-linear", TARGET_MODULES)
    """Module names (e.g. ['q_proj', 'v_proj']; 'lm_head' or 'embed_tokens' too), 'all-linear' (every linear layer
    but lm_head), or a string read as a regular expression over whole module names, as peft reads it (e.g.
    r'.*\\.(q|v)_proj'; not for LLaVA runs). An entry that matches no module is an error."""
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train alongside LoRA (peft's `bias`): 'all', or 'lora_only' those of the adapted layers;
    saved with the adapter and merged. LoRA settings (this, use_dora, use_rslora, lora_modules_to_save) with
    method = 'full' are an error."""
    lora_modules_to_save: Optional[list] = setting(None, MODULE_NAMES)
    """Modules trained in full and saved with the adapter, e.g. ['lm_head', 'embed_tokens'] (new tokens). A name
    that matches no module, or one also in lora_target_modules (peft would leave its adapter out), is an error."""
    use_dora: bool = False
    """DoRA: weight-decomposed LoRA (peft), also on a 4-bit base (on an 8-bit one on a GPU only); it runs peft's own
    forward (slower than LoRA)."""
    use_rslora: bool = False
    """rsLoRA: scale by lora_alpha / sqrt(r), steadier at high rank."""
    loraplus_lr_ratio: Optional[float] = setting(None, Rule(lambda v: v is None or v > 0, "None or a positive number"))
    """LoRA+: the B matrices (and every trained 1-D tensor: biases, DoRA magnitudes, norms) learn at lr x this ratio
    (the LoRA+ paper uses 16); A matrices and modules_to_save weights at lr. None: every trained tensor at lr."""

    # --- partial fine-tuning (method = 'full'; LLaMA-Factory's finetuning_type: freeze) ---------------
    # Settings of method = 'full', not a method of their own: what trains is trained exactly as full fine-tuning
    # trains it (fp32 master weights, whole-model checkpoints and exports, a frozen reference copy), and the rest is
    # frozen as LoRA's base is (kept in the compute dtype, no gradient, no optimiser state). Once any of the three is
    # set, only what they name trains.
    trainable_layers: Optional[int] = None
    """How many decoder layers train (LLaMA-Factory's freeze_trainable_layers): N > 0 the last N, N < 0 the first
    |N|, 0 none (then trainable_extra_modules names what trains). None: every layer. More than the model has is an
    error naming its layer count."""
    trainable_modules: Union[str, list] = setting("all", TRAINABLE_MODULES)
    """Which modules of those layers train (freeze_trainable_modules): 'all', or names within a decoder layer such
    as ['mlp'], ['self_attn'], ['mlp.down_proj'] or ['q_proj', 'v_proj'] (matched as lora_target_modules are, by
    whole name or its last parts). A name that matches nothing in a layer is an error listing the layer's modules."""
    trainable_extra_modules: Optional[list] = setting(None, MODULE_NAMES)
    """Modules outside the decoder layers that train too (freeze_extra_modules): e.g. ['embed_tokens'],
    ['lm_head'], ['norm'] (the final norm). None: none of them (a reward model's new score head always trains). On
    a model whose lm_head is its input embedding (tie_word_embeddings) either name trains that one weight."""

    # --- data ---------------------------------------------------------------------------------
    data_path: Union[str, list, None] = setting("tatsu-lab/alpaca", DATA_PATH)
    """A file (.json/.jsonl/.parquet/.csv/.txt), a directory of them, or a `datasets` name/directory.
    A list mixes several: [{'path': ..., 'format': ..., 'ratio': 1.0}, ...] or plain paths."""
    data_format: str = setting("auto", DATA_FORMAT)
    """'auto', 'alpaca', 'messages', 'sharegpt', 'conversation', 'text', 'agent'."""
    dataset_map_fn: Optional[Callable] = None
    """Optional function record -> record applied before format detection (define it in the config file)."""
    prompt_template: str = setting("internlm2_chat", PROMPT_TEMPLATE)
    """Chat template name (`tunelab.data.templates`); 'hf' uses the tokenizer's own chat_template."""
    SYSTEM: str = ""
    """System prompt for training samples that have none, evaluation and chat."""
    max_length: int = setting(2048, POSITIVE)
    """Tokens per sample and per packed row; longer samples are cut."""
    rope_scaling: Optional[Literal["linear", "yarn", "llama3"]] = None
    """Train past the model's context (its max_position_embeddings): RoPE positions stretched over max_length by
    max_length / max_position_embeddings, rounded up. 'linear' (position interpolation), 'yarn' (Qwen's and
    DeepSeek's long-context scaling), 'llama3'. Kept with the trained model for chat, merge and export."""
    pack_to_max_length: bool = True
    """Concatenate samples into rows of max_length; samples never attend to each other."""
    shuffle_before_pack: bool = True
    """Shuffle samples (seeded) before packing them into rows."""
    train_on: Literal["assistant", "all"] = "assistant"
    """'assistant': loss on replies only (plus their end-of-turn token); 'all': every token (pretraining)."""
    skip_invalid: bool = False
    """Skip and count malformed records instead of stopping with an error."""
    eval_split_ratio: float = setting(0.0, fraction("e.g. 0.05 holds out 5%"))
    """Hold out this fraction of the data to report eval loss at each evaluation."""
    num_proc: int = setting(1, POSITIVE)
    """Processes used for tokenising (tunelab preprocess)."""

    # --- multimodal (LLaVA: docs/MULTIMODAL.md) ------------------------------------------------
    visual_encoder_name_or_path: Optional[str] = None
    """A CLIP or SigLIP vision model (hub id or folder, e.g. openai/clip-vit-large-patch14-336). Set, the run trains
    a LLaVA model: this vision tower, a projector, and the text model above as its language model. None: text only."""
    vision_feature_layer: int = setting(-2, Rule(lambda v: v != 0, "a layer of the tower, not 0 (its embeddings, which "
                                                     "transformers' LLaVA cannot select), e.g. -2"))
    """The vision tower's layer whose output feeds the projector (-2: the second to last, as LLaVA-1.5)."""
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    """'default' drops the CLS token (LLaVA-1.5 with CLIP: 576 tokens an image at 336px); 'full' keeps every token
    (SigLIP, which has no CLS token)."""
    projector_hidden_act: str = setting("gelu", ACTIVATION)
    """The activation between the projector's two linear layers (LLaVA-1.5's MLP: gelu)."""
    freeze_llm: bool = False
    """Train only the projector, the language model kept as it is (stage 1, 'pretrain', on image-caption pairs)."""
    visual_encoder_lora: bool = False
    """LoRA on the vision tower's linear layers too (lora / qlora); otherwise the tower stays frozen."""
    pretrained_pth: Optional[str] = None
    """Stage 2: the stage-1 work dir, checkpoint or export whose trained projector to start from. None: a new one."""
    image_folder: Optional[str] = None
    """Where relative image paths in the data start (LLaVA's convention). None: the data file's folder."""
    image_pad_to_square: bool = True
    """Pad each image to a square of the mean colour before the vision model's processor resizes and crops it
    (LLaVA-1.5), so nothing is cropped away."""

    # --- preference training (docs/PREFERENCE.md) ----------------------------------------------
    objective: Objective = "sft"
    """What the run trains: 'sft' supervised fine-tuning; on preference pairs 'dpo', 'orpo', 'simpo' or 'reward'
    (a reward model: a scalar head, Bradley-Terry loss); 'kto' on replies labelled desirable or not."""
    beta: float = setting(0.1, POSITIVE_NUMBER)
    """Preference strength: DPO / KTO's beta (distance from the reference), ORPO's lambda (weight of the odds-ratio
    term), SimPO's beta (the SimPO paper uses 2-10)."""
    dpo_loss: str = setting("sigmoid", DPO_LOSS)
    """DPO's loss: 'sigmoid' (the DPO paper), 'ipo' (on mean token log-probabilities), 'hinge' (SLiC)."""
    label_smoothing: float = setting(0.0, Rule(lambda v: 0 <= v < 0.5, "at least 0 and below 0.5"))
    """DPO (sigmoid) and SimPO: the assumed fraction of pairs whose labels are flipped (conservative DPO)."""
    simpo_gamma: float = setting(0.5, Rule(lambda v: v >= 0, "0 or more"))
    """SimPO's target margin between the chosen and the rejected reply."""
    kto_desirable_weight: float = setting(1.0, POSITIVE_NUMBER)
    """KTO: weight of the loss of desirable replies."""
    kto_undesirable_weight: float = setting(1.0, POSITIVE_NUMBER)
    """KTO: weight of the loss of undesirable replies (raise it when they are fewer)."""
    reference: str = setting("auto", REFERENCE)
    """DPO / KTO's reference model: 'adapters_off' the base with the LoRA adapters switched off (lora / qlora, no
    second copy); 'copy' a frozen copy (full); 'precomputed' its log-probabilities computed once before training.
    'auto': adapters_off for lora / qlora, for full a copy where the memory plan says it fits and the engine does not
    shard the weights, else precomputed (always under FSDP / ZeRO-3)."""

    # --- optimisation -------------------------------------------------------------------------
    batch_size: int = setting(1, POSITIVE)
    """Rows per device per step (a row is one packed sequence of max_length when packing)."""
    accumulative_counts: int = setting(16, POSITIVE)
    """Micro-batches per optimiser step (gradient accumulation)."""
    lr: float = setting(2e-4, Rule(
        lambda v: v > 0, "greater than 0 (e.g. 2e-4 for LoRA, 2e-5 for full fine-tuning)"))
    """Peak learning rate (after warm-up)."""
    betas: tuple = setting((0.9, 0.999), BETAS)
    """AdamW betas."""
    weight_decay: float = setting(0.0, Rule(lambda v: v >= 0, "0 or more"))
    """AdamW weight decay."""
    max_norm: float = setting(1.0, Rule(lambda v: v >= 0, "0 or more (0 turns clipping off)"))
    """Gradient clipping norm (0 disables)."""
    neftune_noise_alpha: Optional[float] = setting(None, Rule(lambda v: v is None or v > 0, "None or a positive number"))
    """NEFTune: uniform noise added to the input embeddings while training (supervised fine-tuning), of at most
    alpha / sqrt(row length x hidden size), as transformers' Trainer adds it; the NEFTune paper uses 5. None: off."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is inf / NaN: 'stop' ends the run with a message before anything of it is
    saved (the checkpoints stay as they were); 'skip' leaves the weights alone for that step, warns and goes on (ten
    such steps in a row stop the run; not with DeepSpeed)."""
    max_epochs: int = setting(3, POSITIVE)
    """Passes over the training data."""
    max_steps: Optional[int] = setting(None, POSITIVE_OR_NONE)
    """Stop after this many optimiser steps (overrides max_epochs when set)."""
    warmup_ratio: float = setting(0.03, fraction("a fraction of all steps, e.g. 0.03"))
    """Fraction of the steps spent warming the learning rate up from 0."""
    warmup_steps: Optional[int] = setting(None, Rule(lambda v: v is None or v >= 0,
                                                     "None or a whole number, 0 or more"))
    """Optimiser steps spent warming the learning rate up (Unsloth's notebooks: 5); when set it wins over
    warmup_ratio, as in Hugging Face's TrainingArguments. None: warmup_ratio decides."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate shape after warm-up."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """AdamW (fused on GPU), or bitsandbytes' 8-bit / paged 8-bit AdamW."""
    fp32_master_weights: bool = True
    """Trained weights in fp32 on a GPU, computed in bf16/fp16 under autocast. A bf16 weight rounds away updates
    below ~1/256 of itself, which lr 2e-5 updates mostly are. Full fine-tuning checkpoints are then fp32 (exact
    resume; `convert pth_to_hf` writes bf16). False (with bf16): bf16 weights, gradients and AdamW states, 8 bytes a
    trained parameter less; LoRA adapters too (as TRL keeps QLoRA's), 1.2 GiB less at 7B r=64."""
    gradient_checkpointing: Optional[bool] = None
    """None: on for lora/qlora (and freeze_llm), off for full."""
    seed: int = setting(0, Rule(lambda v: 0 <= v < 2**32, "a whole number from 0 to 2**32 - 1 (numpy's range)"))
    """Seed for data order, initialisation and dropout: the same seed repeats the run."""

    # --- saving, logging, evaluation ----------------------------------------------------------
    save_steps: int = setting(500, POSITIVE)
    """Save a checkpoint every this many optimiser steps (the final step is always saved)."""
    save_total_limit: int = setting(2, Rule(
        lambda v: v == -1 or v >= 1, "-1 (keep every checkpoint) or 1 or more"))
    """How many iter_N checkpoints to keep (-1 keeps all)."""
    logging_steps: int = setting(10, POSITIVE)
    """Log loss, lr, grad norm, tokens/s and memory every this many steps."""
    evaluation_freq: int = setting(500, POSITIVE)
    """Answer evaluation_inputs every this many steps (and once before training)."""
    evaluation_inputs: list = setting(factory=lambda: ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"],
                                      rule=EVALUATION_INPUTS)
    """Questions the model answers during training, so you can watch it learn."""
    evaluation_images: Union[str, list, None] = setting(None, EVALUATION_IMAGES)
    """A LLaVA run: the picture the evaluation questions are asked about (one path for all), or one path per question.
    Relative paths are read from the config file's folder, then the current directory. The picture goes before its
    question, or where the question writes <image> (once)."""
    eval_max_new_tokens: int = setting(128, POSITIVE)
    """Longest answer to an evaluation question, in tokens: at most max_length (the default is cut to it)."""
    report_to: list = setting(factory=list, rule=REPORT_TO)
    """Experiment trackers that also get every logged number and the settings: any of 'tensorboard', 'wandb',
    'mlflow', 'swanlab' (each needs its package; where each writes: docs/TRAINING.md). `tunelab board` needs none."""
    use_tensorboard: bool = False
    """Also write TensorBoard logs (the same as 'tensorboard' in report_to)."""
    check_memory: bool = True
    """On a GPU, before loading: stop when the memory estimate (`tunelab plan`) is more than the card, naming settings
    that would fit; a run that fits only without the allocator's usual slack starts with a warning. False: start
    anyway (a warning still says what the estimate is)."""

    # --- speed: the fast path and the trade-offs it leaves to you (docs/SPEED.md) ------------------
    fast_path: bool = True
    """tunelab's fast path: varlen attention over packed rows, the chunked loss, compiled layers and the other levers
    that compute the plain path's numbers (docs/SPEED.md). False: transformers and peft as they come (eager, full
    logits, peft's LoRA forward, bitsandbytes' dequantisation, the embedding on the GPU), for debugging or
    comparison: slower and more memory; the settings below then do nothing."""
    use_compile: bool = True
    """torch.compile the decoder layers (GPU only): 1.4-2x faster steps; the first step takes 10-20 s longer."""
    cuda_graphs: Optional[bool] = None
    """With use_compile: replay each compiled layer's forward and backward as CUDA graphs (torch.compile's
    "reduce-overhead"), so the CPU launches one graph instead of hundreds of kernels (Llama-7B QLoRA 2k: 3.0x the
    plain loop instead of 2.5x). Batches are padded to max_length and sample boundaries to a few sizes, one graph
    each; a new size compiles once (~15 s). GPU only; not with offload_activations or MLP slices (with offloaded
    inputs the graphs are recorded again every step; MLP slices put an eager checkpoint around). None: on when
    pack_to_max_length is (rows are max_length wide anyway) and training runs in one process, except DPO / KTO
    scoring their reference every step (adapters_off, copy): that second, no-gradient pass cannot reuse the graphs'
    memory (Llama-7B QLoRA DPO: 5.90 GiB and 7,101 tokens/s without, 6.26 GiB and 7,678 with)."""
    offload_activations: Optional[bool] = None
    """Long context: keep each layer's checkpointed input in CPU memory until backward, copied on a stream beside the
    compute (GPU only; needs gradient checkpointing). Frees hidden_size x 2 bytes x (layers - 2) a token of GPU
    memory (about 240 KiB a token for a 7B/8B model) and takes hidden_size x 2 bytes x layers of CPU memory. The
    layers then run without CUDA graphs. None: on for rows of 8,192 tokens or more in one process (several:
    untested, so off unless set). InternLM2-7B QLoRA 8k: 10,181 tokens/s in 8.56 GiB reserved with it, 10,170 in
    10.64 GiB without (with CUDA graphs); at 4k graphs without it were faster (10,594 against 10,245 tokens/s)."""
    mlp_chunk_size: Union[int, Literal["auto"], None] = setting("auto", Rule(
        lambda v: v is None or v == "auto" or (isinstance(v, int) and v > 0), "'auto', None or a positive whole number"))
    """Long context: when a row is longer than this many tokens, each MLP computes this many at a time (recomputed in
    backward; one more MLP forward a step, and no CUDA graphs). 'auto': 32768 where the layer inputs are offloaded
    (the whole MLP up to 32k is faster and still leaner: Llama-3.1-8B QLoRA 32k, BENCHMARKS.md, "long rows offloaded
    by default"), else 8192. 8192: less memory for the longest rows a card holds (Llama-3.1-8B QLoRA 78k tokens in
    24 GB). None: never."""
    embeddings_on_cpu: Optional[bool] = None
    """Keep a frozen input embedding in CPU memory and look up each batch's rows there (GPU only; the same numbers).
    Frees vocab_size x hidden_size x 2 bytes of GPU memory, e.g. 0.71 GiB for InternLM2-7B, for a copy of a few MiB
    a step. None: on for lora / qlora (not when the embedding is trained or shared with lm_head)."""
    qlora_dequant_once: bool = False
    """QLoRA with gradient checkpointing (GPU): dequantise each 4-bit weight once a pass and keep the 16-bit copy for
    that layer's backward: one dequantisation a pass fewer (0.2-3% faster on Llama-7B QLoRA 2k), for one layer's
    16-bit weights more memory (0.29 GiB there). False: backward dequantises again with bitsandbytes' kernel, as
    bitsandbytes does."""
    optimizer_in_backward: Optional[bool] = None
    """Update each layer's trained parameters as soon as backward has their gradients, and free those gradients, so
    the gradients never all exist at once (Llama-7B QLoRA r64: 0.6 GiB of them, 0.33 GiB less reserved at 2k; full
    fine-tuning with checkpointing: Qwen2.5-1.5B 2k 4.5 GiB less). The same updates, where nothing needs every
    gradient first: max_norm = 0 (no clipping), accumulative_counts = 1, optimizer 'adamw' or 'adamw_8bit', bf16 or
    fp32, nonfinite = 'stop', one process. None: on where all of that holds (0.5-1.6% fewer tokens/s: BENCHMARKS.md,
    "the updates in backward with torch's AdamW too").
    True: on, or an error naming the settings in the way."""
    loss_chunk_size: int = setting(4096, POSITIVE)
    """Most trained positions per chunk of the chunked loss (fewer for large vocabularies: 2^25 logits a chunk with
    a frozen lm_head, 2^29 with a trained one). Smaller chunks: less memory, more matmuls."""

    # --- distribution --------------------------------------------------------------------------
    deepspeed: Optional[str] = setting(None, DEEPSPEED)
    """None, 'zero1', 'zero2', 'zero2_offload', 'zero3', 'zero3_offload' or a DeepSpeed JSON path."""
    fsdp: bool = False
    """Shard with PyTorch FSDP2 across GPUs (or pass --fsdp)."""
    sequence_parallel_size: int = setting(1, POSITIVE)
    """Long context past one GPU's memory: split every row over this many GPUs (XTuner's name; DeepSpeed-Ulysses:
    attention exchanges heads for tokens, so it runs over whole rows). The processes form groups of this size, each
    training the same rows: NPROC_PER_NODE must be a multiple of it, and it must divide the model's attention heads.
    Activation memory a GPU is about 1/N; `tunelab plan` names the smallest size that fits max_length. Works with
    DDP, FSDP2 and ZeRO-1/2/3, full / LoRA / QLoRA; needs fast_path (CUDA graphs stay off)."""

    def resolved_quant_bits(self) -> Optional[int]:
        if self.quant_bits is not None:
            return self.quant_bits
        return 4 if self.method == "qlora" else None

    def resolved_gradient_checkpointing(self) -> bool:
        """None: on where most weights are frozen (lora / qlora, LLaVA's stage 1), off for full fine-tuning."""
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return self.method in ("lora", "qlora") or self.freeze_llm

    def resolved_reference(self, copy_fits: bool = True) -> Optional[str]:
        """Where DPO / KTO's reference log-probabilities come from (None for objectives without a reference):
        'auto' is adapters_off for lora / qlora; for full a frozen copy when `copy_fits` (the memory plan's word),
        else precomputed."""
        if self.objective not in ("dpo", "kto"):
            return None
        if self.reference != "auto":
            return self.reference
        if self.method != "full":
            return "adapters_off"
        return "copy" if copy_fits else "precomputed"

    def resolved_report_to(self) -> list[str]:
        """The trackers in use: report_to, plus 'tensorboard' when use_tensorboard is on."""
        return list(dict.fromkeys([*self.report_to, *(["tensorboard"] if self.use_tensorboard else [])]))


# --- the fields ---------------------------------------------------------------------------------------------------

def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


@functools.lru_cache(maxsize=None)
def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def field_rule(name: str) -> Rule | None:
    return next(f for f in fields(TrainConfig) if f.name == name).metadata.get("rule")


def default_value(name: str) -> Any:
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string under it in this file), '' where there is none."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    docs: dict[str, str] = {}
    for stmt, nxt in zip(cls.body, cls.body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            is_doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                and isinstance(nxt.value.value, str)
            docs[stmt.target.id] = " ".join(nxt.value.value.split()) if is_doc else ""
    return docs


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
