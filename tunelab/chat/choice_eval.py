"""`tunelab eval MODEL --task mmlu_test`: multiple-choice benchmark accuracy (MMLU, C-Eval, CMMLU) per subject, per
category and on average, as LLaMA-Factory's `llamafactory-cli eval` computes it (src/llamafactory/eval/).

A task is a folder `<task_dir>/<name>/` as LLaMA-Factory's `evaluation/` ships it: `mapping.json` ({subject:
{"name": display name, "category": "STEM" | "Social Sciences" | "Humanities" | "Other"}}) and the CSV files,
extracted or in `<name>.zip` (read where they lie, nothing is downloaded), in the layout of its loading script
(`LAYOUTS`). `--task NAME_SPLIT` names the folder and the split as LLaMA-Factory does (test, validation, or train:
the dev set); the dev set is the few-shot support set.

Each question is LLaMA-Factory's EvalTemplate conversation: n_shot dev examples as user turns (question, "\\nA. ..."
to "\\nD. ...", then "\\nAnswer:" or "\\n答案：") each answered by its letter, then the question, the first user turn
prefixed with the subject's system text (`PROMPTS`); it is rendered by the model's chat template with a generation
prompt (a base model's: `fewshot`, LLaMA-Factory's plain text, each message tokenised on its own as LLaMA-Factory's
`encode_oneturn` does: `prompt_rows`). The prediction is the letter whose token ("A" to "D", the last id of each)
the model's logits at the prompt's last token rank highest. Unlike LLaMA-Factory, which draws the support set anew for every question from a
shuffle of the dev set, the support set is the first n_shot dev examples, the same for every question of a subject,
as the original MMLU harness takes them: a run is reproducible. Cells are read as the CSV writes them (LLaMA-Factory
reads them through pandas, which makes MMLU's 12 options 'None' NaN, prompted as 'nan').
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunelab.errors import TunelabError

CHOICES = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "Social Sciences", "Humanities", "Other")
"""LLaMA-Factory's SUBJECTS after "Average": the order of the table (other categories a mapping.json names follow)."""
SPLITS = {"test": "test", "validation": "val", "train": "dev"}
"""The split a --task names (LLaMA-Factory's datasets split names) → the split of the files."""


@dataclass(frozen=True)
class Prompt:
    """LLaMA-Factory's EvalTemplate (src/llamafactory/eval/template.py)."""
    system: str
    choice: str
    answer: str


PROMPTS = {
    "en": Prompt("The following are multiple choice questions (with answers) about {subject}.\n\n",
                 "\n{choice}. {content}", "\nAnswer:"),
    "zh": Prompt("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n{choice}. {content}", "\n答案："),
}


@dataclass(frozen=True)
class Layout:
    """Where a subject's split is in a task folder and what its columns are (LLaMA-Factory's loading script)."""
    path: str
    splits: tuple[str, ...]
    columns: tuple[str, ...] | None
    """The columns of a file without a header row; None: the first row names them."""
    question: str
    answer: str
    lang: str
    """The prompt language of the benchmark (LLaMA-Factory's --lang defaults to en for every task)."""


LAYOUTS = {
    "mmlu": Layout("data/{split}/{subject}_{split}.csv", ("dev", "val", "test"),
                   ("question", "A", "B", "C", "D", "answer"), "question", "answer", "en"),
    "ceval": Layout("{split}/{subject}_{split}.csv", ("dev", "val", "test"), None, "question", "answer", "zh"),
    "cmmlu": Layout("{split}/{subject}.csv", ("dev", "test"), None, "Question", "Answer", "zh"),
}


@dataclass
class Question:
    where: str
    question: str
    options: dict[str, str]
    answer: str | None
    """None: the file has no answer column (C-Eval keeps its test answers hidden)."""


@dataclass
class Subject:
    key: str
    name: str
    category: str
    questions: list[Question]
    support: list[Question] = field(default_factory=list)


@dataclass
class Task:
    name: str
    split: str
    folder: Path
    layout: Layout
    subjects: list[Subject]


# --- reading ----------------------------------------------------------------------------------------------------

class TaskFiles:
    """A task folder's files: the extracted file where it is, else the member of `<name>.zip` (at its root or under
    one top folder)."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.zip_path, self.members = folder, folder / f"{name}.zip", {}
        if self.zip_path.is_file():
            try:
                with zipfile.ZipFile(self.zip_path) as z:
                    names = z.namelist()
            except (zipfile.BadZipFile, OSError) as exc:
                raise TunelabError(f"{self.zip_path}: not a readable zip file ({exc}): copy it again, or extract "
                                   f"it in {folder}.") from None
            for member in names:
                self.members.setdefault(member, member)
                self.members.setdefault(member.partition("/")[2], member)

    def read(self, relative: str) -> tuple[str, bytes] | None:
        """(where, bytes) of the file at `relative`, or None where neither the folder nor the zip has it."""
        if (self.folder / relative).is_file():
            return str(self.folder / relative), (self.folder / relative).read_bytes()
        if relative not in self.members:
            return None
        with zipfile.ZipFile(self.zip_path) as z:
            return f"{self.zip_path}:{self.members[relative]}", z.read(self.members[relative])

    def expected(self, relative: str) -> str:
        return f"{self.folder / relative}" + (f" or {self.zip_path}:{relative}" if self.zip_path.is_file() else "")


def parse_task(task: str) -> tuple[str, str]:
    name, _, split = task.rpartition("_")
    if not name or split not in SPLITS:
        raise TunelabError(f"--task {task}: give NAME_SPLIT as LLaMA-Factory names it, SPLIT one of "
                           f"{', '.join(SPLITS)} (train: the dev set), e.g. mmlu_test, ceval_validation, cmmlu_test.")
    return name, split


def read_task(task_dir: str | Path, task: str, n_shot: int, limit: int | None = None,
              warn: Callable[[str], None] | None = None) -> Task:
    """The task's subjects with their questions (the first `limit` of each) and the first `n_shot` dev examples,
    every file checked before a model loads."""
    name, split = parse_task(task)
    root, folder = Path(task_dir), Path(task_dir) / name
    if not (folder / "mapping.json").is_file():
        found = sorted(p.name for p in root.iterdir() if (p / "mapping.json").is_file()) if root.is_dir() else []
        what = "no mapping.json in it" if folder.is_dir() else "no such folder"
        there = (f"the task folders in {root}: {', '.join(found)}" if found else
                 f"{root} holds no task folder (one with a mapping.json)")
        raise TunelabError(f"--task {task}: {folder}: {what}; {there}. Copy LLaMA-Factory's evaluation/<task> "
                           f"folder (mapping.json and the data) there, or pass --task-dir.")
    layout = LAYOUTS.get(name)
    if layout is None:
        raise TunelabError(f"--task {task}: tunelab reads LLaMA-Factory's tasks {', '.join(LAYOUTS)}, each in its "
                           f"own layout: name the folder after the one whose layout its data has.")
    if SPLITS[split] not in layout.splits:
        others = ", ".join(f"{name}_{s}" for s, f in SPLITS.items() if f in layout.splits and f != "dev")
        raise TunelabError(f"--task {task}: {name} has no {split} split; use {others}.")
    mapping, files = _read_mapping(folder / "mapping.json"), TaskFiles(folder, name)
    subjects, short = [], []
    for key, info in mapping.items():
        questions = _read_split(files, layout, key, SPLITS[split], need_answers=False)[:limit]
        support = _read_split(files, layout, key, "dev", need_answers=True)[:n_shot] if n_shot else []
        if len(support) < n_shot:
            short.append(f"{key}: {len(support)}")
        subjects.append(Subject(key, info["name"], info["category"], questions, support))
    if short and warn:
        warn(f"--n-shot {n_shot}, but the dev set of {len(short)} subject(s) holds fewer examples "
             f"({'; '.join(short[:5])}{' ...' if len(short) > 5 else ''}): those questions use the ones there are.")
    return Task(name, split, folder, layout, subjects)


def _read_mapping(path: Path) -> dict[str, dict]:
    try:
        mapping = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TunelabError(f"{path}: not readable JSON ({exc}).") from None
    if not isinstance(mapping, dict) or not mapping:
        raise TunelabError(f"{path}: give an object of subjects, {{\"abstract_algebra\": {{\"name\": \"abstract "
                           f"algebra\", \"category\": \"STEM\"}}, ...}}.")
    for key, info in mapping.items():
        bad = [f for f in ("name", "category") if not isinstance(info, dict) or not isinstance(info.get(f), str)]
        if bad:
            raise TunelabError(f"{path}: subject {key!r} has no {' and no '.join(map(repr, bad))} text; each "
                               f"subject is {{\"name\": display name, \"category\": one of {', '.join(CATEGORIES)}}}.")
    return mapping


def _read_split(files: TaskFiles, layout: Layout, subject: str, split: str, *, need_answers: bool) -> list[Question]:
    relative = layout.path.format(split=split, subject=subject)
    found = files.read(relative)
    if found is None:
        raise TunelabError(f"subject {subject!r} of {files.folder / 'mapping.json'} has no {split} file: expected "
                           f"{files.expected(relative)}. Add it, or take the subject out of mapping.json.")
    where, data = found
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TunelabError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8.") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    columns = list(layout.columns or next(reader, []))
    missing = [c for c in (layout.question, *CHOICES) if c not in columns]
    if missing:
        raise TunelabError(f"{where} line 1: no column {', '.join(map(repr, missing))} in its header "
                           f"({', '.join(columns) or 'none'}); a file of this task has the columns "
                           f"{layout.question}, A, B, C, D, {layout.answer}.")
    has_answer = layout.answer in columns
    if need_answers and not has_answer:
        raise TunelabError(f"{where}: no {layout.answer!r} column, which the few-shot examples need (their answers).")
    questions, line = [], reader.line_num
    for cells in reader:
        start, line = line + 1, reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(columns):
            raise TunelabError(f"{where} line {start}: {len(cells)} cells for the {len(columns)} columns "
                               f"{', '.join(columns)}: a cell is missing, or a comma inside one is not quoted.")
        row = dict(zip(columns, cells))
        answer = row[layout.answer].strip() if has_answer else None
        if has_answer and answer not in CHOICES:
            raise TunelabError(f"{where} line {start}: answer {row[layout.answer]!r} is not one of "
                               f"{', '.join(CHOICES)}: correct it, or take the row out.")
        questions.append(Question(f"{where} line {start}", row[layout.question], {c: row[c] for c in CHOICES},
                                  answer))
    return questions


# --- prompting and scoring --------------------------------------------------------------------------------------

def example_text(question: Question, prompt: Prompt) -> str:
    return question.question + "".join(prompt.choice.format(choice=c, content=question.options[c])
                                       for c in CHOICES) + prompt.answer


def question_messages(subject: Subject, question: Question, prompt: Prompt) -> list[dict]:
    """LLaMA-Factory's `EvalTemplate.format_example` up to the question (its answer is what is predicted)."""
    messages: list[dict] = []
    for example in subject.support:
        messages += [{"role": "user", "content": example_text(example, prompt)},
                     {"role": "assistant", "content": example.answer}]
    messages.append({"role": "user", "content": example_text(question, prompt)})
    messages[0]["content"] = prompt.system.format(subject=subject.name) + messages[0]["content"]
    return messages


def prompt_text(chat, subject: Subject, question: Question, prompt: Prompt) -> str:
    """The question's prompt as the model reads it: its conversation (after the session's system prompt, if any) in
    the model's template, with a generation prompt. `chat`: a `ChatModel` (its template, system and tokenizer)."""
    messages = chat.with_system(question_messages(subject, question, prompt))
    return chat.template.render(messages, add_generation_prompt=True)


def prompt_rows(chat, subject: Subject, prompt: Prompt) -> list[list[int]]:
    """The token ids of each of the subject's questions as the model reads them: its prompt's pieces tokenised (one
    tokenizer call for the subject) and joined, the whole text, or each message on its own where the template keeps
    them apart (fewshot, as LLaMA-Factory's `encode_oneturn` encodes each message)."""
    pieces = [chat.template.prompt_pieces(chat.with_system(question_messages(subject, q, prompt)))
              for q in subject.questions]
    flat = [text for texts in pieces for text in texts]
    ids = iter(chat.tokenizer(flat, add_special_tokens=False).input_ids if flat else [])
    return [[i for _ in texts for i in next(ids)] for texts in pieces]


def choice_ids(tokenizer) -> list[int]:
    """The token id of each letter as LLaMA-Factory takes it: the last of `encode(letter)`."""
    ids = [tokenizer.encode(c, add_special_tokens=False)[-1] for c in CHOICES]
    if len(set(ids)) < len(ids):
        raise TunelabError(f"the tokenizer gives the letters {', '.join(CHOICES)} the ids {ids}, not one each: "
                           f"their logits cannot tell the answers apart.")
    return ids


def predict_letters(model, rows: list[list[int]], letter_ids: list[int], batch_size: int, pad_id: int,
                    on_batch: Callable[[int], None] | None = None) -> list[str]:
    """The letter each row of token ids is answered with: the highest of the letters' logits at the row's last
    token. Rows are batched by length, right-padded; a row's tokens see only the tokens before them (causal
    attention, padding masked), so what the batch holds does not change its answer."""
    import torch

    from tunelab.model.parts import split_model

    decoder, lm_head, _ = split_model(model)
    device = next(model.parameters()).device
    letters: list[str] = [""] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    with torch.inference_mode():
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            lengths = torch.tensor([len(rows[i]) for i in batch])
            ids = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, :len(rows[i])] = torch.tensor(rows[i])
            mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)[0]
            last = hidden[torch.arange(len(batch), device=device), (lengths - 1).to(device)]
            scores = lm_head(last)[:, letter_ids].float().cpu()
            for r, i in enumerate(batch):
                letters[i] = CHOICES[int(scores[r].argmax())]
            if on_batch is not None:
                on_batch(len(batch))
    return letters


def score_table(task: Task, letters: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(the table LLaMA-Factory prints: "Average" and each category, percent with 2 decimals; a line per subject),
    over the questions that have an answer."""
    marks: dict[str, list[bool]] = {"Average": [], **{c: [] for c in CATEGORIES}}
    subjects = []
    for subject in task.subjects:
        right = [p == q.answer for p, q in zip(letters[subject.key], subject.questions) if q.answer is not None]
        if not right:
            continue
        marks["Average"] += right
        marks.setdefault(subject.category, []).extend(right)
        subjects.append(f"{subject.name} ({subject.key}, {subject.category}): {100 * sum(right) / len(right):.2f} "
                        f"({sum(right)}/{len(right)})")
    table = [f"{name:>15}: {100 * sum(m) / len(m):.2f}" for name, m in marks.items() if m]
    return table, subjects

