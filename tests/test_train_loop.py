"""The training loop on CPU with tiny models: the loss falls, a taught answer comes back, only adapters train,
every trained token weighs the same however the batch is split, and the work dir holds what the user reads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.train_helpers import capture_model, identity_rows, tiny_cfg, varied_rows
from tunelab.train.loop import train


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_full_finetune_learns_identity_and_writes_work_dir(tiny_llama_dir, tokenizer, tmp_path, monkeypatch):
    from tunelab.data.templates import get_template
    from tunelab.model.generate import GenerationSettings, generate_reply

    captured = capture_model(monkeypatch)
    cfg = tiny_cfg(tiny_llama_dir, max_steps=30, batch_size=4, lr=3e-3, evaluation_inputs=["Who are you?"],
                   evaluation_freq=1000, logging_steps=10, save_steps=15)
    result = train(cfg, tmp_path, train_rows=identity_rows(tokenizer), device="cpu")

    assert result.step == 30 and not result.interrupted
    assert result.losses[30] < 0.3 * result.losses[1], result.losses
    reply = generate_reply(captured["model"], tokenizer, get_template("qwen_chat"),
                           [{"role": "user", "content": "Who are you?"}], GenerationSettings(max_new_tokens=16))
    assert "Tuna" in reply

    # Before / after answers, saved and comparable.
    before = (tmp_path / "eval_outputs_iter_0.txt").read_text()
    after = (tmp_path / "eval_outputs_iter_30.txt").read_text()
    assert "Who are you?" in before and "Tuna" not in before and "Tuna" in after
    # JSONL log: step 1, every logging step and the last; each with the promised fields.
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 10, 20, 30]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "memory_gb"} <= set(records[0])
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "resolved_config.py").is_file()
    # Checkpoints: a full HF model in safetensors, metadata, and the pointer on the final step.
    last = tmp_path / "iter_30"
    assert result.last_checkpoint == last
    assert (tmp_path / "last_checkpoint").read_text().strip() == "iter_30"  # a name: the work dir may move
    assert (last / "model" / "model.safetensors").is_file() and (last / "model" / "config.json").is_file()
    meta = json.loads((last / "tunelab.json").read_text())
    assert meta["method"] == "full" and meta["prompt_template"] == "qwen_chat"
    assert meta["base_model"] == str(tiny_llama_dir)
    state = torch.load(last / "training_state.pt", weights_only=True)
    assert state["step"] == 30 and "optimizer" in state and "rng" in state


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_train_and_base_stays_frozen(method, tiny_llama_dir, tokenizer, tmp_path, monkeypatch):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    captured = capture_model(monkeypatch)
    cfg = tiny_cfg(tiny_llama_dir, method=method, max_steps=8, batch_size=4, lr=2e-2, save_steps=8)
    result = train(cfg, tmp_path, train_rows=identity_rows(tokenizer), device="cpu")

    assert result.losses[8] < result.losses[1]
    model = captured["model"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if method == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    else:  # the frozen base weights are bit-for-bit those on disk
        base = load_file(tiny_llama_dir / "model.safetensors")
        for name, param in model.named_parameters():
            if "base_layer" in name:
                original = name.replace("base_model.model.", "").replace(".base_layer", "")
                assert torch.equal(param.detach(), base[original]), name
    adapter = load_file(tmp_path / "iter_8" / "model" / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert not (tmp_path / "iter_8" / "model" / "model.safetensors").exists()
    state = torch.load(tmp_path / "iter_8" / "training_state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == len(trainable)  # the optimiser holds the adapters only


def test_qlora_on_cpu_trains_the_same_after_answering_evaluation_questions(tiny_llama_dir, tokenizer, tmp_path):
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel the first time the layer runs in eval mode,
    and keeps using that kernel: after the evaluation questions (before step 1) QLoRA on a CPU with AVX512-BF16
    would train with other gradients (Qwen2's biases: "a view of a leaf Variable ... in-place operation"). The
    questions must not change training (without AVX512-BF16 there is no repacking and the test cannot fail)."""
    pytest.importorskip("bitsandbytes")
    losses = {}
    for asked in ([], ["Who are you?"]):
        cfg = tiny_cfg(tiny_llama_dir, method="qlora", max_steps=3, batch_size=4, lr=2e-2, save_steps=100,
                       evaluation_inputs=asked, evaluation_freq=1, eval_max_new_tokens=2)
        losses[bool(asked)] = train(cfg, tmp_path / str(bool(asked)), train_rows=identity_rows(tokenizer),
                                    device="cpu").losses
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


def test_evaluation_answers_are_no_longer_than_max_length(tiny_llama_dir, tokenizer, monkeypatch):
    """The default eval_max_new_tokens (128) with max_length = 32 generates at most 32 tokens (a larger value set in
    the config is refused when it loads)."""
    import tunelab.model.generate as generate
    from tunelab.train.evaluate import answer_questions

    asked = []
    monkeypatch.setattr(generate, "generate_reply", lambda model, tok, template, messages, settings, **kw:
                        asked.append(settings.max_new_tokens) or "ok")
    for max_length, expected in ((32, 32), (512, 128)):
        cfg = tiny_cfg(tiny_llama_dir, max_length=max_length, eval_max_new_tokens=128, evaluation_inputs=["Hi?"])
        answer_questions(None, tokenizer, cfg)
        assert asked.pop() == expected


def test_every_trained_token_weighs_the_same_however_the_step_is_split(tiny_llama_dir, tokenizer, tmp_path):
    """batch_size 4 x 1 micro-batch, 2 x 2 and 1 x 4 see the same rows per step: same losses, same updates."""
    rows = varied_rows(tokenizer, 12)
    runs = {}
    for batch_size, accumulation in [(4, 1), (2, 2), (1, 4)]:
        cfg = tiny_cfg(tiny_llama_dir, batch_size=batch_size, accumulative_counts=accumulation, max_steps=3,
                       lr=1e-2, save_steps=3)
        runs[batch_size] = train(cfg, tmp_path / f"bs{batch_size}", train_rows=rows, device="cpu").losses
    for step in (1, 2, 3):
        assert runs[2][step] == pytest.approx(runs[4][step], abs=1e-5)
        assert runs[1][step] == pytest.approx(runs[4][step], abs=1e-5)


def test_the_next_steps_data_is_made_before_the_step_waits_for_the_gpu(tiny_llama_dir, tokenizer, tmp_path,
                                                                       monkeypatch):
    """The loop collates the next step's micro-batches (and sends the first one over) after this step's backward
    and before its update and loss are read, which wait for the GPU: so the GPU does not idle while the CPU
    prepares them. The data and the resume position are still each step's own."""
    from tunelab.train import loop
    from tunelab.train.strategy import SingleProcess

    order = []
    real_step_data, real_step = loop.step_data, SingleProcess.step
    monkeypatch.setattr(loop, "step_data", lambda group, *a, **k: order.append(("data", group[1]))
                        or real_step_data(group, *a, **k))
    monkeypatch.setattr(SingleProcess, "step", lambda self, *a, **k: order.append(("step",))
                        or real_step(self, *a, **k))
    cfg = tiny_cfg(tiny_llama_dir, max_steps=3, batch_size=2, accumulative_counts=2, save_steps=2)
    result = train(cfg, tmp_path, train_rows=identity_rows(tokenizer), device="cpu")
    assert result.step == 3
    # data of step 1, then each step's update after the next step's data; the last step makes none after it
    assert order == [("data", 2), ("data", 4), ("step",), ("data", 6), ("step",), ("step",)]
    state = torch.load(tmp_path / "iter_2" / "training_state.pt", weights_only=True)
    assert state["position"]["micro_batch"] == 4  # iter_2 resumes after step 2's micro-batches, not step 3's


def test_training_takes_the_embedding_rows_gathered_ahead(tiny_llama_dir, tokenizer, tmp_path, monkeypatch):
    """With the input embedding in CPU memory (LoRA on a GPU runs it so), the loop gathers each micro-batch's rows
    as it sends the batch and the model's forward, through peft and transformers, takes them: every batch looked up
    once, none from ids copied back, and the loss curve is the one of the embedding left in place, bit for bit."""
    import dataclasses

    from tunelab.model import fast
    from tunelab.train import loop

    cfg = tiny_cfg(tiny_llama_dir, method="lora", max_steps=4, batch_size=2, accumulative_counts=2, lr=1e-3)
    in_place = train(cfg, tmp_path / "in_place", train_rows=identity_rows(tokenizer), device="cpu")

    real_plan = loop.plan_fast_path
    real_look_up, real_ahead = fast.EmbeddingOnCPU._look_up, fast.EmbeddingOnCPU.look_up_ahead
    monkeypatch.setattr(loop, "plan_fast_path", lambda *a, **k: dataclasses.replace(real_plan(*a, **k),
                                                                                    embeddings_on_cpu=True))
    calls = []
    monkeypatch.setattr(fast.EmbeddingOnCPU, "_look_up", lambda self, ids: calls.append("look up")
                        or real_look_up(self, ids))
    monkeypatch.setattr(fast.EmbeddingOnCPU, "look_up_ahead", lambda self, *a: calls.append("ahead")
                        or real_ahead(self, *a))
    ahead = train(cfg, tmp_path / "ahead", train_rows=identity_rows(tokenizer), device="cpu")
    assert calls == ["ahead", "look up"] * 8  # 4 steps of 2 micro-batches, each gathered ahead and only then
    assert ahead.losses == in_place.losses


def test_eval_rows_report_held_out_loss(tiny_llama_dir, tokenizer, tmp_path):
    rows = identity_rows(tokenizer)
    cfg = tiny_cfg(tiny_llama_dir, max_steps=6, batch_size=4, evaluation_freq=3)
    train(cfg, tmp_path, train_rows=rows, eval_rows=rows[:4], device="cpu")
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evals) == [0, 3, 6]
    assert evals[6] < evals[0]  # the held-out rows repeat the trained answer, so their loss falls too


def test_no_trainable_rows_is_a_clear_error(tiny_llama_dir, tmp_path):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="training rows"):
        train(tiny_cfg(tiny_llama_dir), tmp_path, train_rows=[], device="cpu")


def test_kept_gradient_buffers_sum_micro_batches_like_fresh_gradients(tiny_llama_dir):
    """What the loop does under CUDA graphs with accumulation: .grad buffers allocated once and zeroed in place give
    the same updates as gradients freed after every step, and stay the same tensors."""
    from transformers import AutoModelForCausalLM

    from tests.test_distributed import global_rows
    from tunelab.data.collate import collate
    from tunelab.model.loss import causal_lm_loss
    from tunelab.train.distributed import DistEnv
    from tunelab.train.loop import allocate_grad_buffers
    from tunelab.train.strategy import SingleProcess

    weights = {}
    for keep in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        strategy = SingleProcess(DistEnv())
        strategy.setup(model, optimizer, causal_lm_loss)
        rows = global_rows(model.config.vocab_size)
        if keep:
            allocate_grad_buffers(model)
            buffers = [p.grad for p in model.parameters()]
        for step in range(2):
            for micro in (rows[:2], rows[2:]):
                loss_sum, n = causal_lm_loss(model, collate(micro, 0), chunk_size=8)
                (loss_sum / 40).backward()
            strategy.step(1.0, keep_grad_buffers=keep)
        if keep:
            assert all(p.grad is b and not b.any() for p, b in zip(model.parameters(), buffers))
        else:
            assert all(p.grad is None for p in model.parameters())
        weights[keep] = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, msg=name)
