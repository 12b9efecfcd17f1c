"""The fast path's levers on the model compute what the plain path computes (the GPU levers: scripts/gpu_check.py)."""

import torch

from tunelab.config.schema import TrainConfig
from tunelab.model.fast import apply_fast_path, downcast_frozen_weights
from tunelab.model.plan import plan_fast_path


def test_frozen_fp32_weights_go_to_bf16_trainable_ones_stay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)
    saved = downcast_frozen_weights(model, torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    assert saved == (16 + 4) * 2


def test_on_cpu_the_gpu_levers_leave_the_model_as_it_is(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    implementation = model.config._attn_implementation
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_llama_dir), offload_activations=True)
    apply_fast_path(model, plan_fast_path(cfg, "cpu"), "cpu")
    assert model.config._attn_implementation == implementation
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)


def test_embedding_on_cpu_gives_the_same_loss_and_adapter_gradients(tiny_llama_dir):
    """EmbeddingOnCPU (embeddings_on_cpu) looks rows up outside the model's parameters: same loss and LoRA gradients
    as the nn.Embedding, peft's input-grad hook still fires (checkpointing needs it), nothing else changes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.model.fast import EmbeddingOnCPU, keep_embeddings_on_cpu
    from tunelab.model.loss import causal_lm_loss

    def lora_model():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, tie_word_embeddings=False)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
        return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))

    plain, moved = lora_model(), lora_model()
    embedding = moved.get_input_embeddings()
    n_params = len(list(moved.parameters()))
    assert keep_embeddings_on_cpu(moved, "cpu") == embedding.weight.numel() * 4
    assert isinstance(moved.get_input_embeddings(), EmbeddingOnCPU)
    assert len(list(moved.parameters())) == n_params - 1 and not any("embed_tokens" in k for k in moved.state_dict())
    moved.to("cpu")  # a plain attribute: .to() leaves it where it is
    ids = torch.randint(0, embedding.num_embeddings, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(12).repeat(2, 1)}
    losses = []
    for model in (plain, moved):
        model.train()
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    grads = {n: p.grad for n, p in moved.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, param in plain.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name])


def test_a_tied_or_trained_embedding_stays(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.model.fast import keep_embeddings_on_cpu

    tied = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, tie_word_embeddings=True)
    assert keep_embeddings_on_cpu(tied, "cpu") == 0 and isinstance(tied.get_input_embeddings(), torch.nn.Embedding)
    trained = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, tie_word_embeddings=False)
    assert keep_embeddings_on_cpu(trained, "cpu") == 0  # full fine-tuning trains it
