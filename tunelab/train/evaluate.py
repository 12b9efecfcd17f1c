"""Evaluation during training: the model answers the config's questions, and (optionally) held-out loss.

The questions are answered with the config's template and SYSTEM, greedily, at most `eval_max_new_tokens` new
tokens, each question on its own by transformers' `generate` (`tunelab.model.generate.generate_reply`). The prompt
is rendered and the reply cut at the template's stop words as `tunelab chat` does them, though chat decodes with its
own batched loop (`tunelab.chat.batcher`). They are answered once before training too, so the change is visible side
by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.data.collate import collate
from tunelab.model.loss import causal_lm_loss
from tunelab.train.distributed import all_reduce_sum, barrier
from tunelab.train.progress import SHOWN_METRICS


def answer_questions(model, tokenizer, cfg, vision=None) -> list[tuple[str, str]]:
    """(question, answer) for each of `cfg.evaluation_inputs`; a LLaVA run (`vision`, tunelab.train.vision) asks
    each about its picture of `evaluation_images`, if any."""
    from tunelab.data.messages import with_default_system
    from tunelab.data.templates import get_template
    from tunelab.model.generate import GenerationSettings, generate_reply
    from tunelab.train.vision import question_content

    template = get_template(cfg.prompt_template, tokenizer)
    # at most max_length: a larger value is refused when the config loads, unless it is the default (config.checks)
    settings = GenerationSettings(max_new_tokens=min(cfg.eval_max_new_tokens, cfg.max_length), temperature=0.0)
    pictures = vision.evaluation_images if vision else [None] * len(cfg.evaluation_inputs)
    answers = []
    for question, picture in zip(cfg.evaluation_inputs, pictures):
        messages = [{"role": "user", "content": question_content(question, picture)}]
        with_default_system(messages, cfg.SYSTEM)
        image = dict(pixel_values=vision.images([picture]), image_tokens=vision.tokens) if picture else {}
        answers.append((question, generate_reply(model, tokenizer, template, messages, settings, **image)))
    return answers


def format_answers(step: int, answers: list[tuple[str, str]]) -> str:
    title = "before training" if step == 0 else f"after step {step}"
    blocks = [f"=== evaluation {title} ==="]
    for i, (question, answer) in enumerate(answers, 1):
        blocks.append(f"--- question {i} ---\n{question}\n--- answer ---\n{answer}")
    return "\n".join(blocks) + "\n"


def write_answers(work_dir: Path, step: int, answers: list[tuple[str, str]]) -> Path:
    """eval_outputs_iter_N.txt to read, and the same as .json for `tunelab board` (answers side by side)."""
    path = Path(work_dir) / f"eval_outputs_iter_{step}.txt"
    path.write_text(format_answers(step, answers), encoding="utf-8")
    record = {"step": step, "answers": [{"question": q, "answer": a} for q, a in answers]}
    path.with_suffix(".json").write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


@torch.no_grad()
def eval_loss_sums(model, rows: list[dict], cfg, *, pad_token_id: int, device: torch.device,
                   precision, objective=causal_lm_loss, images=None) -> torch.Tensor:
    """tensor([sum of token losses, trained tokens]) over `rows` (this rank's share); the caller reduces it."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for start in range(0, len(rows), cfg.batch_size):
            batch = collate(rows[start:start + cfg.batch_size], pad_token_id, images=images)
            batch = {k: v.to(device) for k, v in batch.items()}
            with precision.autocast(device):
                loss_sum, n_tokens = objective(model, batch)
            totals += torch.stack([loss_sum.detach().double(), totals.new_tensor(float(n_tokens))])
    finally:
        model.train(was_training)
    return totals


def run_evaluation(model, tokenizer, cfg, step: int, *, eval_rows: list, env, precision, monitor,
                   work_dir: Path, objective, vision=None) -> float | None:
    """Held-out loss (every rank, its share of the rows) and the questions' answers (main rank); returns eval loss.

    objective(model, batch) -> (loss_sum, units): the training loss (`causal_lm_objective(plan)`, or a preference
    objective, whose metrics on the held-out pairs are written as eval_<name>). A reward model answers no questions:
    it does not generate. vision: a LLaVA run's images and evaluation pictures (`tunelab.train.vision.VisionRun`),
    None for text."""
    from tunelab.model.preference import reduce_metrics

    result = None
    if eval_rows is not None and len(eval_rows):
        scoring = objective.copy()  # with metric sums of its own
        sums = all_reduce_sum(eval_loss_sums(model, eval_rows, cfg, pad_token_id=tokenizer.pad_token_id,
                                             device=env.device, precision=precision, objective=scoring,
                                             images=vision.images if vision else None), env)
        result = float(sums[0] / sums[1].clamp(min=1))
        metrics = reduce_metrics(scoring.take_metrics(), lambda t: all_reduce_sum(t, env))
        monitor.write({"step": step, "eval_loss": result, **{f"eval_{k}": v for k, v in metrics.items()}})
        shown = "".join(f", {k} {v:.4f}" for k, v in metrics.items() if k in SHOWN_METRICS)
        monitor.message(f"step {step}: eval loss {result:.4f}{shown}")
    if env.is_main and cfg.evaluation_inputs and cfg.objective != "reward":
        answers = answer_questions(model, tokenizer, cfg, vision)
        path = write_answers(work_dir, step, answers)
        monitor.message(format_answers(step, answers) + f"(saved to {path})")
    barrier(env)
    return result
