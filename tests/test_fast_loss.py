"""The chunked loss over trained tokens equals the plain full-logits loss, value and gradients (fp32, 1e-5)."""

import torch

from tunelab.model.loss import causal_lm_loss, loss_chunk_rows


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
