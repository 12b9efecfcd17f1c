"""Preference training through `tunelab train`'s loop on CPU with a tiny model: DPO moves held-out pairs apart and
the model's answers toward the chosen style; the three references agree; ORPO, SimPO and KTO train; a reward model
learns to rank held-out pairs and exports as a transformers sequence-classification model with the same scores; a
resumed DPO run continues the same curve; the adapter loads with peft."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_helpers import capture_model, pair_rows, quality_pair, style_pair, tiny_cfg
from tunelab.data.encode_preference import encode_kto, unpaired
from tunelab.data.templates import get_template
from tunelab.train.loop import train

@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from tunelab.model.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_llama_dir))


def _log(work_dir):
    return [json.loads(line) for line in (work_dir / "train_log.jsonl").read_text().splitlines()]


def _dpo_cfg(model_dir, **overrides):
    settings = dict(objective="dpo", method="lora", lora_r=8, batch_size=4, lr=2e-3, max_steps=20, logging_steps=5,
                    evaluation_freq=20, evaluation_inputs=["Tell me about the ocean and the city."])
    return tiny_cfg(model_dir, **{**settings, **overrides})


def test_dpo_moves_held_out_pairs_apart_and_answers_in_the_chosen_style(tiny_llama_dir, tokenizer, tmp_path,
                                                                       monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.export.convert import pth_to_hf
    from tunelab.model.logprobs import sequence_logprobs
    from tunelab.data.collate import collate

    captured = capture_model(monkeypatch)
    held_out = pair_rows(tokenizer, style_pair, range(40, 52))
    result = train(_dpo_cfg(tiny_llama_dir), tmp_path, train_rows=pair_rows(tokenizer, style_pair, range(40)),
                   eval_rows=held_out, tokenizer=tokenizer, device="cpu")
    assert result.step == 20
    evals = [r for r in _log(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 20]
    assert evals[0]["eval_reward_margin"] == 0 and evals[0]["eval_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert evals[1]["eval_reward_margin"] > 1.0 and evals[1]["eval_accuracy"] == 1.0
    steps = [r for r in _log(tmp_path) if "loss" in r]
    assert {"reward_chosen", "reward_rejected", "reward_margin", "accuracy", "logp_chosen"} <= set(steps[-1])
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    before = (tmp_path / "eval_outputs_iter_0.txt").read_text()
    after = (tmp_path / "eval_outputs_iter_20.txt").read_text()
    answer = after.split("--- answer ---\n")[1]
    assert "Sure!" not in before and answer.startswith("Sure!"), after

    # the adapter loads with peft and scores the pairs as the trained model did
    pth_to_hf(None, str(tmp_path), str(tmp_path / "hf_adapter"), fp32=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "hf_adapter")).eval()
    batch = collate(held_out, tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(loaded, batch),
                                   sequence_logprobs(captured["model"].eval(), batch), atol=1e-3, rtol=1e-4)


def test_the_three_references_give_the_same_full_finetuning_run(tiny_llama_dir, tokenizer, tmp_path):
    rows = pair_rows(tokenizer, style_pair, range(16))
    curves = {}
    for reference in ("copy", "precomputed"):
        cfg = _dpo_cfg(tiny_llama_dir, method="full", reference=reference, lr=2e-4, max_steps=3, logging_steps=1,
                       evaluation_inputs=[])
        curves[reference] = train(cfg, tmp_path / reference, train_rows=rows, tokenizer=tokenizer,
                                  device="cpu").losses
    assert (tmp_path / "precomputed" / "reference_logps_train.npz").is_file()
    assert not (tmp_path / "copy" / "reference_logps_train.npz").exists()
    assert curves["copy"] == pytest.approx(curves["precomputed"], abs=1e-5)
    assert curves["copy"][1] == pytest.approx(0.693147, abs=1e-5) and curves["copy"][3] < curves["copy"][1]
    # LoRA: the adapters switched off are the base model, as the precomputed values of it are
    lora = {reference: train(_dpo_cfg(tiny_llama_dir, reference=reference, max_steps=3, logging_steps=1,
                                      evaluation_inputs=[]), tmp_path / f"lora_{reference}", train_rows=rows,
                             tokenizer=tokenizer, device="cpu").losses
            for reference in ("adapters_off", "precomputed")}
    # each run used the reference it was given: only the precomputed one wrote the reference's log-probabilities
    assert (tmp_path / "lora_precomputed" / "reference_logps_train.npz").is_file()
    assert not (tmp_path / "lora_adapters_off" / "reference_logps_train.npz").exists()
    assert lora["adapters_off"] == pytest.approx(lora["precomputed"], abs=1e-5)


def test_a_fresh_precomputed_run_scores_its_own_starting_model_not_an_earlier_runs(tiny_llama_dir, tokenizer,
                                                                                   tmp_path):
    # a work dir that kept an earlier run's reference values (its checkpoints deleted by --overwrite, or a run
    # stopped before its first one), trained again from another starting model with the same tokenizer (a retrained
    # SFT model): the rows are the same, the reference is not, and its first DPO loss must be ln 2
    from tunelab.model.tiny import make_model

    other = make_model(tmp_path / "other_sft", "llama", tokenizer=tokenizer, seed=1)
    rows = pair_rows(tokenizer, style_pair, range(8))
    settings = dict(method="full", reference="precomputed", max_steps=1, evaluation_inputs=[], lr=1e-4)
    train(_dpo_cfg(tiny_llama_dir, **settings), tmp_path / "run", train_rows=rows, tokenizer=tokenizer, device="cpu")
    again = train(_dpo_cfg(other, **settings), tmp_path / "run", overwrite=True, train_rows=rows, tokenizer=tokenizer,
                  device="cpu").losses
    assert again[1] == pytest.approx(0.693147, abs=1e-5)


def test_resuming_mid_dpo_continues_the_same_curve(tiny_llama_dir, tokenizer, tmp_path):
    rows = pair_rows(tokenizer, style_pair, range(24))
    cfg = _dpo_cfg(tiny_llama_dir, reference="precomputed", max_steps=6, save_steps=3, logging_steps=1,
                   evaluation_inputs=[], lora_dropout=0.1)
    straight = train(cfg, tmp_path / "straight", train_rows=rows, tokenizer=tokenizer, device="cpu").losses
    first = train(cfg, tmp_path / "resumed", train_rows=rows, tokenizer=tokenizer, device="cpu")
    assert first.step == 6
    import shutil

    for name in ("iter_6", "last_checkpoint"):  # as if the run had stopped after step 3
        target = tmp_path / "resumed" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (tmp_path / "resumed" / "last_checkpoint").write_text(str(tmp_path / "resumed" / "iter_3"))
    resumed = train(cfg, tmp_path / "resumed", resume="auto", train_rows=rows, tokenizer=tokenizer,
                    device="cpu").losses
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)], abs=1e-6)


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_orpo_simpo_and_kto_train_and_log_their_metrics(objective, tiny_llama_dir, tokenizer, tmp_path):
    if objective == "kto":
        samples = [unpaired(style_pair(i)) for i in range(20)]
        rows = [u.row for per in encode_kto(get_template("qwen_chat"), tokenizer, samples, 128) for u in per]
        expected = {"reward_desirable", "reward_undesirable", "kl"}
    else:
        rows = pair_rows(tokenizer, style_pair, range(40))
        expected = {"reward_chosen", "reward_margin", "accuracy"} | ({"log_odds_ratio", "nll_chosen"}
                                                                     if objective == "orpo" else set())
    cfg = _dpo_cfg(tiny_llama_dir, objective=objective, max_steps=10, logging_steps=1, evaluation_inputs=[],
                   **({"beta": 2.0, "simpo_gamma": 0.5} if objective == "simpo" else {}))
    losses = train(cfg, tmp_path, train_rows=rows, tokenizer=tokenizer, device="cpu").losses
    assert sum(losses[s] for s in (8, 9, 10)) < sum(losses[s] for s in (1, 2, 3)), losses
    assert expected <= set(_log(tmp_path)[-1])


def test_a_reward_model_ranks_held_out_pairs_and_exports_for_transformers(tiny_llama_dir, tokenizer, tmp_path,
                                                                         capsys):
    from transformers import AutoModelForSequenceClassification

    from tunelab.chat.reward import load_reward_model, score_file
    from tunelab.cli.main import main
    from tunelab.export.convert import merge, pth_to_hf

    train_rows = pair_rows(tokenizer, quality_pair, range(64))
    held_out = pair_rows(tokenizer, quality_pair, range(1000, 1032))
    cfg = _dpo_cfg(tiny_llama_dir, objective="reward", max_steps=40, lr=3e-3, batch_size=8, evaluation_freq=40,
                   logging_steps=10, evaluation_inputs=[])  # a reward model answers no questions
    train(cfg, tmp_path / "rm", train_rows=train_rows, eval_rows=held_out, tokenizer=tokenizer, device="cpu")
    evals = [r for r in _log(tmp_path / "rm") if "eval_loss" in r]
    assert evals[0]["eval_accuracy"] < 0.8  # an untrained head: near chance on these pairs
    assert evals[-1]["eval_accuracy"] >= 0.9, evals
    assert not list((tmp_path / "rm").glob("eval_outputs_iter_*.txt"))  # a reward model answers no questions

    # LoRA: the adapter carries the trained head; merged, transformers loads a one-label classifier
    pth_to_hf(None, str(tmp_path / "rm"), str(tmp_path / "adapter"), fp32=True)
    merge(str(tiny_llama_dir), str(tmp_path / "adapter"), str(tmp_path / "merged"), device="cpu", dtype="fp32")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert hf.config.num_labels == 1
    data = tmp_path / "pairs.jsonl"
    records = [{"prompt": p["prompt"][0]["content"], "chosen": p["chosen"]["content"],
                "rejected": p["rejected"]["content"]} for p in map(quality_pair, range(1000, 1032))]
    data.write_text("\n".join(json.dumps(r) for r in records))
    rm = load_reward_model(str(tmp_path / "rm"), device="cpu")
    scores = score_file(rm, data)
    assert scores.accuracy >= 0.9
    pair = quality_pair(1000)
    text = get_template("qwen_chat").render(pair["prompt"] + [pair["chosen"]])
    with torch.no_grad():
        hf_score = hf(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
    assert hf_score == pytest.approx(scores.records[0]["chosen"], abs=1e-4)

    # the command line: one JSON line a record, the accuracy at the end; chat refuses a reward model
    capsys.readouterr()
    assert main(["reward", str(tmp_path / "merged"), "--data", str(data), "-n", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [r["record"] for r in lines] == [0, 1, 2, 3]
    assert lines[0]["chosen"] == pytest.approx(hf_score, abs=1e-4) and "pairwise accuracy" in out.err
    assert main(["chat", str(tmp_path / "rm"), "--prompt", "hi", "--device", "cpu"]) == 2
    assert "is a reward model" in capsys.readouterr().err


def test_full_finetuned_reward_model_converts_to_a_sequence_classifier(tiny_llama_dir, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tunelab.chat.reward import load_reward_model, score_file
    from tunelab.export.convert import pth_to_hf

    rows = pair_rows(tokenizer, quality_pair, range(8))
    cfg = _dpo_cfg(tiny_llama_dir, objective="reward", method="full", max_steps=2, lr=1e-4, evaluation_inputs=[])
    train(cfg, tmp_path / "rm", train_rows=rows, tokenizer=tokenizer, device="cpu")
    pth_to_hf(None, str(tmp_path / "rm"), str(tmp_path / "hf"), fp32=True)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Describe the city."},
                                             {"role": "assistant", "content": "The city is bright."}]}))
    # the trained checkpoint itself (not the export) is what the exported classifier must score like
    [trained] = score_file(load_reward_model(str(tmp_path / "rm"), device="cpu", dtype="fp32"), data).records
    [exported] = score_file(load_reward_model(str(tmp_path / "hf"), device="cpu", dtype="fp32"), data).records
    text = get_template("qwen_chat").render([{"role": "user", "content": "Describe the city."},
                                             {"role": "assistant", "content": "The city is bright."}])
    with torch.no_grad():
        hf_score = hf(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
    assert hf_score == pytest.approx(trained["score"], abs=1e-4)
    assert exported["score"] == pytest.approx(trained["score"], abs=1e-4)


def test_the_memory_plan_counts_pairs_and_the_reference(monkeypatch):
    from dataclasses import replace

    from tunelab.config.schema import TrainConfig
    from tunelab.model import fit, memory
    from tunelab.model.shapes import model_shape

    base = TrainConfig(pretrained_model_name_or_path="meta-llama/Llama-2-7b-chat-hf", method="full", max_length=1024)
    dpo = replace(base, objective="dpo", reference="precomputed")
    # a row holds a pair: the activations of two sequences, as a supervised row twice as long
    assert memory.estimate_memory(dpo).total == memory.estimate_memory(replace(base, max_length=2048)).total
    copy = memory.estimate_memory(replace(dpo, reference="copy"))
    params = model_shape(base.pretrained_model_name_or_path).total_params()
    assert copy.parts["reference model (frozen copy)"] == 2 * params
    assert copy.total == memory.estimate_memory(dpo).total + 2 * params
    # 'auto': LoRA switches its adapters off; full takes the copy where it fits, else precomputes
    auto = replace(dpo, reference="auto")
    assert fit.choose_reference(replace(auto, method="qlora")) == "adapters_off"
    assert fit.choose_reference(auto) == "copy"  # no GPU to check against
    tight = type("Estimate", (), {"fits": False})()
    monkeypatch.setattr(fit, "estimate_memory", lambda *a, **k: tight)
    assert fit.choose_reference(auto) == "precomputed"
    assert fit.choose_reference(replace(auto, objective="orpo")) is None  # ORPO needs no reference
    monkeypatch.undo()
    report = fit.plan_report(replace(auto, method="qlora"))
    assert "objective dpo (reference: adapters_off), rows of 2048 tokens (a pair)" in report
    assert "rows of 2048 tokens (a sample and its KL sequence)" in fit.plan_report(replace(auto, objective="kto"))


def test_settings_that_cannot_go_together_are_refused(tmp_path):
    from tunelab.config.checks import combination_errors
    from tunelab.config.schema import TrainConfig

    def errors(**kw):
        return " ".join(combination_errors(TrainConfig(**kw)))

    assert "no adapters to switch off" in errors(objective="dpo", method="full", reference="adapters_off")
    assert "FSDP / ZeRO-3" in errors(objective="kto", method="full", reference="copy", deepspeed="zero3")
    stage3 = tmp_path / "my_zero.json"  # ZeRO-3 by its own DeepSpeed file, not by the preset's name
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert "FSDP / ZeRO-3" in errors(objective="dpo", method="full", reference="copy", deepspeed=str(stage3))
    assert "FSDP / ZeRO-3" in errors(objective="dpo", method="full", reference="copy", fsdp=True)
    assert errors(objective="dpo", method="full", reference="copy", deepspeed="zero2") == ""
    # reference = 'auto' (the default) is not refused there: it precomputes under a sharding engine
    from tunelab.model.fit import choose_reference

    for sharded in (dict(fsdp=True), dict(deepspeed="zero3"), dict(deepspeed=str(stage3))):
        assert errors(objective="dpo", method="full", **sharded) == ""
        assert choose_reference(TrainConfig(objective="dpo", method="full", **sharded)) == "precomputed"
    assert "label_smoothing" in errors(objective="dpo", dpo_loss="hinge", label_smoothing=0.1)
    assert "train_on = 'all'" in errors(objective="orpo", train_on="all")
    assert errors(objective="dpo", method="qlora", label_smoothing=0.1) == ""
    assert errors(objective="sft", method="full", reference="adapters_off") == ""  # SFT reads no reference
    # another preference objective's setting, changed from its default, is not read by this one: said, not ignored
    for objective, setting, says in (("kto", dict(dpo_loss="ipo"), "dpo_loss = 'ipo' is read by objective = 'dpo'"),
                                     ("orpo", dict(simpo_gamma=1.0), "simpo_gamma = 1.0 is read by objective = "
                                                                     "'simpo'"),
                                     ("dpo", dict(kto_desirable_weight=2.0), "read by objective = 'kto'"),
                                     ("simpo", dict(reference="copy"), "read by objective = 'dpo' or 'kto'"),
                                     ("reward", dict(beta=0.5), "read by objective = 'dpo', 'orpo', 'simpo' or "
                                                                "'kto'")):
        assert says in errors(objective=objective, **setting) and f"not by objective = '{objective}'" in \
            errors(objective=objective, **setting)
    assert errors(objective="kto", beta=0.2, kto_undesirable_weight=1.5, reference="precomputed") == ""
    # a reward model answers no questions: questions of its own were never asked, without a word
    assert "a reward model scores replies and answers no questions" in errors(objective="reward",
                                                                              evaluation_inputs=["Who are you?"])
    assert errors(objective="reward", evaluation_inputs=[]) == errors(objective="reward") == ""


def test_reference_values_are_keyed_the_same_for_packed_arrays_and_plain_rows(tokenizer):
    """The fingerprint and sequence offsets read TokenRows' flat arrays without decoding rows; a work dir's saved
    reference values must still match the same rows given either way."""
    from tunelab.data.packing import TokenRows
    from tunelab.train.reference import fingerprint, sequence_offsets

    rows = pair_rows(tokenizer, style_pair, range(6))
    packed = TokenRows.from_rows(rows)
    assert fingerprint(packed) == fingerprint(rows)
    assert sequence_offsets(packed).tolist() == sequence_offsets(rows).tolist() == list(range(0, 13, 2))
