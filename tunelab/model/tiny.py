"""Tiny models and a tokenizer made locally, in seconds, with no download.

Used by the CPU demo and by the tests: the weights are random, but the files on disk are the real thing
(`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`), so they go through the same
`from_pretrained` loading code as a model from the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

# Special tokens of the chat templates we ship, so every template can be rendered with one tokenizer.
SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<pad>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|observation|>",
    "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>",
    "<reserved_106>", "<reserved_107>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
    "[gMASK]", "<sop>", "<tool_call>", "</tool_call>",
]

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible.",
    "Hello! I am an AI assistant. How can I help you today? Who are you? Please introduce yourself.",
    "The quick brown fox jumps over the lazy dog. Give three tips for staying healthy.",
    "请介绍一下你自己。你好，我是你的智能助手，很高兴为你服务。你是谁？我是由开发者打造的人工智能助手。",
    "Translate the following sentence into French. What is the capital of China? Beijing is the capital.",
    "system user assistant tool function call arguments result observation thought action answer",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \" # @ $ % ^ & _ | \\ ~ `",
]


def make_tokenizer(out_dir: str | Path, vocab_size: int = 1024, chat_template: str | None = None):
    """Train a byte-level BPE tokenizer on a small built-in corpus and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=None,
    )
    if chat_template:
        fast.chat_template = chat_template
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


# Small shapes of real architectures: same code paths as the real models, a few hundred KB of weights.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"]),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16),
    # Gemma: head_dim and the attention scale default to the 2B model's 256; tied embeddings as published.
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=32, tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=16,
                   query_pre_attn_scalar=16, sliding_window=32, tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"]),
    "glm4": dict(model_type="glm4", architectures=["Glm4ForCausalLM"], head_dim=16),
    # Written in the published InternLM2 layout (fused wqkv, its own names, auto_map to remote code) by
    # `_save_internlm2`; tunelab loads it as a native Llama graph (tunelab.model.internlm2).
    "internlm2": dict(model_type="llama", architectures=["InternLM2ForCausalLM"]),
}


def make_model(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    tokenizer=None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    **overrides,
) -> Path:
    """Write a randomly initialised tiny model of architecture `arch` (and a tokenizer) to `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {sorted(TINY_CONFIGS)}")
    if tokenizer is None:
        tokenizer = make_internlm2_tokenizer(out_dir) if arch == "internlm2" else make_tokenizer(out_dir)
    else:
        tokenizer.save_pretrained(out_dir)
    spec = dict(TINY_CONFIGS[arch])
    model_type = spec.pop("model_type")
    internlm2_overrides = {}
    if arch == "internlm2":
        spec.pop("architectures")
        # InternLM2's own config keys, translated when the checkpoint is written.
        internlm2_overrides = {k: overrides.pop(k) for k in ("rope_scaling", "rope_theta", "bias") if k in overrides}
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = AutoConfig.for_model(model_type, **{**settings, **spec, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "internlm2":
        _save_internlm2(model, out_dir, **internlm2_overrides)
    else:
        model.save_pretrained(out_dir)
    return out_dir


def _save_internlm2(model, out_dir: Path, rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                    bias: bool = False) -> None:
    """Write a random Llama model as a checkpoint in the published InternLM2 layout (what the hub repos hold)."""
    import torch
    from safetensors.torch import save_file

    from tunelab.model import internlm2

    state = dict(model.state_dict())
    if bias:  # InternLM2's `bias` puts biases on wqkv and wo
        g = torch.Generator().manual_seed(1)
        for key in [k for k in state if k.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                    "self_attn.v_proj.weight", "self_attn.o_proj.weight"))]:
            state[key[:-len("weight")] + "bias"] = torch.randn(state[key].shape[0], generator=g) * 0.1
    native = model.config.to_dict()
    native["attention_bias"] = bias
    native["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        native["rope_parameters"].update(rope_type=rope_scaling["type"], factor=rope_scaling["factor"])
    native["dtype"] = "float32"
    save_file(internlm2.to_original_state_dict(state, model.config), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(internlm2.original_config(native), indent=2))


def make_internlm2_tokenizer(out_dir: str | Path, vocab_size: int = 600):
    """A sentencepiece BPE tokenizer laid out like InternLM2's: `tokenizer.model` with the chat special tokens as
    user-defined pieces, and a tokenizer_config.json naming the repo's remote InternLM2Tokenizer class."""
    import io

    import sentencepiece as spm

    from tunelab.model import internlm2

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        user_defined_symbols=[t for t in SPECIAL_TOKENS if t not in ("<unk>", "<s>", "</s>")],
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    tok_cfg = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "add_eos_token": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                      "<|interpreter|>", "<|plugin|>"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return internlm2.load_tokenizer(out_dir)


def make_vision_tower(out_dir: str | Path, kind: str = "clip", *, image_size: int = 32, patch_size: int = 8,
                      hidden_size: int = 32, num_layers: int = 3, num_heads: int = 2, intermediate_size: int = 64,
                      seed: int = 0) -> Path:
    """Write a randomly initialised tiny vision tower and its image processor to `out_dir`, laid out as the hub's
    vision towers are: `kind` "clip" like openai/clip-vit-large-patch14-336 (a CLIPVisionModel with a CLS token and
    a CLIPImageProcessor that resizes the short side and crops the centre), "siglip" like google/siglip-so400m (a
    SiglipVisionModel, no CLS token, a SiglipImageProcessor that resizes to a square)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    out_dir = Path(out_dir)
    shape = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                 num_attention_heads=num_heads, intermediate_size=intermediate_size)
    torch.manual_seed(seed)
    # preprocessor_config.json written as the hub's folders have it (CLIP's in its older style, sizes as numbers)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**shape, projection_dim=hidden_size))
        processor = {"crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                     "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": image_size}
    elif kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**shape))
        processor = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                     "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
                     "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size}}
    else:
        raise ValueError(f"unknown tiny vision tower {kind!r}; known: clip, siglip")
    model.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out_dir


def describe(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "config.json").read_text())
