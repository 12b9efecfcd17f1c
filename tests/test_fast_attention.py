"""Varlen attention over packed rows (CPU: the same function, per-sample sdpa instead of the flash kernel)."""

import torch

from tunelab.model import attention


def test_cu_seqlens_from_position_ids_marks_every_sample_and_row_start():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])  # row 2 starts mid-sample: still a boundary
    cu, max_len = attention.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 6, 8, 12]
    assert cu.dtype == torch.int32
    assert max_len == 4


def _block_diagonal_sdpa(q, k, v, position_ids):
    """Reference: sdpa over [B, H, T, D] with the block-diagonal causal mask of the packed rows."""
    seg = (position_ids == 0).cumsum(-1)
    t = position_ids.shape[1]
    mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]).transpose(1, 2)


def test_attention_function_equals_block_diagonal_sdpa():
    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
    q = torch.randn(2, 4, 12, 8)
    k, v = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    cu, max_len = attention.cu_seqlens_from_position_ids(pos)
    out, _ = attention.varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=max_len)
    assert out.shape == (2, 12, 4, 8)
    torch.testing.assert_close(out, _block_diagonal_sdpa(q, k, v, pos), atol=1e-5, rtol=1e-5)


def test_static_boundaries_pad_with_empty_samples_and_change_nothing(monkeypatch):
    """For CUDA graphs the boundaries come in a few shapes: cu_seqlens padded with empty samples to a power of two
    (>= 16) and the width as the longest sample. Same attention; rows of one whole sample keep theirs."""
    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
    cu, max_len = attention.cu_seqlens_from_position_ids(pos)
    padded, width = attention._static_boundaries(cu, max_len, 2, 12)
    assert padded.tolist() == cu.tolist() + [24] * (16 - cu.numel()) and width == 12
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    out, _ = attention.varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=padded, max_length_q=width)
    torch.testing.assert_close(out, _block_diagonal_sdpa(q, k, v, pos), atol=1e-5, rtol=1e-5)
    whole = attention.cu_seqlens_from_position_ids(torch.arange(12).repeat(2, 1))
    assert attention._static_boundaries(*whole, 2, 12)[0].tolist() == [0, 12, 24]
    many = torch.arange(41, dtype=torch.int32)  # 40 samples of one token: the next power of two, 64
    assert attention._static_boundaries(many, 1, 1, 40)[0].numel() == 64


def _tiny(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_model_with_varlen_attention_keeps_samples_apart(tiny_llama_dir):
    """Logits of a packed row equal those of each sample run alone, and those of transformers' own sdpa path."""
    plain, fast = _tiny(tiny_llama_dir), _tiny(tiny_llama_dir)
    attention.enable_varlen_attention(fast)
    assert fast.config._attn_implementation == attention.ATTN_NAME
    torch.manual_seed(0)
    a, b = torch.randint(5, 500, (1, 7)), torch.randint(5, 500, (1, 9))
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        packed = fast(input_ids=ids, position_ids=pos).logits
        # use_cache=False: with a cache, transformers' own sdpa path ignores the sample boundaries
        reference = plain(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone = plain(input_ids=b).logits
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 7:], alone, atol=1e-5, rtol=1e-5)


def test_generation_still_works_after_switching(tiny_llama_dir):
    plain, fast = _tiny(tiny_llama_dir), _tiny(tiny_llama_dir)
    attention.enable_varlen_attention(fast)
    prompt = torch.randint(5, 500, (1, 6))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert fast.generate(prompt, **kwargs).tolist() == plain.generate(prompt, **kwargs).tolist()


def test_whole_row_attention_equals_causal_sdpa_and_compiles_without_a_break():
    # Rows of one sample take sdpa with the kernels in order of preference (cuDNN's on a GPU, the CPU's flash kernel
    # here); dynamo must trace the kernel choice inside compiled layers (fullgraph: no break).
    from tunelab.model.attention import _whole_rows

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(_whole_rows(q, k, v, 0.3), want)
    compiled = torch.compile(_whole_rows, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, 0.3), want)


def test_attention_runs_in_autocasts_dtype_as_sdpa_would():
    # Full fine-tuning with fp32 master weights: RoPE's fp32 tables hand attention fp32 q and k under bf16 autocast.
    # sdpa would be autocast to bf16; so is ours, which on a GPU is what lets the bf16 varlen flash kernel run.
    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    cu, max_len = attention.cu_seqlens_from_position_ids(pos)
    assert attention.attention_dtype(q) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.attention_dtype(q) == torch.bfloat16
        assert attention.attention_dtype(q.bfloat16()) == torch.bfloat16
        out, _ = attention.varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=max_len)
    assert out.dtype == torch.bfloat16
    want = _block_diagonal_sdpa(*(x.bfloat16() for x in (q, k, v)), pos)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


def test_per_sample_attention_compiles_once_whatever_the_boundaries():
    """The per-sample path loops over boundary values; compiled inside a layer it must not recompile for every new
    batch (each recompile is a layer's compile)."""
    import torch._dynamo

    torch._dynamo.reset()
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    layer = torch.compile(lambda q, k, v, cu: attention._segmented_sdpa(q, k, v, cu, None) * 2, backend="eager",
                          dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for cuts in ([0, 5, 12, 20], [0, 7, 12, 20], [0, 3, 9, 20]):  # same count (padded), new values
            cu = torch.tensor(cuts, dtype=torch.int32)
            want = attention._segmented_sdpa(q, k, v, cu, None) * 2
            torch.testing.assert_close(layer(q, k, v, cu), want)
