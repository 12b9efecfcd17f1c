"""The chunked loss over trained tokens equals the plain full-logits loss, value and gradients (fp32, 1e-5); its
gradients, taken in the forward pass, equal autograd's."""

import pytest
import torch

from tunelab.data.collate import collate
from tunelab.model.loss import LinearCrossEntropy, causal_lm_loss, cross_entropy_and_grad, loss_chunk_rows


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()


def _packed_batch(vocab):
    torch.manual_seed(0)
    ids = torch.randint(5, vocab, (2, 24))
    pos = torch.stack([torch.cat([torch.arange(10), torch.arange(14)]), torch.arange(24)])
    labels = ids.clone()
    labels[pos == 0] = -100
    labels[0, 11:15] = -100  # a prompt: untrained
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def test_chunked_loss_and_gradients_equal_full_logits_loss(tiny_llama_dir):
    plain, chunked = _model(tiny_llama_dir), _model(tiny_llama_dir)
    batch = _packed_batch(plain.config.vocab_size)
    loss_a, n_a = causal_lm_loss(plain, batch, chunked=False)
    loss_b, n_b = causal_lm_loss(chunked, batch, chunk_size=5, chunked=True)  # several chunks, one ragged
    assert n_a == n_b == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    loss_a.backward()
    loss_b.backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_chunk_rows_shrink_for_large_vocabularies():
    assert loss_chunk_rows(4096, 4000) == 4096
    assert loss_chunk_rows(4096, 128256) * 128256 <= 2**25  # 128 MiB of fp32 logits at a time
    assert loss_chunk_rows(4096, 10**9) == 1


def _reference(hidden, targets, weight, bias, softcap):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("softcap, with_bias, head_trained", [(None, False, True), (30.0, True, True),
                                                              (None, False, False)])
def test_gradients_taken_in_forward_equal_autograd(softcap, with_bias, head_trained):
    """LinearCrossEntropy: loss and every gradient equal plain autograd's, in ragged chunks, scaled like a mean."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    weight = torch.randn(50, 16, requires_grad=head_trained)
    bias = torch.randn(50, requires_grad=True) if with_bias else None
    expected = _reference(hidden, targets, weight, bias, softcap)
    (expected / 37).backward()
    want = [t.grad.clone() for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    loss = LinearCrossEntropy.apply(hidden, targets, weight, bias, softcap, 8, False)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    (loss / 37).backward()
    got = [t.grad for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    assert len(got) == len(want) == 1 + head_trained + with_bias
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    if not head_trained:
        assert weight.grad is None


def test_bf16_autocast_matches_autograd_under_autocast():
    """Under bf16 autocast the logits are bf16 matmuls in both; loss and gradients agree to bf16 rounding."""
    torch.manual_seed(1)
    hidden = torch.randn(40, 32, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    weight = torch.randn(300, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference(hidden, targets, weight, None, None)
    expected.backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LinearCrossEntropy.apply(hidden, targets, weight, None, None, 16, False)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=0)
    torch.testing.assert_close(hidden.grad, want[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weight.grad, want[1], rtol=2e-2, atol=2e-2)


def test_compiled_softmax_gradient_equals_eager():
    """What the GPU runs (`compiled_cross_entropy_and_grad`: compiled, dynamic rows, the vocabulary fixed) gives the
    eager numbers, and chunks of other row counts (the last one of a step) reuse the compiled code."""
    from torch._dynamo.utils import counters

    from tunelab.model.loss import compiled_cross_entropy_and_grad

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(2)
    for rows, softcap in ((9, None), (4, None), (7, None), (6, 30.0)):
        logits = torch.randn(rows, 70, dtype=torch.bfloat16) * 4
        targets = torch.randint(0, 70, (rows,))
        want_loss, want_grad = cross_entropy_and_grad(logits, targets, softcap)
        got_loss, got_grad = compiled_cross_entropy_and_grad(logits, targets, softcap)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-2, atol=1e-3)
        assert got_grad.dtype == torch.bfloat16
    assert counters["stats"]["unique_graphs"] == 2  # one for the rows without a soft cap, one with
    compiled_cross_entropy_and_grad(torch.randn(5, 71, dtype=torch.bfloat16), torch.randint(0, 71, (5,)), None)
    assert counters["stats"]["unique_graphs"] == 3  # the vocabulary was a constant in the kernel
    torch._dynamo.reset()


def test_tied_embedding_and_softcap_gradients(tiny_model_factory):
    """Gemma 2 (lm_head tied to the embedding, logits soft-capped): chunked = full logits, loss and gradients."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("gemma2")
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    chunked = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    assert plain.config.final_logit_softcapping and plain.config.tie_word_embeddings
    batch = _packed_batch(plain.config.vocab_size)
    loss_a, _ = causal_lm_loss(plain, batch, chunked=False)
    loss_b, _ = causal_lm_loss(chunked, batch, chunk_size=7, chunked=True)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    loss_a.backward()
    loss_b.backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_collate_lists_the_trained_positions_on_the_cpu(tiny_llama_dir):
    """collate's loss_index / loss_targets are what labels give, and the loss is the same with or without them."""
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "position_ids": [0, 1, 2, 3, 4]},
            {"input_ids": [10, 11, 12], "labels": [-100, 11, 12], "position_ids": [0, 1, 2]}]
    batch = collate(rows, pad_token_id=0)
    assert batch["loss_index"].tolist() == [1, 2, 3, 5, 6]  # position t is trained when labels[t + 1] is
    assert batch["loss_targets"].tolist() == [7, 8, 9, 11, 12]
    model = _model(tiny_llama_dir)
    with_index, n_a = causal_lm_loss(model, batch, chunk_size=2)
    without = {k: v for k, v in batch.items() if not k.startswith("loss_")}
    from_labels, n_b = causal_lm_loss(model, without, chunk_size=2)
    assert n_a == n_b == 5
    torch.testing.assert_close(with_index, from_labels)
