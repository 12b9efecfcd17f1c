"""neftune_noise_alpha: the noise transformers' Trainer adds (its own hook, `transformers.integrations.neftune`, is
the reference), only while training, through the loop as `tunelab train` runs it, and never under a preference
objective."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.train_helpers import assert_one_line_error, write_config
from tunelab.cli.main import main
from tunelab.model.load import load_causal_lm
from tunelab.model.neftune import add_embedding_noise


def _embed(model, ids):
    return model.get_input_embeddings()(ids)


def test_the_noise_is_transformers_own_and_only_in_training(tiny_llama_dir):
    from transformers.integrations.neftune import neftune_post_forward_hook

    ours = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32, device="cpu")
    theirs = copy.deepcopy(ours)
    add_embedding_noise(ours, 5.0)
    theirs.get_input_embeddings().neftune_noise_alpha = 5.0
    theirs.get_input_embeddings().register_forward_hook(neftune_post_forward_hook)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    clean = _embed(load_causal_lm(str(tiny_llama_dir), dtype=torch.float32, device="cpu"), ids)
    ours.train(), theirs.train()
    torch.manual_seed(1)
    noisy = _embed(ours, ids)
    torch.manual_seed(1)
    torch.testing.assert_close(noisy, _embed(theirs, ids), rtol=0, atol=0)
    bound = 5.0 / (24 * clean.size(-1)) ** 0.5
    assert 0.9 * bound < (noisy - clean).abs().max() <= bound
    ours.eval()
    torch.testing.assert_close(_embed(ours, ids), clean, rtol=0, atol=0)  # evaluation questions, chat: no noise


def test_a_row_split_over_ranks_gets_the_whole_rows_magnitude(tiny_llama_dir):
    """sequence_parallel_size = 4: a rank embeds a quarter of the row, and the noise is the whole row's."""
    model = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32, device="cpu")
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    clean = _embed(model, ids)
    add_embedding_noise(model, 5.0, sequence_parallel_size=4)
    model.train()
    noise = (_embed(model, ids) - clean).abs().max()
    bound = 5.0 / (4 * 16 * clean.size(-1)) ** 0.5
    assert 0.9 * bound < noise <= bound


def test_the_noise_stays_when_the_fast_path_keeps_the_embedding_in_cpu_memory(tiny_llama_dir):
    from tunelab.model.fast import EmbeddingOnCPU, keep_embeddings_on_cpu

    model = load_causal_lm(str(tiny_llama_dir), dtype=torch.float32, device="cpu")
    model.requires_grad_(False)
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    clean = _embed(model, ids)
    add_embedding_noise(model, 5.0)
    if not keep_embeddings_on_cpu(model, torch.device("cpu")):
        pytest.skip("the tiny model ties its embedding to lm_head")
    assert isinstance(model.get_input_embeddings(), EmbeddingOnCPU)
    model.train()
    assert (_embed(model, ids) - clean).abs().max() > 0


def _losses(work_dir) -> list[float]:
    import json

    records = [json.loads(line) for line in (work_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "step" in r and "loss" in r]


def test_a_run_with_neftune_trains_on_noisy_embeddings_and_learns(tmp_path, tiny_llama_dir):
    plain = write_config(tmp_path / "plain", tiny_llama_dir, max_epochs=4, dtype="fp32", gradient_checkpointing=False)
    noisy = write_config(tmp_path / "noisy", tiny_llama_dir, max_epochs=4, dtype="fp32", gradient_checkpointing=False,
                         neftune_noise_alpha=5.0)
    for config in (plain, noisy):
        assert main(["train", str(config), "--work-dir", str(config.parent / "w"), "--device", "cpu"]) == 0
    plain_losses, noisy_losses = _losses(tmp_path / "plain" / "w"), _losses(tmp_path / "noisy" / "w")
    assert noisy_losses != plain_losses  # the noise reached the steps
    assert noisy_losses[-1] < noisy_losses[0]


def test_a_preference_objective_with_neftune_is_refused(tmp_path, tiny_llama_dir, capsys):
    config = write_config(tmp_path, tiny_llama_dir, objective="dpo", neftune_noise_alpha=5.0)
    code = main(["train", str(config), "--work-dir", str(tmp_path / "w"), "--device", "cpu"])
    assert_one_line_error(capsys, code, "neftune_noise_alpha", "objective = 'dpo'")
