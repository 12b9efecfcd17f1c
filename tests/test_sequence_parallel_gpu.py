"""Sequence parallelism's model side on one GPU (skipped without CUDA): NCCL's all-to-all, the exchange of heads
inside compiled layers (eager code between compiled parts, the checkpoint around the layer), flash varlen and cuDNN
attention over whole rows. With one rank in the group the exchange moves nothing, so loss and gradients must be the
plain fast path's. Several GPUs: benchmarks/bench_sequence_parallel.py; the maths on several ranks:
tests/test_sequence_parallel.py (CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.test_distributed import free_port
from tests.test_sequence_parallel import load, packed_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def one_rank_group():
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                         device_id=torch.device("cuda", 0))
    yield torch.distributed.new_group([0])
    torch.distributed.destroy_process_group()


def loss_and_grads(model_dir, batch, method: str, size: int, group) -> tuple[float, dict]:
    from tunelab.config.schema import TrainConfig
    from tunelab.model.loss import causal_lm_objective
    from tunelab.model.sequence_parallel import SequenceParallelObjective

    cfg = TrainConfig(pretrained_model_name_or_path=str(model_dir), method=method, lora_r=4, lora_alpha=8,
                      lora_dropout=0.0, dtype="bf16", use_compile=True, sequence_parallel_size=size)
    model, plan = load(cfg, "cuda")
    assert plan.compile and plan.checkpoint_inside_compile == (size == 1)
    objective = causal_lm_objective(plan)
    if size > 1:  # the plan of a split row; the group here has one rank
        objective = SequenceParallelObjective(objective, group)
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_sum, n = objective(model, batch)
    (loss_sum / n).backward()
    return float(loss_sum.detach()) / n, {k: p.grad.float() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed rows: flash varlen", "whole rows: cuDNN"])
def test_the_exchange_inside_compiled_layers_gives_the_fast_path_loss_and_gradients(packed, method, tiny_llama_dir,
                                                                                    one_rank_group):
    from tunelab.data.collate import collate

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    import json

    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    rows = packed_rows(vocab)
    if not packed:  # 4 rows, each one sample of 48 tokens
        ids = torch.randint(10, vocab, (4, 48), generator=torch.Generator().manual_seed(0)).tolist()
        rows = [{"input_ids": row, "labels": [-100] + row[1:], "position_ids": list(range(48))} for row in ids]
    batch = collate(rows, 0)
    plain_loss, plain = loss_and_grads(tiny_llama_dir, batch, method, 1, one_rank_group)
    split_loss, split = loss_and_grads(tiny_llama_dir, batch, method, 2, one_rank_group)
    assert split_loss == pytest.approx(plain_loss, rel=1e-2)
    for name, grad in plain.items():
        error = (split[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert error < 5e-2, (name, float(error))
