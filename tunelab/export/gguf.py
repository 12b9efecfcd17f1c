"""A loaded HF model and its tokenizer → one GGUF file for llama.cpp, Ollama, LM Studio (`write_gguf`; the command,
`tunelab convert gguf`, is `tunelab.export.gguf_convert`).

Written with the `gguf` package (llama.cpp's own reader / writer). Tensor names come from its `TensorNameMap`
for the architecture, hyperparameters go under its keys, and the tokenizer goes in whole: the vocabulary (byte-level
BPE with its merges, or sentencepiece with its scores), the special token ids, and `tokenizer.chat_template` = the
template the model was trained with (`to_jinja()`, as `convert merge` writes it), so llama.cpp formats chats the
way training did. `tokenizer.ggml.add_bos_token` is false: tunelab's templates spell the BOS out (see docs/DESIGN.md,
Templates), so a prompt rendered with the template is the token sequence training saw; a model with no template
in the file gets the tokenizer's own choice. A write that fails is one line naming the file.

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
# llama.cpp reads Llama 3.1's per-frequency RoPE (the rope_freqs tensor) in its llama architecture only: its qwen2,
# qwen3, phi3 and gemma loaders have no place for that tensor and refuse a file that holds it
ROPE_FREQS_ARCHS = ("llama",)
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


def check_rope_fits(arch: str, kind: str, where) -> None:
    """Refuse a RoPE scaling llama.cpp cannot run in the GGUF architecture `arch` (before anything is written)."""
    if kind == "llama3" and arch not in ROPE_FREQS_ARCHS:
        raise TunelabError(f"{where}: RoPE scaling 'llama3' on a {arch} model: llama.cpp runs Llama 3.1's "
                           f"per-frequency scaling (a rope_freqs tensor) in its llama architecture only and refuses "
                           f"a {arch} file that holds it. Nothing was written. Serve the merged model with "
                           f"transformers or vLLM (tunelab convert merge), or train with rope_scaling = 'yarn' or "
                           f"'linear' for a GGUF file.")


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
    check_rope_fits(arch, kind, type(config).__name__)
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
               add_bos: bool | None = False, sentencepiece_file: Path | None = None,
               probe_prompts: tuple[str, ...] = ()) -> Path:
    """Write `model` (a loaded HF causal LM) and `tokenizer` as one GGUF file at `out_path`.

    add_bos: `tokenizer.ggml.add_bos_token` (False: the chat template writes the BOS; None: as the tokenizer does).
    sentencepiece_file: the tokenizer.model to read, if not tokenizer_dir's (`gguf_vocab.find_sentencepiece`).
    probe_prompts: prompts llama.cpp must tokenize as transformers does (`gguf_space.probe_prompts`); they decide a
    sentencepiece vocabulary's add_space_prefix (none: tokenizer.model's add_dummy_prefix)."""
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
                      add_bos=add_bos, sentencepiece_file=sentencepiece_file, probe_prompts=probe_prompts)
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
          tokenizer_dir: Path, eot_words: tuple[str, ...], add_bos: bool | None,
          sentencepiece_file: Path | None = None, probe_prompts: tuple[str, ...] = ()) -> int:
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
              add_bos=add_bos, sentencepiece_file=sentencepiece_file, probe_prompts=probe_prompts)
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
