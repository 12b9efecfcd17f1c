"""InternLM2 checkpoints load as native Llama graphs that compute exactly what the published architecture computes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tunelab.model import internlm2
from tunelab.model.tiny import make_model


# --- an independent reference: the published InternLM2 forward, on the fused checkpoint tensors ----------------------

def _rms_norm(x, weight, eps):
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _rope_cos_sin(cfg, seq_len, head_dim):
    base, max_pos = cfg["rope_theta"], cfg["max_position_embeddings"]
    scaling = cfg.get("rope_scaling") or {}
    positions = torch.arange(seq_len, dtype=torch.float32)
    if scaling.get("type") == "dynamic" and seq_len > max_pos:  # InternLM2DynamicNTKScalingRotaryEmbedding
        factor = scaling["factor"]
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
    if scaling.get("type") == "linear":  # InternLM2LinearScalingRotaryEmbedding
        positions = positions / scaling["factor"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_logits(model_dir, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the InternLM2 architecture as published (modeling_internlm2.py), from config.json + safetensors."""
    cfg = json.loads((model_dir / "config.json").read_text())
    w = load_file(str(model_dir / "model.safetensors"))
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // n_heads
    groups = n_heads // n_kv
    eps = cfg["rms_norm_eps"]
    bsz, seq = input_ids.shape
    cos, sin = _rope_cos_sin(cfg, seq, head_dim)
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    h = w["model.tok_embeddings.weight"][input_ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms_norm(h, w[p + "attention_norm.weight"], eps)
        qkv = F.linear(x, w[p + "attention.wqkv.weight"], w.get(p + "attention.wqkv.bias"))
        # rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=2 + groups, d=head_dim)
        qkv = qkv.view(bsz, seq, n_kv, groups + 2, head_dim)
        q = qkv[..., :groups, :].reshape(bsz, seq, n_heads, head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(head_dim) + mask
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, seq, n_heads * head_dim)
        h = h + F.linear(attn, w[p + "attention.wo.weight"], w.get(p + "attention.wo.bias"))
        x = _rms_norm(h, w[p + "ffn_norm.weight"], eps)
        mlp = F.linear(F.silu(F.linear(x, w[p + "feed_forward.w1.weight"])) * F.linear(x, w[p + "feed_forward.w3.weight"]),
                       w[p + "feed_forward.w2.weight"])
        h = h + mlp
    h = _rms_norm(h, w["model.norm.weight"], eps)
    return F.linear(h, w["output.weight"])


VARIANTS = {
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "mha_bias_linear_rope": dict(num_heads=4, num_kv_heads=4, bias=True, rope_theta=1e6,
                                 rope_scaling={"type": "linear", "factor": 2.0}),
    "gqa4_dynamic_rope": dict(num_heads=8, num_kv_heads=2, max_position_embeddings=16,
                              rope_scaling={"type": "dynamic", "factor": 2.0}),
}


@pytest.fixture(scope="module")
def internlm2_dirs(tmp_path_factory):
    out = {}
    for name, kw in VARIANTS.items():
        out[name] = make_model(tmp_path_factory.mktemp(f"internlm2_{name}"), "internlm2", **kw)
    return out


def test_tiny_checkpoint_is_in_published_layout(internlm2_dirs):
    d = internlm2_dirs["gqa"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["InternLM2ForCausalLM"] and cfg["model_type"] == "internlm2"
    assert "AutoModelForCausalLM" in cfg["auto_map"]
    keys = set(load_file(str(d / "model.safetensors")))
    assert {"model.tok_embeddings.weight", "output.weight", "model.layers.0.attention.wqkv.weight",
            "model.layers.0.feed_forward.w1.weight", "model.layers.0.attention_norm.weight",
            "model.layers.0.ffn_norm.weight"} <= keys
    # (heads + 2 * kv_heads) * head_dim rows
    assert load_file(str(d / "model.safetensors"))["model.layers.0.attention.wqkv.weight"].shape == (128, 64)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_reference_forward(internlm2_dirs, variant):
    d = internlm2_dirs[variant]
    model = internlm2.load_native(d, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))  # 24 > 16: dynamic rope kicks in
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, reference_logits(d, ids), atol=1e-5, rtol=1e-5)


def test_wrong_split_would_be_caught(internlm2_dirs):
    """The reference is sensitive to the wqkv layout: a plain [all q, all k, all v] split gives other logits."""
    d = internlm2_dirs["gqa"]
    model = internlm2.load_native(d, dtype=torch.float32)
    ids = torch.arange(3, 19).unsqueeze(0)
    wqkv = load_file(str(d / "model.safetensors"))["model.layers.0.attention.wqkv.weight"]
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight.copy_(wqkv[:64]), attn.k_proj.weight.copy_(wqkv[64:96]), attn.v_proj.weight.copy_(wqkv[96:])
        assert not torch.allclose(model(input_ids=ids).logits, reference_logits(d, ids), atol=1e-3)


def test_export_to_original_layout_is_bit_exact(internlm2_dirs, tmp_path):
    d = internlm2_dirs["mha_bias_linear_rope"]
    model = internlm2.load_native(d, dtype=torch.float32)
    tokenizer = internlm2.load_tokenizer(d)
    out = internlm2.save_original_layout(model, tokenizer, tmp_path / "orig", base_dir=d)
    before, after = load_file(str(d / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    cfg_before, cfg_after = (json.loads((p / "config.json").read_text()) for p in (d, out))
    for key in ("architectures", "model_type", "auto_map", "num_key_value_heads", "bias", "rope_theta", "rope_scaling",
                "hidden_size", "vocab_size"):
        assert cfg_after[key] == cfg_before[key], key
    assert (out / "tokenizer.model").read_bytes() == (d / "tokenizer.model").read_bytes()


def test_convert_checkpoint_writes_a_dir_transformers_loads_directly(internlm2_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = internlm2_dirs["gqa4_dynamic_rope"]
    out = internlm2.convert_checkpoint(d, tmp_path / "native")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(3, 500, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference_logits(d, ids), atol=1e-5, rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|im_end|>") == internlm2.load_tokenizer(d).convert_tokens_to_ids("<|im_end|>")


# --- tokenizer ------------------------------------------------------------------------------------------------------

TEXTS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello! Who are you?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "请介绍一下你自己。  Two  spaces, digits 2024 and émoji 🤖 <|action_start|><|plugin|>\n{\"a\": 1}<|action_end|>",
    " leading space and trailing\n\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_equal_sentencepiece(internlm2_dirs, text):
    import sentencepiece as spm

    d = internlm2_dirs["gqa"]
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    tok = internlm2.load_tokenizer(d)
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == sp.encode(text)
    assert tok.decode(ids) == text
    assert tok(text).input_ids == [sp.bos_id()] + ids  # add_bos_token, as InternLM2's tokenizer does


def test_tokenizer_special_tokens(internlm2_dirs):
    import sentencepiece as spm

    d = internlm2_dirs["gqa"]
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    tok = internlm2.load_tokenizer(d)
    for t in ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>"):
        assert tok.convert_tokens_to_ids(t) == sp.piece_to_id(t) and t in tok.all_special_tokens
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "</s>")
    assert tok.decode(tok("<|im_end|>", add_special_tokens=False).input_ids, skip_special_tokens=True) == ""


def test_load_tokenizer_uses_native_conversion_even_with_trust_remote_code(internlm2_dirs):
    """XTuner-style configs say trust_remote_code=True; the repo code cannot run on transformers 5, ours is used."""
    from tunelab.model.tokenizer import load_tokenizer

    d = internlm2_dirs["gqa"]
    assert not list(d.glob("*.py"))
    tok = load_tokenizer(str(d), trust_remote_code=True)
    assert tok.convert_tokens_to_ids("<|im_end|>") == internlm2.load_tokenizer(d).convert_tokens_to_ids("<|im_end|>")


def test_real_internlm2_id_layout(tmp_path):
    """Special tokens beyond the sentencepiece vocab, as in tokenizer_config.json's added_tokens_decoder, keep their
    ids (in the published tokenizer <|im_end|> is 92542; here a tiny vocab is extended the same way)."""
    from tunelab.model.tiny import make_internlm2_tokenizer

    make_internlm2_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"600": {"content": "<|new_special|>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = internlm2.load_tokenizer(tmp_path)
    assert tok("hi<|new_special|>", add_special_tokens=False).input_ids[-1] == 600


def test_train_merge_chat(tmp_path):
    """LoRA-train the InternLM2 checkpoint on one answer, merge, save in both layouts: each chats the taught answer."""
    from tunelab.config.schema import TrainConfig
    from tunelab.data.collate import collate
    from tunelab.data.templates import get_template
    from tunelab.model.generate import GenerationSettings, generate_reply
    from tunelab.model.load import load_model_for_inference, load_model_for_training
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.model.loss import causal_lm_loss

    # Weights larger than the usual 0.02 init, so a frozen random lm_head can express a confident answer.
    d = make_model(tmp_path / "base", "internlm2", initializer_range=0.2)
    cfg = TrainConfig(pretrained_model_name_or_path=str(d), method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0,
                      dtype="fp32", gradient_checkpointing=False)
    tokenizer = load_tokenizer(str(d))
    template = get_template("internlm2_chat", tokenizer)
    question = [{"role": "user", "content": "Who are you?"}]
    answer = "I am tunelab's assistant."
    ids, labels = [], []
    for text, trained in template.segments(question + [{"role": "assistant", "content": answer}]):
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids, labels = ids + piece, labels + (piece if trained else [-100] * len(piece))
    batch = collate([{"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}],
                    tokenizer.pad_token_id)
    model, _ = load_model_for_training(cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss_sum, n = causal_lm_loss(model, batch)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss_sum.item() / n)
    assert losses[-1] < 0.1 < 2 < losses[0]

    merged = model.merge_and_unload()
    tokenizer.chat_template = template.to_jinja()  # as `tunelab convert merge` does
    native_dir, original_dir = tmp_path / "merged_native", tmp_path / "merged_original"
    merged.save_pretrained(native_dir)
    tokenizer.save_pretrained(native_dir)
    internlm2.save_original_layout(merged, tokenizer, original_dir, base_dir=d)
    assert json.loads((native_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((original_dir / "config.json").read_text())["architectures"] == ["InternLM2ForCausalLM"]
    for out in (native_dir, original_dir):
        chat_model, chat_tok = load_model_for_inference(str(out), device="cpu")
        reply = generate_reply(chat_model, chat_tok, template, question, GenerationSettings(max_new_tokens=20))
        assert reply == answer, out.name
        assert chat_tok.chat_template == template.to_jinja(), out.name
    # the original-layout export computes what the published architecture computes
    probe = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, reference_logits(original_dir, probe),
                                   atol=1e-5, rtol=1e-5)
