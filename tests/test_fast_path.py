"""The fast path's levers on the model compute what the plain path computes (the GPU levers: scripts/gpu_check.py)."""

import dataclasses

import pytest
import torch

from tunelab.config.schema import TrainConfig
from tunelab.model.fast import apply_fast_path, downcast_frozen_weights
from tunelab.model.load import checkpoint_layers
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
        checkpoint_layers(base)
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


def test_embedding_rows_looked_up_ahead_are_the_ones_the_forward_takes(tiny_llama_dir):
    """`batch_to_device` gathers a batch's embedding rows from its CPU ids (the loop calls it while the GPU still
    works on the step before); the forward given the moved ids takes those rows without looking them up again, a
    forward given other ids (an evaluation between steps) looks its own up and leaves them, and the loss is the same
    bit for bit."""
    from transformers import AutoModelForCausalLM

    from tunelab.model.fast import EmbeddingOnCPU, batch_to_device, keep_embeddings_on_cpu
    from tunelab.model.loss import causal_lm_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, tie_word_embeddings=False)
    model.requires_grad_(False)
    assert keep_embeddings_on_cpu(model, "cpu") > 0
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, EmbeddingOnCPU)
    looked_up = []
    real_look_up = embedding._look_up
    embedding._look_up = lambda ids: looked_up.append(ids.shape) or real_look_up(ids)
    ids = torch.randint(0, embedding.num_embeddings, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(12).repeat(2, 1)}
    with torch.no_grad():
        want, _ = causal_lm_loss(model, batch)  # looked up in the forward
        assert looked_up == [(2, 12)]
        moved = batch_to_device(batch, torch.device("cpu"), embedding)
        assert looked_up == [(2, 12)] * 2  # gathered ahead, from the CPU ids
        other = torch.randint(0, embedding.num_embeddings, (1, 5))
        model(input_ids=other)  # another batch's forward in between looks its own rows up
        assert looked_up[-1] == (1, 5) and embedding._ahead is not None
        got, _ = causal_lm_loss(model, moved)
        assert len(looked_up) == 3 and embedding._ahead is None  # the rows gathered ahead, taken once
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        causal_lm_loss(model, moved)
        assert len(looked_up) == 4  # the same ids again: looked up again


def test_a_tied_or_trained_embedding_stays(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.model.fast import keep_embeddings_on_cpu

    tied = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, tie_word_embeddings=True)
    assert keep_embeddings_on_cpu(tied, "cpu") == 0 and isinstance(tied.get_input_embeddings(), torch.nn.Embedding)
    trained = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, tie_word_embeddings=False)
    assert keep_embeddings_on_cpu(trained, "cpu") == 0  # full fine-tuning trains it


def test_qlora_loads_without_the_fp32_upcast_that_the_fast_path_would_undo(tiny_llama_dir, monkeypatch):
    """With frozen weights kept in the compute dtype (the fast path on a GPU), QLoRA's load skips peft's
    prepare_model_for_kbit_training, which upcasts every 16-bit weight to fp32 (4 GiB on Llama-3.1-8B: loading
    peaked 3.6 GiB above training) only for the fast path to cast them back. The model it gives is peft's route
    cast back: the same weights, bit for bit, the same trained parameters, checkpointing on."""
    pytest.importorskip("bitsandbytes")
    import peft

    from tunelab.model import fast
    from tunelab.model.load import load_model_for_training
    from tunelab.model.plan import FastPathPlan

    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_llama_dir), method="qlora", dtype="bf16", lora_r=8,
                      gradient_checkpointing=True)
    lean = FastPathPlan(enabled=True, checkpointing=True, four_bit=True, frozen_weights_in_compute_dtype=True)
    cast_back = []
    downcast = fast.downcast_frozen_weights
    monkeypatch.setattr(fast, "downcast_frozen_weights", lambda m, d: cast_back.append(downcast(m, d)) or 0)
    upcasts = []
    prepare = peft.prepare_model_for_kbit_training
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda *a, **k: upcasts.append(1) or prepare(*a, **k))
    torch.manual_seed(0)
    got, _ = load_model_for_training(cfg, torch.device("cpu"), lean)
    assert upcasts == [] and cast_back == [0]  # nothing went to fp32, so nothing came back

    torch.manual_seed(0)
    peft_route = dataclasses.replace(lean, frozen_weights_in_compute_dtype=False)
    want, _ = load_model_for_training(cfg, torch.device("cpu"), peft_route)
    assert upcasts == [1]
    assert any(p.dtype == torch.float32 and not p.requires_grad for p in want.parameters())  # peft upcast these
    downcast(want, torch.bfloat16)
    got_params, want_params = dict(got.named_parameters()), dict(want.named_parameters())
    assert got_params.keys() == want_params.keys()
    for name, p in want_params.items():
        assert got_params[name].requires_grad == p.requires_grad, name
        assert got_params[name].dtype == p.dtype and torch.equal(got_params[name], p), name
    assert {n for n, p in got_params.items() if p.requires_grad} and all(
        "lora_" in n for n, p in got_params.items() if p.requires_grad)
    assert got.base_model.model.is_gradient_checkpointing
