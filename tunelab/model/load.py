"""Load a model for training (full / LoRA / QLoRA) or for inference (its tokenizer: `tunelab.model.tokenizer`).

Every family goes through transformers' own classes: `from_pretrained` for the families transformers ships, and
InternLM2 / InternLM2.5 converted on load to a native Llama graph (`tunelab.model.internlm2`), so no remote code runs
and every fast path (varlen attention, chunked loss, QLoRA) applies to all of them.
Mistakes a user can fix (CUDA asked for and absent, bitsandbytes missing; LoRA targets that match nothing, through
`tunelab.model.targets` before any weight is read; and, through `tunelab.model.model_dir`, a wrong path, a directory
without weights, an architecture we do not know, the hub unreachable) raise `TunelabError` with the fix.
"""

from __future__ import annotations

import functools
import logging

import torch

from tunelab.errors import TunelabError
from tunelab.model import internlm2
from tunelab.model import rope as rope_scaling
from tunelab.model.freeze import freeze_the_rest, partial
from tunelab.model.model_dir import (build_config, check_architecture, model_class, read_model_config, reading_weights,
                                     resolve_model_dir)
from tunelab.model.plan import plan_fast_path
from tunelab.model.targets import check_targets_before_loading
from tunelab.model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' → bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if name == "fp32":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device, or a TunelabError when it names a GPU this machine does not have."""
    try:
        device = torch.device(device)
    except RuntimeError:  # "gpu", "cuda0", ...
        raise TunelabError(f"device {str(device)!r}: not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TunelabError(f"device {str(device)!r} asked for, but CUDA is not available on this machine "
                           "(no NVIDIA GPU, or a CPU-only torch). Use --device cpu (slow) or run on a GPU machine.")
    if device.type == "mps" and not torch.backends.mps.is_available():  # torch.device("mps") parses on any machine
        raise TunelabError(f"device {str(device)!r} asked for, but MPS (Apple's GPU) is not available here. "
                           "Use --device cpu, or cuda on an NVIDIA GPU machine.")
    if device.type not in ("cpu", "cuda", "mps"):  # "xpu", "meta", ...: fail here, not deep inside loading
        raise TunelabError(f"device {str(device)!r}: tunelab runs on cpu, cuda or cuda:N.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TunelabError(f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s).")
    return device


def pick_device(device: str | torch.device) -> torch.device:
    """'auto' → the GPU if there is one, else the CPU; anything else through `check_device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device)


# --- model ---------------------------------------------------------------------------------------------------------

def _lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        bias=cfg.lora_bias,
        modules_to_save=cfg.lora_modules_to_save,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        # a reward model's new head (`score`) is trained whole and saved with the adapter (peft does that for SEQ_CLS)
        task_type="SEQ_CLS" if cfg.objective == "reward" else "CAUSAL_LM",
    )


def _quantization_config(bits: int, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunelabError(f"quant_bits = {bits} (or method = 'qlora') needs bitsandbytes: "
                           "pip install bitsandbytes (or pip install 'tunelab[quant]').") from None
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise TunelabError(f"quant_bits = {bits}: use 4, 8 or None.")


def load_causal_lm(path: str, *, dtype: torch.dtype | str, device: torch.device | str, bits: int | None = None,
                   trust_remote_code: bool = False, key: str = "pretrained_model_name_or_path",
                   reward_head: bool = False, pad_token_id: int | None = None, rope: dict | None = None,
                   dequantize: bool = False):
    """A causal LM on `device` (quantised to `bits` if given): native transformers classes, InternLM2 converted.

    `dtype` may be "auto" (the dtype the checkpoint is stored in); `key` names the setting the path came from.
    reward_head: the same decoder as a sequence-classification model with one label (a reward model,
    tunelab.model.reward), its head new unless the checkpoint is one; `pad_token_id` goes into its config (transformers
    reads the score at the last token that is not padding).
    rope: RoPE scaling to build the model with (`tunelab.model.rope`: the run's decision, or its tunelab.json's record).
    dequantize: a checkpoint saved quantised (bitsandbytes, e.g. Unsloth's `-bnb-4bit` uploads) comes back with
    plain weights, its quantised values dequantised (`stored_bits` tells).
    """
    device = check_device(device)
    model_dir = resolve_model_dir(path, key=key)
    config = read_model_config(model_dir, key=key)
    how = check_architecture(config, model_dir, trust_remote_code=trust_remote_code)
    values = {}  # set on the model's config
    if reward_head:
        values = {"num_labels": 1, **({"pad_token_id": pad_token_id} if pad_token_id is not None else {})}
    kwargs = dict(dtype=dtype)
    if bits:
        kwargs["quantization_config"] = _quantization_config(bits, dtype if isinstance(dtype, torch.dtype) else
                                                              resolve_dtype("auto", device))
        kwargs["device_map"] = {"": device}
    model_config = build_config(model_dir, config, how, rope=rope, **values)
    with reading_weights(model_dir, key):
        model = _from_pretrained(model_dir, model_config, how, kwargs, reward_head=reward_head)
    if dequantize and getattr(model, "is_quantized", False):
        # merging an adapter into 4-bit layers rounds it away (peft re-quantises), and neither save_pretrained nor
        # GGUF can write them: plain weights, the values the adapter was trained against
        model = _dequantized(model)
    if not bits:
        model.to(device)
    return model


def _dequantized(model):
    """`model` with plain weights. transformers 5.17 keeps the quantizer's loading conversion after dequantize(), and
    save_pretrained then tries to reverse it (NotImplementedError): it is dropped with the quantization."""
    loaded_by_quantizer = [c.source_patterns for c in model.hf_quantizer.get_weight_conversions()]
    model = model.dequantize()
    kept = getattr(model, "_weight_conversions", None)
    if kept:
        model._weight_conversions = [c for c in kept if c.source_patterns not in loaded_by_quantizer]
    return model


def stored_bits(path: str, *, key: str = "pretrained_model_name_or_path") -> int | None:
    """4 or 8 when the checkpoint at `path` is saved quantised by bitsandbytes (its config.json's
    quantization_config), else None."""
    quant = read_model_config(resolve_model_dir(path, key=key), key=key).get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return None
    return 8 if quant.get("load_in_8bit") else 4


def _from_pretrained(model_dir, model_config, how: str, kwargs: dict, *, reward_head: bool):
    """The model `how` (model_dir.check_architecture) names, built from `model_config` (`model_dir.build_config`),
    its weights from `model_dir`."""
    cls = model_class(how, reward_head)
    if how == "internlm2":
        return internlm2.load_native(model_dir, config=model_config, model_class=cls, **kwargs)
    return cls.from_pretrained(model_dir, config=model_config, trust_remote_code=how == "remote", **kwargs)


def load_model_for_training(cfg, device: torch.device, plan=None, *, pad_token_id: int | None = None,
                            checked: bool = False) -> tuple[torch.nn.Module, dict]:
    """(model, fast-path report): the model `cfg` asks for, on `device`, ready to train (peft-wrapped for lora /
    qlora), with the fast path of `plan` switched on (a `tunelab.model.plan.FastPathPlan`; by default the one `cfg`
    gets on `device` in one process), and what the fast path did ({lever: what it did}, for the log). A reward model
    (objective = 'reward') is the sequence-classification model of the same checkpoint, `pad_token_id` (the
    tokenizer's) in its config. `checked`: `check_before_loading` ran already (the training loop runs it before the
    data step)."""
    from tunelab.config.checks import combination_errors

    plan = plan or plan_fast_path(cfg, device)

    dtype = resolve_dtype(cfg.dtype, check_device(device))
    bits = cfg.resolved_quant_bits()
    errors = combination_errors(cfg)  # settings built in Python skip load_config's checks
    if errors:
        raise TunelabError("\n".join(errors))
    if not checked:
        check_before_loading(cfg, device)
    if cfg.visual_encoder_name_or_path:  # a LLaVA model: the fast path acts on its language model
        from tunelab.model.llava_train import build_for_training

        model = build_for_training(cfg, check_device(device), checkpointing=plan.checkpointing)
        warn_beyond_context(cfg, model.config)
        return _for_training(model, cfg, plan, device)
    model = load_causal_lm(cfg.pretrained_model_name_or_path, dtype=dtype, device=device, bits=bits,
                           trust_remote_code=cfg.trust_remote_code, reward_head=cfg.objective == "reward",
                           pad_token_id=pad_token_id, rope=scaled_rope(cfg))
    warn_beyond_context(cfg, model.config)
    model.config.use_cache = False
    if cfg.method == "full":
        if partial(cfg):  # before checkpointing and the fast path, which read what trains
            freeze_the_rest(model, cfg)
        if plan.checkpointing:
            checkpoint_layers(model)
        return _for_training(model, cfg, plan, device)
    from peft import get_peft_model, prepare_model_for_kbit_training

    if bits and not plan.frozen_weights_in_compute_dtype:
        # peft's own checkpointing step calls the method transformers 5.25 deprecates; ours is the same step
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if plan.checkpointing:
            checkpoint_layers(model)
    elif bits:
        # prepare_model_for_kbit_training without its upcast of every 16-bit weight to fp32, which the fast path
        # casts back (`fast.downcast_frozen_weights`): Llama-3.1-8B's embedding and lm_head alone are 4 GiB in fp32,
        # and loading peaked 3.6 GiB above training with them. Its other steps, with non-reentrant checkpointing:
        model.requires_grad_(False)
        if plan.checkpointing:
            checkpoint_layers(model)
    elif plan.checkpointing:
        checkpoint_layers(model)
        model.enable_input_require_grads()
    try:
        peft_model = get_peft_model(model, _lora_config(cfg))
    except ValueError as exc:  # peft's refusals of a LoRA setting (e.g. a module type it cannot adapt)
        raise TunelabError(f"the LoRA settings do not fit {cfg.pretrained_model_name_or_path}: "
                           f"{str(exc).splitlines()[0]} Check lora_target_modules and lora_modules_to_save.") from None
    return _for_training(peft_model, cfg, plan, device)


def check_before_loading(cfg, device: torch.device | str) -> None:
    """Refuse, before any weight is read, what the model cannot run on `device` (`check_runs_on`), LoRA targets or
    partial fine-tuning's modules that match nothing (`targets.check_targets_before_loading`: a typo stops here, not
    after minutes of loading weights) and a rope_scaling the base cannot take (`scaled_rope`)."""
    check_runs_on(cfg, device)
    check_targets_before_loading(cfg)
    scaled_rope(cfg)


def scaled_rope(cfg) -> dict | None:
    """The RoPE scaling the run trains with (`rope_scaling`; None: the base's own RoPE), decided from the base's
    config.json before the data step (`tunelab.train.loop`: a scaling that cannot be added stops the run there) and
    asked again when the base and the reference load: decided once a process, so its warning is said once."""
    if not cfg.rope_scaling:
        return None
    return _scaled_rope(cfg.rope_scaling, cfg.max_length, cfg.pretrained_model_name_or_path)


@functools.cache
def _scaled_rope(kind: str, max_length: int, model: str) -> dict | None:
    return rope_scaling.scaling_for(kind, max_length, read_model_config(resolve_model_dir(model)), model)


def check_runs_on(cfg, device: torch.device | str) -> None:
    """Refuse, before anything loads, settings that train on a GPU but fail on `device`.

    DoRA on an 8-bit base on the CPU: peft's DoRA reads the weight through `dequantize_module_weight`, which on the
    CPU (only) puts the layer's weight back as a new Int8Params that has its int8 data but not its scales (SCB).
    bitsandbytes' Linear8bitLt takes that weight for a fresh one at its next forward and moves the missing scales into
    its state, so the second forward of every layer (checkpointing's recompute, or the next step) fails inside
    bitsandbytes' 8-bit matmul ("'NoneType' object has no attribute 'unsqueeze'"). peft 0.21 / bitsandbytes 0.50."""
    if (torch.device(device).type == "cpu" and cfg.use_dora and cfg.method != "full"
            and cfg.resolved_quant_bits() == 8):
        raise TunelabError("use_dora = True with quant_bits = 8 cannot train on the CPU: peft's DoRA loses the 8-bit "
                           "weight's scales there (it runs on a GPU). On the CPU use quant_bits = 4 (4-bit QLoRA "
                           "with DoRA), use_dora = False (8-bit QLoRA), or method = 'lora' with quant_bits = None.")


def warn_beyond_context(cfg, config) -> None:
    """A warning, not an error, when rows are longer than the positions the model was trained on: past them its
    outputs degrade, but a model whose config.json a user extended does this on purpose."""
    config = getattr(config, "text_config", None) or config  # LLaVA: the language model's
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.max_length > limit:
        log.warning("max_length = %d is longer than %s's max_position_embeddings = %d (its config.json): positions "
                    "past %d are ones the model never saw. Lower max_length to %d, or stretch the model's positions "
                    "over max_length: rope_scaling = 'linear' or 'yarn' (docs/TRAINING.md).", cfg.max_length,
                    cfg.pretrained_model_name_or_path, limit, limit, limit)


def checkpoint_layers(model) -> None:
    """transformers' gradient checkpointing of every decoder layer, non-reentrant (the fast path replaces it with
    its own, `tunelab.model.layers`). transformers 5.25 calls the method `activation_checkpointing_enable` and
    deprecates the old name; 5.17 has only the old one."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_reference_model(cfg, device: torch.device, plan):
    """DPO / KTO's frozen reference for full fine-tuning (reference = 'copy'): the starting weights in the compute
    dtype, no gradients, with the plan's levers (its layers run as transformers' own: it is only run without
    gradients)."""
    model = load_causal_lm(cfg.pretrained_model_name_or_path, dtype=resolve_dtype(cfg.dtype, check_device(device)),
                           device=device, trust_remote_code=cfg.trust_remote_code, rope=scaled_rope(cfg))
    model.config.use_cache = False
    model.requires_grad_(False).eval()
    model, _ = _with_fast_path(model, plan, device)  # the run logs the trained model's report, not this one
    return model


def _for_training(model, cfg, plan, device) -> tuple[torch.nn.Module, dict]:
    """(model, report): every load for training ends here: NEFTune's noise on the input embedding when asked for
    (hooked before the fast path, which may move the embedding to CPU memory with its hooks), then the fast path."""
    if cfg.neftune_noise_alpha is not None:
        from tunelab.model.neftune import add_embedding_noise

        add_embedding_noise(model, cfg.neftune_noise_alpha, sequence_parallel_size=cfg.sequence_parallel_size)
    return _with_fast_path(model, plan, device)


def _with_fast_path(model, plan, device) -> tuple[torch.nn.Module, dict]:
    """(model, report): switch on the fast path's levers (tunelab/model/fast.py) as the plan says, keep 4-bit layers
    on bitsandbytes' training kernels (`_no_cpu_inference_repack`), then give back what loading left cached: every
    load for training ends here."""
    from tunelab.model.fast import apply_fast_path

    report = apply_fast_path(model, plan, device)
    _no_cpu_inference_repack(model)
    release_cached_memory(device)
    return model, report


def _no_cpu_inference_repack(model) -> None:
    """A model being trained stays on bitsandbytes' training kernels. On a CPU with AVX512-BF16, a Linear4bit that
    runs once in eval mode (the evaluation questions) repacks its weight for an inference kernel and keeps using it
    in training: other numbers, other gradients, and an autograd error on a layer with a bias (Qwen2)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def release_cached_memory(device) -> None:
    """Give the GPU memory that loading used and let go back to the driver. bitsandbytes quantises each weight from
    a 16-bit copy on the GPU, and the fast path moves the input embedding to CPU memory: the allocator keeps those
    blocks cached, free but held, and training would start with them as its floor (Llama-3.1-8B QLoRA 8k: 8.61 GiB
    reserved for 4.65 allocated after loading; training's peak 8.91 GiB reserved with them, 7.72 without)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def load_model_for_inference(model_path: str, *, bits: int | None = None, device: str | torch.device = "auto",
                             dtype: str = "auto", trust_remote_code: bool = False, rope: dict | None = None):
    """(model, tokenizer) ready to generate (an adapter goes on with `tunelab.export.adapters.apply_adapter`);
    `rope`: the RoPE scaling a run trained with (its tunelab.json's `rope_scaling`)."""
    dev = pick_device(device)
    model = load_causal_lm(model_path, dtype=resolve_dtype(dtype, dev), device=dev, bits=bits,
                           trust_remote_code=trust_remote_code, key="MODEL", rope=rope)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    release_cached_memory(dev)
    model.eval()
    return model, tokenizer
