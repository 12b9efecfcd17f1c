"""`tunelab convert gguf`: a HF model (or base + adapter) → one GGUF file for llama.cpp, Ollama, LM Studio.

Written with the `gguf` package (llama.cpp's own reader / writer). Tensor names come from its `TensorNameMap`
for the architecture, hyperparameters go under its keys, and the tokenizer goes in whole: the vocabulary (byte-level
BPE with its merges, or sentencepiece with its scores), the special token ids, and `tokenizer.chat_template` = the
template the model was trained with (`to_jinja()`, as `convert merge` writes it), so llama.cpp formats chats the
way training did. `tokenizer.ggml.add_bos_token` is false: tunelab's templates spell the BOS out (see docs/DESIGN.md,
Templates), so a prompt rendered with the template is the token sequence training saw; a model with no template
in the file gets the tokenizer's own choice. MODEL may also be a training WORK_DIR or checkpoint, read as `tunelab
chat` reads it. Whatever can be refused (architecture, template, tokenizer files, an output that cannot be written)
is refused before the weights load; a write that fails later is one line naming the file.

The families of docs/MODELS.md whose GGUF architecture reads the same tensors: Llama (also Mistral and InternLM2,
which tunelab loads as a Llama graph), Qwen2, Qwen3, Phi-3, Gemma 2 and 3 (`ARCHITECTURES`). Anything else (GLM-4,
long-context RoPE kinds llama.cpp takes differently) is refused, naming what is missing.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError

TYPES = ("f16", "bf16", "q8_0", "f32")


@dataclass(frozen=True)
class Family:
    arch: str
    """GGUF architecture name (gguf.MODEL_ARCH_NAMES)."""
    interleave_qk: bool = False
    """llama.cpp's llama RoPE rotates neighbouring pairs, HF's the two halves of each head: reorder q / k rows."""
    norm_plus_one: bool = False
    """Gemma's RMSNorm scales by (1 + weight), llama.cpp's by the weight: store 1 + weight."""


# HF class → how its tensors go into GGUF (families of docs/MODELS.md that llama.cpp runs with the same tensors)
ARCHITECTURES = {
    "LlamaForCausalLM": Family("llama", interleave_qk=True),
    "MistralForCausalLM": Family("llama", interleave_qk=True),  # llama.cpp runs Mistral as llama
    "Qwen2ForCausalLM": Family("qwen2"),  # NEOX-style RoPE in llama.cpp: rows stay as HF has them
    "Qwen3ForCausalLM": Family("qwen3"),
    "Phi3ForCausalLM": Family("phi3"),  # fused qkv_proj and gate_up_proj, as llama.cpp's phi3 reads them
    "Gemma2ForCausalLM": Family("gemma2", norm_plus_one=True),
    "Gemma3ForCausalLM": Family("gemma3", norm_plus_one=True),
}
# Byte-level BPE pre-tokenizer split patterns (tokenizer.json) → llama.cpp's name for that pre-tokenizer.
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",  # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",  # Qwen2, Qwen2.5, Qwen3
}


def _say(message: str) -> None:
    print(message, flush=True)


def _ggml_type(out_type: str, shape: tuple[int, ...]):
    """The storage type of one tensor: vectors (norms, biases) stay F32, as llama.cpp's converter keeps them;
    q8_0 needs rows of a multiple of 32 values and falls back to F16 otherwise (llama.cpp does the same)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or out_type == "f32":
        return T.F32
    if out_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return T.BF16 if out_type == "bf16" else T.F16


def _interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q / k projection rows from HF's rotate-half order (first half of each head's dims, then second half) to the
    pairwise order llama.cpp's llama RoPE expects: rows (h, i) and (h, i + d/2) become neighbours."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _rope_settings(config) -> dict:
    """RoPE of the (global) attention layers: rope_type, rope_theta, factor, ..."""
    params = dict(getattr(config, "rope_parameters", None) or {})  # transformers 5
    params = dict(params.get("full_attention", params))  # Gemma 3: one entry per kind of layer
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _add_hyperparameters(writer, config, arch: str) -> torch.Tensor | None:
    """The architecture's keys; returns llama3-style RoPE frequency factors (a tensor) when the model has them."""
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope_settings(config)
    if arch in ("llama", "phi3"):
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(int(getattr(config, "original_max_position_embeddings", None)
                                                 or config.max_position_embeddings))
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # 0: Phi-4's "none"
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma3":  # llama.cpp places its sliding-window layers itself: 5 of every 6, as published
        published = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                     for i in range(config.num_hidden_layers)]
        if list(getattr(config, "layer_types", None) or published) != published:
            raise TunelabError(f"this Gemma 3 places its sliding-window layers differently ({config.layer_types}) "
                               f"from the published models, which llama.cpp assumes. Nothing was written.")
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
        local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
        if "rope_theta" in local:
            writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind == "llama3":
        return _llama3_rope_factors(rope, head_dim)
    elif kind != "default":
        raise TunelabError(f"RoPE scaling {kind!r} has no GGUF export in tunelab yet (supported: none, linear, "
                           f"yarn, llama3).")
    return None


def _llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """Llama 3.1's per-frequency scaling as the `rope_freqs` tensor llama.cpp multiplies its frequencies by
    (the same numbers as transformers' `_compute_llama3_parameters`, as factors instead of scaled frequencies)."""
    import math

    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_context = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = torch.where(wavelen < old_context / high, torch.ones_like(freqs),
                          torch.where(wavelen > old_context / low, torch.full_like(freqs, factor),
                                      1 / ((1 - smooth) / factor + smooth)))
    return factors.float()


def write_error(path: Path, exc: OSError) -> TunelabError:
    """An OSError while writing `path` as one line naming the file (and the free space when the disk is full)."""
    where = Path(exc.filename) if exc.filename else Path(path)
    message = f"cannot write {where}: {exc.strerror or exc}"
    if exc.errno == errno.ENOSPC:
        folder = next((f for f in (where.parent, *where.parents) if f.exists()), Path("."))
        with contextlib.suppress(OSError):
            message += f" ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free in {folder})"
        message += ". Free some space, or write OUT.gguf to another disk (--type q8_0 is about half the size)"
    return TunelabError(message + ". Nothing was written.")


def write_gguf(model, tokenizer, out_path: str | Path, *, out_type: str = "f16", name: str,
               chat_template: str | None, tokenizer_dir: Path, eot_words: tuple[str, ...] = (),
               add_bos: bool | None = False) -> Path:
    """Write `model` (a loaded HF causal LM) and `tokenizer` as one GGUF file at `out_path`.

    add_bos: `tokenizer.ggml.add_bos_token` (False: the chat template writes the BOS; None: as the tokenizer does)."""
    import gguf

    if out_type not in TYPES:
        raise TunelabError(f"--type {out_type!r}: use one of {', '.join(TYPES)}.")
    config = model.config
    hf_arch = type(model).__name__  # the class that runs it: InternLM2 is a LlamaForCausalLM in tunelab
    if hf_arch not in ARCHITECTURES:
        raise TunelabError(f"{hf_arch}: no GGUF export for this architecture in tunelab yet (supported: "
                           f"{', '.join(sorted(ARCHITECTURES))}). llama.cpp's convert_hf_to_gguf.py may handle "
                           f"the merged model (tunelab convert merge).")
    family = ARCHITECTURES[hf_arch]
    arch = family.arch
    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = None
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(tmp, arch, use_temp_file=True)
        count = _fill(writer, model, tokenizer, family, names, out_type=out_type, name=name,
                      chat_template=chat_template, tokenizer_dir=tokenizer_dir, eot_words=eot_words,
                      add_bos=add_bos)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        tmp.replace(out_path)  # a file that is there is whole
    except OSError as exc:
        raise write_error(out_path, exc) from None
    finally:  # never masks the first error: a half-written file is removed if it can be
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    _say(f"wrote {out_path} ({arch}, {out_type}, {count} tensors, {out_path.stat().st_size / 2**20:.1f} MiB)")
    return out_path


def _fill(writer, model, tokenizer, family: Family, names, *, out_type: str, name: str, chat_template: str | None,
          tokenizer_dir: Path, eot_words: tuple[str, ...], add_bos: bool | None) -> int:
    """Metadata, tokenizer and tensors into `writer`; returns how many tensors."""
    import gguf

    from tunelab.export.gguf_vocab import add_vocab

    config = model.config
    arch = family.arch
    hf_arch = type(model).__name__
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_file_type(file_types[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope_factors = _add_hyperparameters(writer, config, arch)
    add_vocab(writer, tokenizer, tokenizer_dir, vocab_size=config.vocab_size, eot_words=eot_words,
              add_bos=add_bos)
    if chat_template:
        writer.add_chat_template(chat_template)

    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    count = 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the same tensor as token_embd
        data = tensor.detach().to("cpu", torch.float32)
        if family.interleave_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _interleave_rope_rows(data, n_heads)
        elif family.interleave_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _interleave_rope_rows(data, n_kv)
        elif family.norm_plus_one and hf_name.endswith("norm.weight"):
            data = data + 1
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TunelabError(f"{hf_name}: a tensor the GGUF '{arch}' architecture has no place for, so this "
                               f"{hf_arch} variant cannot be exported. Nothing was written.")
        _add_tensor(writer, gguf_name, data.numpy(), _ggml_type(out_type, tuple(data.shape)))
        count += 1
    if rope_factors is not None:
        _add_tensor(writer, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_factors.numpy(),
                    gguf.GGMLQuantizationType.F32)
    return count


def _add_tensor(writer, name: str, data: np.ndarray, ggml_type) -> None:
    import gguf

    T = gguf.GGMLQuantizationType
    if ggml_type in (T.F32, T.F16):
        writer.add_tensor(name, gguf.quants.quantize(data, ggml_type))
    else:  # bf16, q8_0: bytes, shape taken from the type
        writer.add_tensor(name, gguf.quants.quantize(data, ggml_type), raw_dtype=ggml_type)


def check_gguf_architecture(config: dict, model_dir: Path) -> None:
    """Refuse, before any weights load, a model whose architecture (config.json) has no GGUF export here."""
    from tunelab.model import internlm2

    archs = config.get("architectures") or [config.get("model_type", "?")]
    if internlm2.is_internlm2(config) or any(a in ARCHITECTURES for a in archs):
        return
    raise TunelabError(f"{archs[0]}: no GGUF export for this architecture in tunelab yet ({model_dir / 'config.json'}; "
                       f"supported: {', '.join(sorted(ARCHITECTURES))}, InternLM2). llama.cpp's "
                       f"convert_hf_to_gguf.py may handle the merged model (tunelab convert merge). Nothing was "
                       f"written.")


def check_tokenizer_files(tokenizer_dir: Path) -> None:
    """The folder holds a tokenizer the GGUF file can carry (checked before transformers tries to load it)."""
    tokenizer_dir = Path(tokenizer_dir)
    if not any((tokenizer_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        present = [f for f in ("tokenizer_config.json", "vocab.json", "merges.txt") if (tokenizer_dir / f).is_file()]
        raise TunelabError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model"
                           + (f" (only {', '.join(present)})" if present else "") + ", so there is no tokenizer to "
                           "put in the GGUF file. Copy the base model's tokenizer files (tokenizer.json or "
                           "tokenizer.model, and tokenizer_config.json) into it. Nothing was written.")


def check_writable(out: Path, modelfile: bool) -> None:
    """Before any weights load: OUT.gguf's folder exists (made if missing) and takes new files, and neither the
    temporary OUT.gguf.tmp nor the Modelfile's path is a folder."""
    import tempfile

    from tunelab.export.ollama import modelfile_path

    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".tunelab-write-check"):
            pass
    except OSError as exc:
        raise TunelabError(f"cannot write into {folder} ({exc.strerror or exc}): choose an OUT.gguf in a folder you "
                           f"can write to. Nothing was written.") from None
    for path in [out.with_name(out.name + ".tmp"), *([modelfile_path(out)] if modelfile else [])]:
        if path.is_dir():
            raise TunelabError(f"{path} is a directory, where convert gguf writes a file: move it away or choose "
                               f"another OUT.gguf. Nothing was written.")


def _resolve_model(model_path: str, adapter: str | None) -> tuple[str, str | None, dict, Path | None]:
    """(model to load, adapter to merge or None, tunelab.json, the checkpoint folder or None) for the MODEL a user
    typed, as `tunelab chat` reads it: a WORK_DIR or iter_N (a LoRA run: its base from tunelab.json with the adapter
    merged; a full run: its model/ with the checkpoint's tunelab.json), an adapter folder, or a model directory
    (tunelab.json beside it, or one level up for WORK_DIR/iter_N/model)."""
    from tunelab.export.adapters import ADAPTER_CONFIG, find_adapter_dir
    from tunelab.train.layout import MODEL_DIR, is_checkpoint, looks_like_work_dir, read_meta, resolve_checkpoint

    p = Path(model_path)
    if p.is_dir() and not (p / "config.json").is_file() and (
            is_checkpoint(p) or looks_like_work_dir(p) or (p / ADAPTER_CONFIG).is_file()):
        if adapter:
            raise TunelabError(f"{model_path} is already a checkpoint / adapter: pass the base model as MODEL and this "
                               f"as --adapter, or convert it alone (`tunelab convert gguf {model_path} OUT.gguf`).")
        if (p / ADAPTER_CONFIG).is_file():
            meta_dir = p
        else:
            ckpt = resolve_checkpoint(p)
            if not (ckpt / MODEL_DIR / ADAPTER_CONFIG).is_file():  # a full fine-tuning run: the model itself
                return str(ckpt / MODEL_DIR), None, read_meta(ckpt) or read_meta(ckpt / MODEL_DIR) or {}, ckpt
            meta_dir = ckpt
        adapter_dir, meta_dir = find_adapter_dir(meta_dir)
        meta = read_meta(meta_dir) or read_meta(adapter_dir) or {}
        base = meta.get("base_model")
        if not base:
            raise TunelabError(f"{meta_dir} has no tunelab.json naming its base model: run `tunelab convert gguf "
                               f"BASE_MODEL OUT.gguf --adapter {model_path}`.")
        return str(base), str(meta_dir), meta, meta_dir
    if adapter:
        adapter_dir, meta_dir = find_adapter_dir(adapter)
        return model_path, adapter, read_meta(meta_dir) or read_meta(adapter_dir) or {}, None
    meta = None
    if p.is_dir():
        meta = read_meta(p)
        if meta is None and p.name == MODEL_DIR and is_checkpoint(p.parent):  # WORK_DIR/iter_N/model
            meta = read_meta(p.parent)
    return model_path, None, meta or {}, None


def convert_to_gguf(model_path: str, out_path: str, *, out_type: str = "f16", adapter: str | None = None,
                    prompt_template: str | None = None, modelfile: bool = True,
                    trust_remote_code: bool = False, allow_other_base: bool = False) -> Path:
    """MODEL (merged HF dir, a training checkpoint or WORK_DIR, or a base with `adapter` merged in memory) →
    OUT.gguf, plus an Ollama Modelfile beside it."""
    from tunelab.export.convert import check_output, template_for_export
    from tunelab.export.ollama import write_modelfile
    from tunelab.model.load import load_causal_lm, load_tokenizer
    from tunelab.model.model_dir import read_model_config, resolve_model_dir
    from tunelab.train.layout import checkpoint_step

    out = Path(out_path)
    if out.suffix != ".gguf":
        raise TunelabError(f"{out}: name the output file NAME.gguf (llama.cpp and Ollama look for that suffix).")
    if out_type not in TYPES:
        raise TunelabError(f"--type {out_type!r}: use one of {', '.join(TYPES)}.")
    if out.is_dir():
        raise TunelabError(f"{out} is a directory: name the file to write, e.g. {out / 'model.gguf'}.")
    check_output(out.parent)  # not into a training checkpoint or a work dir's top level
    model_path, adapter, meta, checkpoint = _resolve_model(model_path, adapter)
    if meta.get("llava"):
        raise TunelabError(f"{model_path}: a LLaVA run; convert gguf writes text models only. Export it with "
                           f"`tunelab convert merge` (a HF LLaVA folder) and llama.cpp's own converter.")
    if meta.get("objective") == "reward":
        raise TunelabError(f"{model_path} is a reward model: it scores replies and does not write them, so it has no "
                           f"GGUF export.")
    check_writable(out, modelfile)
    model_dir = resolve_model_dir(model_path, key="MODEL")
    config = read_model_config(model_dir, key="MODEL")
    check_gguf_architecture(config, model_dir)
    adapter_dir = None
    if adapter:
        from tunelab.export.adapters import apply_adapter, find_adapter_dir

        adapter_dir, _ = find_adapter_dir(adapter)
    tokenizer_dir = adapter_dir if adapter and (adapter_dir / "tokenizer_config.json").is_file() else model_dir
    check_tokenizer_files(tokenizer_dir)
    tokenizer = load_tokenizer(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    template = template_for_export(meta, prompt_template, tokenizer)  # an unknown name: refused before loading
    _say(f"loading {model_dir}" + (f" with adapter {adapter}" if adapter else ""))
    model = load_causal_lm(str(model_dir), dtype="auto", device="cpu", trust_remote_code=trust_remote_code,
                           key="MODEL")
    if adapter:
        model = apply_adapter(model, adapter_dir, str(model_path), meta=meta, allow_other_base=allow_other_base,
                              say=_say).merge_and_unload()
    chat_template = template.to_jinja() if template is not None else getattr(tokenizer, "chat_template", None)
    if template is None and chat_template:
        _say("note: no prompt template recorded (no tunelab.json) and none given with --prompt-template: the GGUF "
             "keeps the tokenizer's own chat_template, and the Modelfile has no TEMPLATE")
    elif template is None:
        _say("note: no prompt template recorded (no tunelab.json), none given with --prompt-template, and the "
             "tokenizer has no chat_template: the GGUF has no chat template (a model for plain completion; llama.cpp "
             "adds the BOS as the tokenizer does), and the Modelfile has no TEMPLATE. Pass --prompt-template NAME "
             "to chat with it.")
    if checkpoint is not None:  # a run's checkpoint: the work dir's name
        name = (checkpoint.parent if checkpoint_step(checkpoint) >= 0 else checkpoint).resolve().name
    else:
        name = Path(adapter).resolve().name if adapter else Path(str(model_dir)).name
    write_gguf(model, tokenizer, out, out_type=out_type, name=name, chat_template=chat_template,
               tokenizer_dir=tokenizer_dir, eot_words=tuple(getattr(template, "stop_words", ()) or ()),
               add_bos=False if template is not None else None)
    if modelfile:
        write_modelfile(out, template, system=meta.get("system") or "")
    return out
