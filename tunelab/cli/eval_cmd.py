"""`tunelab eval`: multiple-choice benchmark accuracy (MMLU, C-Eval, CMMLU), as `llamafactory-cli eval` computes it
(tunelab.chat.choice_eval)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tunelab.cli.data_cmds import _positive_int, _warn, whole_number

DESCRIPTION = """\
Score a model on a multiple-choice benchmark as LLaMA-Factory's `llamafactory-cli eval` does: MMLU, C-Eval and CMMLU
accuracy per category and on average (per subject in results.log), from the task folders LLaMA-Factory ships in
its evaluation/ directory (TASK_DIR/NAME/mapping.json and the CSV files, extracted or in NAME.zip; nothing is
downloaded). Run it on the base model and on the trained one to see what training taught.

--task NAME_SPLIT names the folder and the split as LLaMA-Factory does: mmlu_test, mmlu_validation, ceval_validation,
ceval_test, cmmlu_test (SPLIT train is the dev set). Each question is prompted with the first --n-shot questions of
the dev set and their answers, in LLaMA-Factory's words ("The following are multiple choice questions (with answers)
about {subject}." in English, "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。" in Chinese: --lang,
by default zh for ceval and cmmlu, en otherwise), as a conversation in the model's chat template; the answer is the
letter among A-D whose token the model finds likeliest next. The template and system prompt come from the model's
tunelab.json, as in `tunelab chat`. A base (pretrained) model reads the conversation as plain text with
--prompt-template fewshot (LLaMA-Factory's --template fewshot): the questions and answers as they are, "\\n\\n"
after each answer, no role markers.

The table is printed; --save-dir DIR (new or empty, unless --overwrite) also gets results.json (each subject's
predicted letter and answer per question) and results.log (the table, then each subject). C-Eval's test answers are
hidden: ceval_test writes the predictions (--save-dir) without scoring them.

example:
  tunelab eval Qwen/Qwen2.5-0.5B-Instruct --task mmlu_test --task-dir evaluation --n-shot 5
  tunelab eval work_dirs/run1 --task ceval_validation --save-dir eval/ceval_tuned
  tunelab eval Qwen/Qwen2.5-0.5B-Instruct --adapter hf_adapter --task cmmlu_test --batch-size 8 --bits 4
  tunelab eval merged --task mmlu_test -n 20        # the first 20 questions of each subject: a quick look
  tunelab eval Qwen/Qwen2.5-0.5B --task mmlu_test --prompt-template fewshot   # a base model
"""


def register(subparsers) -> None:
    from tunelab.chat.engine import add_model_arguments

    p = subparsers.add_parser("eval", help="benchmark accuracy: MMLU, C-Eval, CMMLU (as llamafactory-cli eval)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--task", required=True, metavar="NAME_SPLIT", help="e.g. mmlu_test, ceval_validation, cmmlu_test")
    p.add_argument("--task-dir", "--task_dir", default="evaluation", metavar="DIR",
                   help="the folder holding the task folders (default: evaluation, as LLaMA-Factory)")
    p.add_argument("--lang", choices=["en", "zh"], help="the prompt's language (default: zh for ceval and cmmlu, "
                   "en otherwise; LLaMA-Factory's default is en)")
    p.add_argument("--n-shot", "--n_shot", type=whole_number(0), default=5, metavar="N",
                   help="dev examples before each question (default 5)")
    p.add_argument("--batch-size", "--batch_size", type=_positive_int, default=4, metavar="N",
                   help="questions a forward pass (default 4)")
    p.add_argument("-n", type=_positive_int, metavar="N", help="only the first N questions of each subject")
    p.add_argument("--save-dir", "--save_dir", metavar="DIR", help="write results.json and results.log there")
    p.add_argument("--overwrite", action="store_true", help="write into a --save-dir that holds files")
    p.set_defaults(func=eval_cmd)


def eval_cmd(args) -> int:
    from tunelab.chat.choice_eval import PROMPTS, read_task, score_table
    from tunelab.chat.predict import say
    from tunelab.errors import TunelabError

    save_dir = _check_save_dir(args.save_dir, args.overwrite)
    task = read_task(args.task_dir, args.task, args.n_shot, args.n, warn=_warn)  # a bad file stops it here
    total = sum(len(s.questions) for s in task.subjects)
    if not total:
        raise TunelabError(f"--task {args.task}: no question in {task.folder}'s {task.split} files.")
    answered = sum(q.answer is not None for s in task.subjects for q in s.questions)
    if not answered and save_dir is None:
        raise TunelabError(f"--task {args.task}: its files have no answers (C-Eval keeps its test answers hidden), so "
                           f"there is nothing to score: pass --save-dir to keep the predictions, or evaluate "
                           f"{task.name}_validation.")
    lang = args.lang or task.layout.lang
    say(f"{args.task}: {len(task.subjects)} subject(s), {total} question(s), {args.n_shot}-shot, prompts in {lang}")
    from tunelab.chat.engine import load_from_args

    chat = load_from_args(args)
    letters = evaluate(chat, task, PROMPTS[lang], args.batch_size)
    table, subjects = score_table(task, letters)
    if table:
        print("\n".join(table))
    if answered < total:
        say(f"note: {total - answered} question(s) have no answer (C-Eval's test set): predicted, not scored.")
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "results.json").write_text(json.dumps(results_json(task, letters), ensure_ascii=False, indent=2)
                                               + "\n", encoding="utf-8")
        log = table + [""] + subjects if table else ["no question has an answer: the predictions are in results.json"]
        (save_dir / "results.log").write_text("\n".join(log) + "\n", encoding="utf-8")
        say(f"results: {save_dir / 'results.json'}, {save_dir / 'results.log'}")
    return 0


def evaluate(chat, task, prompt, batch_size: int) -> dict[str, list[str]]:
    """{subject: the letter predicted for each question}, with a progress bar (questions/s). `chat`: a `ChatModel`."""
    from tunelab.chat.choice_eval import choice_ids, predict_letters, prompt_rows
    from tunelab.chat.predict import Progress

    letter_ids = choice_ids(chat.tokenizer)
    pad_id = next((i for i in (chat.tokenizer.pad_token_id, chat.tokenizer.eos_token_id) if i is not None), 0)
    too_long: list[tuple[int, str]] = []
    bar = Progress(sum(len(s.questions) for s in task.subjects), label="eval", unit="questions", said="evaluated")
    letters = {}
    try:
        for subject in task.subjects:
            rows = prompt_rows(chat, subject, prompt)
            too_long += [(len(r), q.where) for r, q in zip(rows, subject.questions) if len(r) > chat.max_model_len]
            letters[subject.key] = predict_letters(chat.model, rows, letter_ids, batch_size, pad_id, bar.advance)
    finally:
        bar.close()
    if too_long:
        length, where = max(too_long)
        _warn(f"{len(too_long)} prompt(s) are longer than the model's context of {chat.max_model_len} tokens (the "
              f"longest, {length}, at {where}): scored whole as LLaMA-Factory does, over positions the model was not "
              f"trained on. A smaller --n-shot shortens them.")
    return letters


def results_json(task, letters: dict[str, list[str]]) -> dict:
    """{subject: {question index: {"prediction": letter, "answer": letter or None}}} (LLaMA-Factory's results.json
    holds the predicted letter alone)."""
    return {s.key: {str(i): {"prediction": p, "answer": q.answer} for i, (p, q) in
                    enumerate(zip(letters[s.key], s.questions))} for s in task.subjects}


def _check_save_dir(folder: str | None, overwrite: bool) -> Path | None:
    """--save-dir as a path to write to: a new or empty folder, or one that holds files with --overwrite (its
    results.json and results.log are replaced, nothing else is touched)."""
    from tunelab.errors import TunelabError

    if folder is None:
        return None
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise TunelabError(f"--save-dir {folder}: a file, not a folder; give a new folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise TunelabError(f"--save-dir {folder} holds files already: give a new folder, or pass --overwrite to "
                           f"replace its results.json and results.log.")
    return path
