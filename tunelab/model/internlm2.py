"""InternLM2 / InternLM2.5 checkpoints as native transformers Llama graphs: no remote code.

InternLM2 *is* a Llama architecture with other weight names and one fused projection:

    InternLM2 (published layout)              native LlamaForCausalLM
    model.tok_embeddings                   -> model.embed_tokens
    layers.N.attention.wqkv  (fused, GQA)  -> layers.N.self_attn.{q,k,v}_proj
    layers.N.attention.wo                  -> layers.N.self_attn.o_proj
    layers.N.feed_forward.w1 / w3 / w2     -> layers.N.mlp.gate_proj / up_proj / down_proj
    layers.N.attention_norm / ffn_norm     -> layers.N.input_layernorm / post_attention_layernorm
    model.norm, output                     -> model.norm, lm_head

The fused `wqkv` rows are grouped per key/value head: for each of the `num_key_value_heads` groups come
`num_heads / num_kv_heads` query heads, then one key head, then one value head, each `head_dim` rows. That is what the
published modelling code's `rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=2 + groups, d=head_dim)` reads.

Loading converts in memory (`native_config`, `read_state_dict`, `to_native_state_dict`); `convert_checkpoint` writes a
native directory once; `save_original_layout` writes a (merged) model back in InternLM2 layout for LMDeploy / OpenCompass.
The sentencepiece tokenizer is converted to a `tokenizers` fast tokenizer with the same ids (`load_tokenizer`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.model.sentencepiece_file import read_model_proto

log = logging.getLogger(__name__)

ARCHITECTURES = ("InternLM2ForCausalLM",)
# What the published repos point their auto_map at; written back by `save_original_layout`.
ORIGINAL_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
_LAYER_RENAMES = {  # InternLM2 name inside a layer -> Llama name (wqkv is split separately)
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_RENAMES = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
                "model.norm.weight": "model.norm.weight"}


def is_internlm2(config: dict) -> bool:
    """True for a config.json in the published InternLM2 / InternLM2.5 layout."""
    return config.get("model_type") == "internlm2" or any(a in ARCHITECTURES for a in config.get("architectures") or [])


# --- config --------------------------------------------------------------------------------------------------------

def native_config(config: dict):
    """The `LlamaConfig` that computes what an InternLM2 config.json describes."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ("dynamic", "linear"):
            raise TunelabError(f"config.json: rope_scaling type {kind!r} is not one InternLM2 defines "
                               "(it has 'dynamic' and 'linear'); fix rope_scaling in the model's config.json.")
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    heads = config["num_attention_heads"]
    dtype = config.get("torch_dtype") or config.get("dtype")
    return LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        initializer_range=config.get("initializer_range", 0.02),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
        pad_token_id=config.get("pad_token_id"),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        attention_bias=bool(config.get("bias", False)),  # InternLM2 `bias` covers wqkv and wo, never the MLP
        mlp_bias=False,
        rope_parameters=rope,
        architectures=["LlamaForCausalLM"],
        **({"dtype": dtype} if dtype else {}),
    )


def original_config(native: dict, base: dict | None = None) -> dict:
    """An InternLM2 config.json for a native Llama config dict (starting from the base model's, when known)."""
    out = dict(base or {})
    rope = native.get("rope_parameters") or {}
    kind = rope.get("rope_type", "default")
    out.update(
        architectures=list(ARCHITECTURES), model_type="internlm2", auto_map=out.get("auto_map", ORIGINAL_AUTO_MAP),
        vocab_size=native["vocab_size"], hidden_size=native["hidden_size"],
        intermediate_size=native["intermediate_size"], num_hidden_layers=native["num_hidden_layers"],
        num_attention_heads=native["num_attention_heads"], num_key_value_heads=native["num_key_value_heads"],
        hidden_act=native.get("hidden_act", "silu"), max_position_embeddings=native["max_position_embeddings"],
        initializer_range=native.get("initializer_range", 0.02), rms_norm_eps=native["rms_norm_eps"],
        bos_token_id=native.get("bos_token_id"), eos_token_id=native.get("eos_token_id"),
        pad_token_id=native.get("pad_token_id"), tie_word_embeddings=native.get("tie_word_embeddings", False),
        bias=bool(native.get("attention_bias", False)), rope_theta=rope.get("rope_theta", 10000.0),
        rope_scaling=None if kind == "default" else {"type": kind, "factor": rope["factor"]},
        torch_dtype=native.get("dtype") or native.get("torch_dtype") or "bfloat16",
    )
    out.setdefault("attn_implementation", "eager")
    out.setdefault("use_cache", True)
    return out


# --- weights -------------------------------------------------------------------------------------------------------

def read_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors (single or sharded) or .bin (loaded weights_only)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    files = sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise TunelabError(f"{model_dir}: no weights (*.safetensors or pytorch_model*.bin) in this directory.")
    state = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return state


def _shape(config) -> tuple[int, int, int]:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return kv_heads, heads // kv_heads, config.hidden_size // heads


def split_wqkv(wqkv: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) rows of a fused wqkv weight [(H + 2K) * D, ...] or bias [(H + 2K) * D]."""
    kv_heads, groups, head_dim = _shape(config)
    grouped = wqkv.reshape(kv_heads, groups + 2, head_dim, *wqkv.shape[1:])
    q = grouped[:, :groups].reshape(kv_heads * groups * head_dim, *wqkv.shape[1:])
    k = grouped[:, groups].reshape(kv_heads * head_dim, *wqkv.shape[1:])
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *wqkv.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config) -> torch.Tensor:
    """The inverse of `split_wqkv`."""
    kv_heads, groups, head_dim = _shape(config)
    rest = q.shape[1:]
    parts = [q.reshape(kv_heads, groups, head_dim, *rest), k.reshape(kv_heads, 1, head_dim, *rest),
             v.reshape(kv_heads, 1, head_dim, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest).contiguous()


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def to_native_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """InternLM2 weight names and fused wqkv -> LlamaForCausalLM names (config: the native LlamaConfig)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer some old .bin files carry; recomputed anyway
            continue
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = tensor
            continue
        m = _LAYER_KEY.match(key)
        if not m:
            raise TunelabError(f"InternLM2 checkpoint: unexpected weight {key!r}; is this really an InternLM2 model?")
        layer, name, kind = m.groups()
        prefix = f"model.layers.{layer}."
        if name == "attention.wqkv":
            q, k, v = split_wqkv(tensor, config)
            for proj, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                out[f"{prefix}self_attn.{proj}.{kind}"] = t
        elif name in _LAYER_RENAMES:
            out[f"{prefix}{_LAYER_RENAMES[name]}.{kind}"] = tensor
        else:
            raise TunelabError(f"InternLM2 checkpoint: unexpected weight {key!r}; is this really an InternLM2 model?")
    return out


def to_original_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM names -> InternLM2 names with a fused wqkv: the inverse of `to_native_state_dict`."""
    top = {v: k for k, v in _TOP_RENAMES.items()}
    layer_renames = {v: k for k, v in _LAYER_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in top:
            out[top[key]] = tensor
            continue
        m = _LAYER_KEY.match(key)
        if not m:
            raise TunelabError(f"cannot write {key!r} in InternLM2 layout: not a Llama weight name")
        layer, name, kind = m.groups()
        prefix = f"model.layers.{layer}."
        if name in ("self_attn.k_proj", "self_attn.v_proj"):
            continue  # written together with q_proj
        if name == "self_attn.q_proj":
            parts = [state[f"{prefix}self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{prefix}attention.wqkv.{kind}"] = fuse_wqkv(*parts, config)
        elif name in layer_renames:
            out[f"{prefix}{layer_renames[name]}.{kind}"] = tensor
        else:
            raise TunelabError(f"cannot write {key!r} in InternLM2 layout: not a Llama weight name")
    return out


def load_native(model_dir: str | Path, *, config=None, model_class=None, **from_pretrained_kwargs):
    """A LlamaForCausalLM holding an InternLM2 checkpoint (or `model_class` with `config`, as
    `model_dir.build_config` and `model_dir.model_class` make them: a reward model's classifier, scaled RoPE);
    kwargs go to `from_pretrained` (dtype, quantization...)."""
    from transformers import LlamaForCausalLM

    model_dir = Path(model_dir)
    config = config or native_config(json.loads((model_dir / "config.json").read_text()))
    state = to_native_state_dict(read_state_dict(model_dir), config)
    model = (model_class or LlamaForCausalLM).from_pretrained(None, config=config, state_dict=state,
                                                              **from_pretrained_kwargs)
    model.config._name_or_path = model.name_or_path = str(model_dir)  # peft and tunelab.json read it
    return model


def convert_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write InternLM2 checkpoint `src` as a native Llama directory `dst` (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = native_config(json.loads((src / "config.json").read_text()))
    state = to_native_state_dict(read_state_dict(src), config)
    config.save_pretrained(dst)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    load_tokenizer(src).save_pretrained(dst)
    return dst


def save_original_layout(model, tokenizer, out_dir: str | Path, *, base_dir: str | Path | None = None) -> Path:
    """Write a native (merged, unquantised) Llama model in InternLM2 layout, for LMDeploy / OpenCompass.

    With `base_dir` (the InternLM2 model it was fine-tuned from) its config fields, remote-code .py files and
    sentencepiece tokenizer files are carried over, so the result is a drop-in replacement for the base model.
    """
    from safetensors.torch import save_file

    if getattr(model.config, "model_type", None) != "llama":
        raise TunelabError(f"--format original writes InternLM2's own layout; this model is "
                           f"{model.config.model_type!r}, not an InternLM2 (Llama-graph) model. Use --format hf.")
    if any("4bit" in type(m).__name__ or "8bit" in type(m).__name__ for m in model.modules()):
        raise TunelabError("--format original needs unquantised weights; merge into the unquantised base first.")
    base_dir = base_dir or getattr(model.config, "_name_or_path", None)  # set by load_native
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_config = None
    if base_dir and Path(base_dir, "config.json").is_file():
        base_config = json.loads(Path(base_dir, "config.json").read_text())
        if not is_internlm2(base_config):
            base_config = None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(to_original_state_dict(state, model.config), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(original_config(model.config.to_dict(), base_config), indent=2))
    tokenizer.save_pretrained(out_dir)
    if base_config is not None:
        for f in Path(base_dir).iterdir():
            if f.suffix == ".py" or f.name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy2(f, out_dir / f.name)
        if tokenizer.chat_template and (out_dir / "tokenizer_config.json").is_file():
            # keep the template the model was trained with (merge sets it), not the base model's
            tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
            tok_cfg["chat_template"] = tokenizer.chat_template
            (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
            (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    return out_dir


# --- tokenizer -----------------------------------------------------------------------------------------------------

def is_internlm2_tokenizer(model_dir: str | Path) -> bool:
    path = Path(model_dir, "tokenizer_config.json")
    if not path.is_file() or not Path(model_dir, "tokenizer.model").is_file():
        return False
    cfg = json.loads(path.read_text())
    names = [str(cfg.get("tokenizer_class", ""))] + [str(x) for x in (cfg.get("auto_map") or {}).get("AutoTokenizer", [])]
    return any("InternLM2" in n or "internlm2" in n for n in names)


def _bpe_merges(vocab: dict[str, int], scores: dict[str, float], skip: set[str]) -> list[tuple[str, str]]:
    """sentencepiece BPE keeps no merge list: a merge a+b exists when a, b and ab are pieces; the ab with the higher
    score merges first (how transformers' own Llama converter rebuilds them)."""
    merges = []
    for piece, _ in sorted(scores.items(), key=lambda kv: -kv[1]):
        if piece in skip:
            continue
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab and piece[:i] not in skip and piece[i:] not in skip]
        merges.extend(sorted(local, key=lambda lr: (vocab[lr[0]], vocab[lr[1]])))
    return merges


def load_tokenizer(model_dir: str | Path):
    """InternLM2's sentencepiece tokenizer (tokenizer.model) as a fast tokenizer with the same ids, no remote code."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    model_dir = Path(model_dir)
    proto = read_model_proto(model_dir / "tokenizer.model")
    if proto.trainer_spec.model_type != 2:  # 2 = BPE
        raise TunelabError(f"{model_dir / 'tokenizer.model'}: InternLM2 tokenizers are sentencepiece BPE models; "
                           "this one is not, so it is not a (complete) InternLM2 model. Re-download the model's "
                           "tokenizer.model, or check pretrained_model_name_or_path.")
    cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    pieces = [p.piece for p in proto.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    scores = {p.piece: p.score for p in proto.pieces if p.type == 1}  # NORMAL pieces take part in merges
    # Control (<s>, </s>), unknown and user-defined pieces (<|im_start|>, ...) are matched whole, never merged.
    special = {p.piece for p in proto.pieces if p.type in (2, 3, 4)}
    for token_id, entry in sorted((tok_cfg.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        content = entry["content"] if isinstance(entry, dict) else str(entry)
        if int(token_id) >= len(pieces):
            vocab[content] = int(token_id)
        special.add(content)
    bpe = models.BPE(vocab=vocab, merges=_bpe_merges(vocab, scores, special), unk_token=sp.id_to_piece(sp.unk_id()),
                     fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    dummy_prefix = proto.normalizer_spec.add_dummy_prefix
    norm = [normalizers.Prepend("▁")] if dummy_prefix else []
    tok.normalizer = normalizers.Sequence(norm + [normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(special, key=vocab.get)])
    bos, eos, unk = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()), sp.id_to_piece(sp.unk_id())
    if tok_cfg.get("add_bos_token", True):
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    extra = [t for t in tok_cfg.get("additional_special_tokens") or [] if isinstance(t, str)]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   additional_special_tokens=extra or None, clean_up_tokenization_spaces=False)
    jinja = model_dir / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else tok_cfg.get("chat_template")
    if template:
        fast.chat_template = template
    pad = tok_cfg.get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    if pad and pad in vocab:
        fast.pad_token = pad
    return fast
