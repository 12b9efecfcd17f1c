"""Every supported family loads, takes one LoRA and one QLoRA (4-bit, CPU) step, and chats, on a tiny config."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.config.schema import TrainConfig
from tunelab.data.collate import collate
from tunelab.data.templates import get_template
from tunelab.model.generate import GenerationSettings, generate_reply
from tunelab.chat.engine import load_chat_model
from tunelab.model.load import load_model_for_inference, load_model_for_training
from tunelab.model.model_dir import supported_architectures
from tunelab.model.loss import causal_lm_loss
from tunelab.model.tiny import TINY_CONFIGS
from tunelab.model.tokenizer import load_tokenizer

# tiny arch -> (architecture in config.json, the built-in template its chat models use)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama3_chat"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2_chat"),
    "qwen3": ("Qwen3ForCausalLM", "qwen_chat"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "gemma2": ("Gemma2ForCausalLM", "gemma"),
    "gemma3": ("Gemma3ForCausalLM", "gemma"),
    "phi3": ("Phi3ForCausalLM", "phi3_chat"),
    "glm4": ("Glm4ForCausalLM", "glm4_chat"),
    "internlm2": ("InternLM2ForCausalLM", "internlm2_chat"),
}


def test_every_supported_architecture_has_a_tiny_config_and_a_test():
    assert sorted(a for a, _ in FAMILIES.values()) == sorted(supported_architectures())
    assert set(FAMILIES) <= set(TINY_CONFIGS)


def _batch(tokenizer, template):
    messages = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am an AI assistant."}]
    ids, labels = [], []
    for text, trained in template.segments(messages):
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    row = {"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}
    short = {k: v[: len(v) - 3] for k, v in row.items()}  # a second, shorter row: padding in the batch
    return collate([row, short], tokenizer.pad_token_id)


def _one_step(cfg, tokenizer, template):
    model, _ = load_model_for_training(cfg, torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss_sum, n_tokens = causal_lm_loss(model, _batch(tokenizer, template), chunk_size=8)
    loss = loss_sum / n_tokens
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= trainable
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.grad is not None)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in trainable)
    assert math.isfinite(loss.item()) and loss.item() > 0
    return model


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_lora_qlora_step_and_chat(arch, tiny_model_factory):
    model_dir = tiny_model_factory(arch)
    tokenizer = load_tokenizer(str(model_dir))
    template = get_template(FAMILIES[arch][1], tokenizer)
    common = dict(pretrained_model_name_or_path=str(model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0,
                  dtype="fp32", gradient_checkpointing=False)

    lora = _one_step(TrainConfig(method="lora", **common), tokenizer, template)
    assert not any("Linear4bit" in type(m).__name__ for m in lora.modules())

    qlora = _one_step(TrainConfig(method="qlora", **common), tokenizer, template)
    assert any(type(m).__name__ == "Linear4bit" for m in qlora.modules())  # the base really is 4-bit

    # chat: the trained adapter on the base, loaded as `tunelab chat MODEL --adapter DIR` loads it
    adapter_dir = model_dir.parent / f"{model_dir.name}_adapter"
    lora.save_pretrained(adapter_dir)
    chat = load_chat_model(str(model_dir), adapter=str(adapter_dir), device="cpu", dtype="fp32",
                           prompt_template=FAMILIES[arch][1])
    model, tok = chat.model, chat.tokenizer
    # the loaded model carries the trained adapter: it computes what the trained model does (fp32), not the base
    base, _ = load_model_for_inference(str(model_dir), device="cpu")
    probe = torch.tensor([tokenizer("Who are you? I am an AI assistant.", add_special_tokens=False).input_ids])
    with torch.no_grad():
        loaded_logits, base_logits = model(input_ids=probe).logits, base(input_ids=probe).logits
        torch.testing.assert_close(loaded_logits, lora.eval()(input_ids=probe).logits, atol=1e-5, rtol=1e-5)
    assert (loaded_logits - base_logits).abs().max() > 1e-3  # the step moved the adapter off its zero start
    reply = generate_reply(model, tok, template, [{"role": "user", "content": "Hello"}],
                           GenerationSettings(max_new_tokens=8))
    assert isinstance(reply, str)
