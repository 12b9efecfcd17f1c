"""Per-sequence log-probabilities from the chunked projection equal a full-logits log_softmax gather, value and
gradients (fp32, 1e-5), with lm_head frozen or trained and with a logit softcap; the preference objective scores the
reference as the base model with its adapters off."""

import pytest
import torch

from tunelab.data.collate import collate
from tunelab.data.encode_preference import encode_pairs, row_capacity
from tunelab.data.packing import pack_rows
from tunelab.data.preference import normalise_preference
from tunelab.data.templates import get_template
from tunelab.model.logprobs import sequence_logprobs
from tunelab.model.preference import PreferenceObjective, PreferenceSettings


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()


def _batch(tokenizer, n=5):
    pairs = [normalise_preference({"prompt": f"Question {i}: what is {i} plus {i}?",
                                   "chosen": f"It is {2 * i}. DONE", "rejected": "I do not know " * (1 + i % 2)})
             for i in range(n)]
    units = [e.row for e in encode_pairs(get_template("qwen_chat"), tokenizer, pairs, max_length=64)]
    return collate(pack_rows(units, row_capacity(64)), pad_token_id=0)


def _plain_sequence_logprobs(model, batch):
    """The straightforward way: full logits, log_softmax, gather the next tokens, sum per sequence."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
    logp = torch.log_softmax(logits.flatten(0, 1)[batch["loss_index"]], dim=-1)
    per_token = logp.gather(-1, batch["loss_targets"][:, None]).squeeze(-1)
    return torch.zeros(batch["sequence_kind"].shape[0]).index_add(0, batch["loss_sequence"], per_token)


@pytest.mark.parametrize("arch,head_trained", [("llama", True), ("llama", False), ("gemma2", True)])
def test_chunked_sequence_logprobs_and_gradients_equal_full_logits(tiny_model_factory, tiny_tokenizer, arch,
                                                                   head_trained):
    path = tiny_model_factory(arch)
    plain, chunked = _model(path), _model(path)
    if arch == "gemma2":
        assert plain.config.final_logit_softcapping  # the softcap's chain rule is exercised
    for m in (plain, chunked):
        m.get_output_embeddings().weight.requires_grad_(head_trained)
    batch = _batch(tiny_tokenizer)
    want = _plain_sequence_logprobs(plain, batch)
    got = sequence_logprobs(chunked, batch, chunk_size=7)  # several chunks, one ragged
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = torch.randn(want.shape[0], generator=torch.Generator().manual_seed(1))  # a per-sequence upstream
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_sequence_scores_the_same_packed_with_others_as_alone(tiny_llama_dir, tiny_tokenizer):
    model = _model(tiny_llama_dir).eval()  # as loaded for scoring: use_cache on in its config
    batch = _batch(tiny_tokenizer)
    alone = []
    for r in range(batch["input_ids"].shape[0]):
        pos = batch["position_ids"][r].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(pos)]):
            row = {"input_ids": batch["input_ids"][r, a:b].tolist(), "labels": batch["labels"][r, a:b].tolist(),
                   "position_ids": list(range(b - a)), "sequence_kind": [0]}
            if any(t != -100 for t in row["labels"][1:]):
                with torch.no_grad():
                    alone.append(sequence_logprobs(model, collate([row], pad_token_id=0))[0])
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(model, batch), torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_without_grad_the_chunked_path_gives_the_same_values(tiny_llama_dir, tiny_tokenizer):
    model = _model(tiny_llama_dir)
    batch = _batch(tiny_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(model, batch, chunk_size=5), _plain_sequence_logprobs(model, batch),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_the_compiled_scoring_kernel_equals_the_eager_one(softcap):
    """On a GPU both the policy's pass and the reference's pass (no gradient) score with the compiled kernel; here
    inductor compiles it for the CPU, where the arithmetic is the same."""
    from tunelab.model.logprobs import compiled_logprob_and_grad, logprob_and_grad

    torch.manual_seed(0)
    logits = (torch.randn(37, 301) * 4).bfloat16()
    targets = torch.randint(0, 301, (37,))
    compiled = compiled_logprob_and_grad()
    for want_grad in (False, True):
        logp, grad = compiled(logits, targets, softcap, want_grad)
        ref_logp, ref_grad = logprob_and_grad(logits, targets, softcap, want_grad)
        assert logp.dtype == torch.float32 and torch.allclose(logp, ref_logp, atol=1e-5, rtol=0)
        if want_grad:
            assert grad.dtype == torch.bfloat16 and torch.allclose(grad.float(), ref_grad.float(), atol=1e-2, rtol=0)
        else:
            assert grad is None and ref_grad is None


def test_dpo_with_adapters_off_reference_starts_at_log2_and_reads_the_base_model(tiny_llama_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = _model(tiny_llama_dir)
    batch = _batch(tiny_tokenizer)
    with torch.no_grad():
        base_logps = _plain_sequence_logprobs(base, batch)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    objective = PreferenceObjective(PreferenceSettings("dpo", beta=0.1, reference="adapters_off"), chunk_size=8)
    loss_sum, pairs = objective(model, batch)
    assert pairs == batch["sequence_kind"].shape[0] // 2
    # LoRA starts as the identity: policy = reference, so every pair's loss is -log sigmoid(0) = log 2
    assert loss_sum.item() / pairs == pytest.approx(0.6931472, abs=1e-5)
    loss_sum.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # make the adapter matter: the reference still reads the base model's weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        torch.testing.assert_close(objective.reference_logps(model, batch), base_logps, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(sequence_logprobs(model, batch), base_logps, atol=1e-3)
    metrics = objective.take_metrics()
    assert set(metrics) >= {"reward_chosen", "reward_rejected", "reward_margin", "accuracy", "logp_chosen"}
    assert metrics["reward_margin"][1].item() == pairs and metrics["reward_margin"][0].item() == pytest.approx(0, abs=1e-4)
    assert objective.take_metrics() == {}
