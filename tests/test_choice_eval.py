"""`tunelab eval`: MMLU / C-Eval / CMMLU accuracy as `llamafactory-cli eval` computes it. Task folders in the three
layouts LLaMA-Factory ships (MMLU in its zip, C-Eval and CMMLU extracted) are read; a 2-shot prompt is LLaMA-Factory's
EvalTemplate conversation in the model's template, string for string (under `fewshot`, a base model's plain text,
token for token too); each prediction is the argmax of the letters' logits at the prompt's last token (checked
against plain transformers forward passes); a model `tunelab train` taught the answers (ChatML, fewshot) scores 100
where its base does not; batch sizes agree; bad folders and files are named."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import pytest

from tests.train_helpers import assert_one_line_error, write_config
from tunelab.cli.main import main

LETTERS = "ABCD"
WORDS = "apple river music stone cloud garden tiger window paper bread coffee mountain ocean forest city lamp".split()
CN = "苹果 河流 音乐 石头 云朵 花园 老虎 窗户 纸张 面包 咖啡 高山 海洋 森林 城市 台灯".split()
ANSWERS = "BDACCADBDBCA"  # every letter as often: a model that always says one letter scores 25 on a split


def _question(words: list[str], topic: str, i: int, zh: bool) -> dict:
    """Question i of a subject: which option is words[i]; the answer letter from ANSWERS (the length varies with i)."""
    answer = ANSWERS[(i + len(topic)) % len(ANSWERS)]
    others = [w for w in words if w != words[i % len(words)]][i % 5:i % 5 + 3]
    options = dict(zip([c for c in LETTERS if c != answer], others), **{answer: words[i % len(words)]})
    text = (f"第{i}题（{topic}）：哪一个是{words[i % len(words)]}" + "？" * (1 + i % 3) if zh else
            f"Question {i} on {topic}: which one is the {words[i % len(words)]}" + " really" * (i % 3) + "?")
    return {"question": text, **{c: options[c] for c in LETTERS}, "answer": answer}


def _csv(rows: list[list]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


SUBJECTS = {  # two subjects in two categories per task: (key, display name, category)
    "mmlu": [("astronomy", "astronomy", "STEM"), ("philosophy", "philosophy", "Humanities")],
    "ceval": [("college_physics", "大学物理", "STEM"), ("law", "法学", "Humanities")],
    "cmmlu": [("agronomy", "农学", "Other"), ("ethnology", "民族学", "Social Sciences")],
}
SIZES = {"dev": 3, "val": 4, "test": 8}


def _split(task: str, key: str, split: str) -> list[dict]:
    offset = {"dev": 0, "val": 3, "test": 7}[split]  # dev, val and test ask different questions
    return [_question(CN if task != "mmlu" else WORDS, key, offset + i, task != "mmlu") for i in range(SIZES[split])]


def _files(task: str) -> dict[str, str]:
    """{relative path: CSV text} of a task in LLaMA-Factory's layout (its loading scripts' paths and columns)."""
    files = {}
    for key, _, _ in SUBJECTS[task]:
        for split in ("dev", "val", "test") if task != "cmmlu" else ("dev", "test"):
            rows = _split(task, key, split)
            if task == "mmlu":  # no header: question, A, B, C, D, answer
                files[f"data/{split}/{key}_{split}.csv"] = _csv([[r[c] for c in ("question", *LETTERS, "answer")]
                                                                 for r in rows])
            elif task == "ceval":  # dev: with explanations (one spans lines); test: no answers, as C-Eval's
                columns = {"dev": ["answer", "explanation"], "val": ["answer"], "test": []}[split]
                files[f"{split}/{key}_{split}.csv"] = _csv(
                    [["id", "question", *LETTERS, *columns]] +
                    [[i, r["question"], *(r[c] for c in LETTERS), *([r["answer"]] if columns else []),
                      *(["1. 因为\n2. 所以"] if split == "dev" else [])] for i, r in enumerate(rows)])
            else:  # CMMLU: an unnamed index column, Question and Answer capitalised
                files[f"{split}/{key}.csv"] = _csv([["", "Question", *LETTERS, "Answer"]] +
                                                   [[i, r["question"], *(r[c] for c in LETTERS), r["answer"]]
                                                    for i, r in enumerate(rows)])
    return files


def write_tasks(task_dir: Path) -> Path:
    for task, subjects in SUBJECTS.items():
        folder = task_dir / task
        folder.mkdir(parents=True)
        (folder / "mapping.json").write_text(json.dumps({k: {"name": n, "category": c} for k, n, c in subjects},
                                                        ensure_ascii=False), encoding="utf-8")
        if task == "mmlu":
            with zipfile.ZipFile(folder / "mmlu.zip", "w") as z:
                for relative, text in _files(task).items():
                    z.writestr(relative, text)
        else:
            for relative, text in _files(task).items():
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                (folder / relative).write_text(text, encoding="utf-8")
    return task_dir


# LLaMA-Factory's prompts, written out here (src/llamafactory/eval/template.py), and ChatML (qwen_chat) by hand
SYSTEM = {"en": "The following are multiple choice questions (with answers) about {}.\n\n",
          "zh": "以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n\n"}
ANSWER = {"en": "\nAnswer:", "zh": "\n答案："}


def lf_turn(row: dict, lang: str) -> str:
    return row["question"] + "".join(f"\n{c}. {row[c]}" for c in LETTERS) + ANSWER[lang]


def lf_prompt(task: str, key: str, name: str, row: dict, n_shot: int, lang: str) -> str:
    """The few-shot conversation up to the question, in ChatML with its generation prompt."""
    turns = [(lf_turn(r, lang), r["answer"]) for r in _split(task, key, "dev")[:n_shot]] + [(lf_turn(row, lang), None)]
    text = ""
    for k, (user, answer) in enumerate(turns):
        subject = SYSTEM[lang].format(name) if k == 0 else ""
        text += f"<|im_start|>user\n{subject}{user}<|im_end|>\n<|im_start|>assistant\n"
        text += f"{answer}<|im_end|>\n" if answer else ""
    return text


def lf_fewshot_turns(task: str, key: str, name: str, row: dict, n_shot: int, lang: str) -> list[str]:
    """LLaMA-Factory's fewshot template on the conversation up to the question, message by message as its
    `Template._encode` formats them: no prefix (no BOS), no system (the subject's text opens the first user message),
    a user message as it is, a reply followed by "\\n\\n" (`StringFormatter(slots=["{{content}}\\n\\n"])`; up to
    v0.9.1 a `format_separator` "\\n\\n" before each later user message, the same text)."""
    texts = []
    for k, r in enumerate(_split(task, key, "dev")[:n_shot] + [row]):
        texts.append((SYSTEM[lang].format(name) if k == 0 else "") + lf_turn(r, lang))
        if k < n_shot:
            texts.append(r["answer"] + "\n\n")
    return texts


def lf_fewshot_ids(tokenizer, task: str, key: str, name: str, row: dict, n_shot: int, lang: str) -> list[int]:
    """LLaMA-Factory's `encode_oneturn` prompt ids under fewshot: each message encoded alone, add_special_tokens=False
    (`_convert_elements_to_ids`), the ids joined."""
    return [i for text in lf_fewshot_turns(task, key, name, row, n_shot, lang)
            for i in tokenizer.encode(text, add_special_tokens=False)]


def llama2_style_tokenizer():
    """A tokenizer like Llama 2's: sentencepiece's '▁' before a text's first word, BOS added by default (as Llama's
    add_bos_token): a text tokenised alone starts with '▁', so the ids of a conversation's messages encoded one by one
    (LLaMA-Factory) differ from those of its whole text where the messages meet in plain text ("Answer:" "B")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab.model.tiny import _CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # newlines apart, as Llama's byte tokens <0x0A> are
        pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    text = [SYSTEM["en"].format("astronomy") + lf_turn(r, "en") + r["answer"] + "\n\n"
            for r in _split("mmlu", "astronomy", "dev")]
    text.append(" A B C D" * 8)  # "▁A" to "▁D" tokens: a letter alone is one token, as Llama's vocabulary has them
    tok.train_from_iterator((_CORPUS + text) * 4, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("evaluation"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """A work dir of `tunelab train` (full fine-tuning of the tiny llama, qwen_chat) on CMMLU's test questions as
    their 2-shot conversations, each answered with its letter (~20 s)."""
    return _train_on_answers(tmp_path_factory.mktemp("mc_run"), tiny_llama_dir, "cmmlu", "zh")


def _train_on_answers(directory: Path, model_dir, task: str, lang: str, **settings) -> Path:
    """The work dir of `tunelab train` (full fine-tuning of `model_dir`) on `task`'s test questions as their 2-shot
    conversations, each answered with its letter."""
    records = []
    for key, name, _ in SUBJECTS[task]:
        for row in _split(task, key, "test"):
            messages = []
            for k, r in enumerate(_split(task, key, "dev")[:2] + [row]):
                messages += [{"role": "user", "content": (SYSTEM[lang].format(name) if k == 0 else "") +
                              lf_turn(r, lang)}, {"role": "assistant", "content": r["answer"]}]
            records.append({"messages": messages})
    (directory / "mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                        encoding="utf-8")
    config = write_config(directory, model_dir, method="full", lr=3e-3, max_epochs=40, batch_size=4,
                          data_path="mc.jsonl", max_length=1024, pack_to_max_length=False, save_steps=1000,
                          logging_steps=50, **settings)
    assert main(["train", str(config), "--work-dir", str(directory / "wd"), "--device", "cpu"]) == 0
    return directory / "wd"


@pytest.fixture(scope="module")
def base_llama_dir(tmp_path_factory) -> Path:
    """A tiny llama base model (no chat template, no tunelab.json) with a Llama-2-style tokenizer."""
    from tunelab.model.tiny import make_model

    return make_model(tmp_path_factory.mktemp("base_llama"), "llama", tokenizer=llama2_style_tokenizer())


@pytest.fixture(scope="module")
def fewshot_trained(tmp_path_factory, base_llama_dir):
    """A work dir of `tunelab train` with prompt_template = 'fewshot' (full fine-tuning of the base) on MMLU's test
    questions as their 2-shot conversations, each answered with its letter (~20 s)."""
    return _train_on_answers(tmp_path_factory.mktemp("fewshot_run"), base_llama_dir, "mmlu", "en",
                             prompt_template="fewshot")


def _eval(model, tasks, task, *extra) -> int:
    return main(["eval", str(model), "--task", task, "--task-dir", str(tasks), "--device", "cpu", *extra])


def _table(printed: str) -> dict[str, float]:
    return {line.split(":")[0].strip(): float(line.split(":")[1]) for line in printed.splitlines() if ": " in line}


# --- (1) the prompt -------------------------------------------------------------------------------------------------

def test_the_prompt_is_llama_factorys_conversation_in_the_models_template(tasks):
    from tunelab.chat.choice_eval import PROMPTS, Question, Subject, prompt_text, question_messages, read_task
    from tunelab.chat.engine import ChatModel
    from tunelab.data.templates import get_template

    # LLaMA-Factory's own test of its EvalTemplate (tests/eval/test_eval_template.py), up to the predicted answer
    shot = Question("x", "Fewshot question", {c: f"Fewshot{i}" for i, c in enumerate(LETTERS, 1)}, "B")
    target = Question("y", "Target question", {c: f"Target{i}" for i, c in enumerate(LETTERS, 1)}, "C")
    assert question_messages(Subject("s", "SubName", "STEM", [target], [shot]), target, PROMPTS["en"]) == [
        {"role": "user", "content": ("The following are multiple choice questions (with answers) about SubName.\n\n"
                                     "Fewshot question\nA. Fewshot1\nB. Fewshot2\nC. Fewshot3\nD. Fewshot4\nAnswer:")},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "Target question\nA. Target1\nB. Target2\nC. Target3\nD. Target4\nAnswer:"}]
    shot = Question("x", "示例问题", {c: f"示例答案{i}" for i, c in enumerate(LETTERS, 1)}, "B")
    target = Question("y", "目标问题", {c: f"目标答案{i}" for i, c in enumerate(LETTERS, 1)}, "C")
    assert question_messages(Subject("s", "主题", "STEM", [target], [shot]), target, PROMPTS["zh"]) == [
        {"role": "user", "content": ("以下是中国关于主题考试的单项选择题，请选出其中的正确答案。\n\n"
                                     "示例问题\nA. 示例答案1\nB. 示例答案2\nC. 示例答案3\nD. 示例答案4\n答案：")},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "目标问题\nA. 目标答案1\nB. 目标答案2\nC. 目标答案3\nD. 目标答案4\n答案："}]

    # a C-Eval question, 2-shot, rendered by qwen_chat (ChatML): the subject's text on the first user turn only
    task = read_task(tasks, "ceval_validation", n_shot=2)
    law = task.subjects[1]
    dev, row = _split("ceval", "law", "dev"), _split("ceval", "law", "val")[1]
    chat = ChatModel(model=None, tokenizer=None, template=get_template("qwen_chat"))
    expected = ("<|im_start|>user\n以下是中国关于法学考试的单项选择题，请选出其中的正确答案。\n\n" + lf_turn(dev[0], "zh") +
                "<|im_end|>\n<|im_start|>assistant\n" + dev[0]["answer"] + "<|im_end|>\n"
                "<|im_start|>user\n" + lf_turn(dev[1], "zh") + "<|im_end|>\n<|im_start|>assistant\n" +
                dev[1]["answer"] + "<|im_end|>\n<|im_start|>user\n" + lf_turn(row, "zh") +
                "<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_text(chat, law, law.questions[1], PROMPTS["zh"]) == expected
    assert expected == lf_prompt("ceval", "law", "法学", row, 2, "zh")  # the helper the other tests check with
    assert row["question"] + "\nA. " in expected and expected.endswith("\n答案：<|im_end|>\n<|im_start|>assistant\n")
    # a session system prompt (--system, or the one trained with) is its own turn first; the subject's text stays
    chat.system = "Be brief."
    assert prompt_text(chat, law, law.questions[1], PROMPTS["zh"]) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n" + expected
    # 0-shot: the subject's text goes before the question itself
    zero = read_task(tasks, "mmlu_test", n_shot=0).subjects[0]
    assert zero.support == [] and question_messages(zero, zero.questions[0], PROMPTS["en"]) == [
        {"role": "user", "content": SYSTEM["en"].format("astronomy") + lf_turn(_split("mmlu", "astronomy", "test")[0],
                                                                               "en")}]


def test_fewshot_is_llama_factorys_text_and_its_ids(tasks, base_llama_dir):
    """--prompt-template fewshot (LLaMA-Factory's --template fewshot), for a base model: the conversation as plain text,
    and its ids LLaMA-Factory's `encode_oneturn`'s: each message tokenised alone, no BOS."""
    from transformers import AutoTokenizer

    from tunelab.chat.choice_eval import PROMPTS, choice_ids, prompt_rows, prompt_text, read_task
    from tunelab.chat.engine import ChatModel
    from tunelab.data.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(base_llama_dir)
    assert tokenizer("Answer:").input_ids[0] == tokenizer.bos_token_id  # BOS unless told not to, as Llama's
    astronomy = read_task(tasks, "mmlu_test", n_shot=2).subjects[0]
    dev, rows = _split("mmlu", "astronomy", "dev"), _split("mmlu", "astronomy", "test")
    chat = ChatModel(model=None, tokenizer=tokenizer, template=get_template("fewshot", tokenizer))
    # the text by hand from LLaMA-Factory's definitions: the subject's line, each example and its letter, "\n\n"
    # after the letter, then the question; no role markers, no BOS, no EOS
    expected = ("The following are multiple choice questions (with answers) about astronomy.\n\n" +
                lf_turn(dev[0], "en") + dev[0]["answer"] + "\n\n" + lf_turn(dev[1], "en") + dev[1]["answer"] + "\n\n" +
                lf_turn(rows[1], "en"))
    assert expected.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n"
                               "Question 0 on astronomy: which one is the apple?\nA. ")
    assert f"\nAnswer:{dev[0]['answer']}\n\nQuestion 1 " in expected
    assert expected.endswith(f"\nC. {rows[1]['C']}\nD. {rows[1]['D']}\nAnswer:")
    assert prompt_text(chat, astronomy, astronomy.questions[1], PROMPTS["en"]) == expected
    assert "".join(lf_fewshot_turns("mmlu", "astronomy", "astronomy", rows[1], 2, "en")) == expected
    # the ids: each message tokenised alone, as LLaMA-Factory encodes them, no BOS
    ids = prompt_rows(chat, astronomy, PROMPTS["en"])
    assert ids == [lf_fewshot_ids(tokenizer, "mmlu", "astronomy", "astronomy", row, 2, "en") for row in rows]
    assert {row[0] for row in ids} != {tokenizer.bos_token_id} and tokenizer.bos_token_id not in ids[1]
    # so each example's letter is the token the answer is read from (encode("B")[-1], "▁B" as in Llama's vocabulary);
    # the whole text tokenised at once has "B" there, without the "▁", and other ids
    letter = choice_ids(tokenizer)[LETTERS.index(dev[0]["answer"])]
    first = len(tokenizer.encode(SYSTEM["en"].format("astronomy") + lf_turn(dev[0], "en"), add_special_tokens=False))
    assert ids[1][first] == letter
    whole = tokenizer(expected, add_special_tokens=False).input_ids
    assert whole != ids[1] and whole[first] != letter


def test_the_three_layouts_are_read_as_llama_factorys_scripts_read_them(tasks):
    from tunelab.chat.choice_eval import read_task

    mmlu = read_task(tasks, "mmlu_test", n_shot=5)  # from mmlu.zip: data/test/<subject>_test.csv, no header
    assert [(s.key, s.name, s.category, len(s.questions), len(s.support)) for s in mmlu.subjects] == \
        [("astronomy", "astronomy", "STEM", 8, 3), ("philosophy", "philosophy", "Humanities", 8, 3)]
    first = mmlu.subjects[0].questions[0]
    assert first.where == f"{tasks / 'mmlu' / 'mmlu.zip'}:data/test/astronomy_test.csv line 1"
    row = _split("mmlu", "astronomy", "test")[0]
    assert (first.question, first.options, first.answer) == (row["question"], {c: row[c] for c in LETTERS},
                                                             row["answer"])
    assert len(read_task(tasks, "mmlu_validation", n_shot=1).subjects[1].questions) == 4
    assert len(read_task(tasks, "mmlu_train", n_shot=1).subjects[1].questions) == 3  # train: the dev set
    ceval = read_task(tasks, "ceval_validation", n_shot=3)  # extracted, header; dev cells span lines
    assert ceval.subjects[0].support[1].where == f"{tasks / 'ceval' / 'dev' / 'college_physics_dev.csv'} line 4"
    assert [q.answer for q in ceval.subjects[1].questions] == [r["answer"] for r in _split("ceval", "law", "val")]
    assert {q.answer for s in read_task(tasks, "ceval_test", n_shot=1).subjects for q in s.questions} == {None}
    cmmlu = read_task(tasks, "cmmlu_test", n_shot=2, limit=3)  # ",Question,A,B,C,D,Answer"
    assert [q.question for q in cmmlu.subjects[1].questions] == [r["question"] for r in
                                                                 _split("cmmlu", "ethnology", "test")[:3]]
    assert [q.answer for q in cmmlu.subjects[1].support] == \
        [r["answer"] for r in _split("cmmlu", "ethnology", "dev")[:2]]


# --- (2) the scores, (3) what training taught, (4) batch sizes ----------------------------------------------------

def _hand_letters(model_dir: Path, tokenizer_dir: Path, task: str, n_shot: int, lang: str,
                  fewshot: bool = False) -> dict[str, list[str]]:
    """Each question's letter by plain transformers: the whole prompt through the model, logits[-1] at the letters.
    The prompt: its ChatML text tokenised, or (`fewshot`) LLaMA-Factory's fewshot ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [tokenizer.encode(c, add_special_tokens=False)[-1] for c in LETTERS]
    benchmark, split = task.split("_")
    letters = {}
    for key, name, _ in SUBJECTS[benchmark]:
        letters[key] = []
        for row in _split(benchmark, key, {"test": "test", "validation": "val"}[split]):
            tokens = (lf_fewshot_ids(tokenizer, benchmark, key, name, row, n_shot, lang) if fewshot else
                      tokenizer(lf_prompt(benchmark, key, name, row, n_shot, lang), add_special_tokens=False).input_ids)
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0, -1]
            letters[key].append(LETTERS[int(logits[ids].argmax())])
    return letters


def _accuracy(task: str, letters: dict[str, list[str]]) -> dict[str, float]:
    name, split = task.split("_")
    marks: dict[str, list[bool]] = {"Average": []}
    for key, _, category in SUBJECTS[name]:
        right = [p == r["answer"] for p, r in zip(letters[key], _split(name, key, {"test": "test"}.get(split, "val")))]
        marks["Average"] += right
        marks.setdefault(category, []).extend(right)
    return {k: round(100 * sum(v) / len(v), 2) for k, v in marks.items()}


def test_each_prediction_is_the_argmax_of_the_letters_logits_and_the_table_their_accuracy(
        trained, tiny_llama_dir, tasks, tmp_path, capsys):
    from tunelab.train.layout import resolve_checkpoint

    tuned_dir = resolve_checkpoint(trained) / "model"
    for model, template, save in ((trained, (), "tuned"), (tiny_llama_dir, ("--prompt-template", "qwen_chat"), "base")):
        assert _eval(model, tasks, "mmlu_test", "--n-shot", "2", "--save-dir", str(tmp_path / save), *template) == 0
        printed = capsys.readouterr().out
        results = json.loads((tmp_path / save / "results.json").read_text(encoding="utf-8"))
        hand = _hand_letters(tuned_dir if save == "tuned" else tiny_llama_dir, tiny_llama_dir, "mmlu_test", 2, "en")
        assert {k: [v[str(i)]["prediction"] for i in range(len(v))] for k, v in results.items()} == hand
        assert [results["philosophy"][str(i)]["answer"] for i in range(8)] == \
            [r["answer"] for r in _split("mmlu", "philosophy", "test")]
        table = _accuracy("mmlu_test", hand)
        assert _table(printed) == table
        assert printed.splitlines()[0] == f"        Average: {table['Average']:.2f}"  # LLaMA-Factory's "{:>15}: {:.2f}"
        log = (tmp_path / save / "results.log").read_text(encoding="utf-8")
        assert log.startswith(printed) and "philosophy (philosophy, Humanities): " in log
    assert len({p for letters in hand.values() for p in letters}) == 1  # the random base answers one letter
    tuned = json.loads((tmp_path / "tuned" / "results.json").read_text(encoding="utf-8"))
    assert len({v["prediction"] for s in tuned.values() for v in s.values()}) > 1  # the tuned one several


def test_a_model_trained_on_the_answers_scores_100_where_its_base_does_not(trained, tiny_llama_dir, tasks, capsys):
    assert _eval(trained, tasks, "cmmlu_test", "--n-shot", "2") == 0
    out, err = capsys.readouterr()
    assert "prompt template: qwen_chat (tunelab.json)" in err and "2-shot, prompts in zh" in err
    assert _table(out) == {"Average": 100.0, "Social Sciences": 100.0, "Other": 100.0}
    assert _eval(tiny_llama_dir, tasks, "cmmlu_test", "--n-shot", "2", "--prompt-template", "qwen_chat") == 0
    assert _table(capsys.readouterr().out)["Average"] <= 50


def test_batch_sizes_give_the_same_predictions_and_n_shot_past_the_dev_set_warns_once(trained, tasks, tmp_path,
                                                                                        capsys, monkeypatch):
    from tunelab.model import parts

    passes = []  # each forward pass's real lengths: --batch-size 4 pads questions of different lengths together
    split_model = parts.split_model

    def recording(model):
        decoder, *rest = split_model(model)

        def forward(**inputs):
            passes.append(inputs["attention_mask"].sum(dim=1).tolist())
            return decoder(**inputs)
        return (forward, *rest)

    monkeypatch.setattr(parts, "split_model", recording)
    for size in ("1", "4"):
        assert _eval(trained, tasks, "ceval_validation", "--batch-size", size, "--save-dir",
                     str(tmp_path / size)) == 0
        err = capsys.readouterr().err
        assert err.count("--n-shot 5, but the dev set of 2 subject(s) holds fewer examples (college_physics: 3; "
                         "law: 3)") == 1
    one, four = (json.loads((tmp_path / s / "results.json").read_text(encoding="utf-8")) for s in ("1", "4"))
    assert one == four and len({v["prediction"] for s in one.values() for v in s.values()}) > 1
    assert (tmp_path / "1" / "results.log").read_text() == (tmp_path / "4" / "results.log").read_text()
    assert {len(p) for p in passes} == {1, 4} and any(len(set(p)) > 1 for p in passes)  # padded rows among them

    # C-Eval's test set has no answers: predicted and kept, not scored; refused without --save-dir
    assert _eval(trained, tasks, "ceval_test", "-n", "2", "--save-dir", str(tmp_path / "test")) == 0
    out, err = capsys.readouterr()
    assert out == "" and "4 question(s) have no answer" in err
    saved = json.loads((tmp_path / "test" / "results.json").read_text(encoding="utf-8"))
    assert [list(s) for s in saved.values()] == [["0", "1"]] * 2 and saved["law"]["1"]["answer"] is None
    assert _eval(trained, tasks, "ceval_test") == 2
    assert_one_line_error(capsys, 2, "ceval_test", "no answers", "--save-dir", "ceval_validation")
    assert _eval(trained, tasks, "ceval_validation", "--save-dir", str(tmp_path / "1")) == 2  # holds files
    assert_one_line_error(capsys, 2, str(tmp_path / "1"), "--overwrite")


def test_a_base_model_under_fewshot_predicts_what_a_forward_pass_on_llama_factorys_ids_does(
        tasks, base_llama_dir, fewshot_trained, tmp_path, capsys):
    """`tunelab eval BASE --prompt-template fewshot`, and a model trained with prompt_template = 'fewshot' (its
    tunelab.json names it): each prediction the argmax of a plain forward pass on LLaMA-Factory's fewshot ids."""
    from tunelab.train.layout import resolve_checkpoint

    tables = {}
    for model, flags, save in ((base_llama_dir, ("--prompt-template", "fewshot"), "base"),
                               (fewshot_trained, (), "tuned")):
        assert _eval(model, tasks, "mmlu_test", "--n-shot", "2", "--save-dir", str(tmp_path / save), *flags) == 0
        out, err = capsys.readouterr()
        assert f"prompt template: fewshot ({'--prompt-template' if flags else 'tunelab.json'})" in err
        results = json.loads((tmp_path / save / "results.json").read_text(encoding="utf-8"))
        weights = base_llama_dir if save == "base" else resolve_checkpoint(fewshot_trained) / "model"
        hand = _hand_letters(weights, base_llama_dir, "mmlu_test", 2, "en", fewshot=True)
        assert {k: [v[str(i)]["prediction"] for i in range(len(v))] for k, v in results.items()} == hand
        tables[save] = _table(out)
        assert tables[save] == _accuracy("mmlu_test", hand)
    assert tables["tuned"]["Average"] == 100.0 and tables["base"]["Average"] < 100.0  # trained with fewshot, read so
    # LLaMA-Factory's spelling of the flag
    assert _eval(base_llama_dir, tasks, "mmlu_test", "--n-shot", "2", "--template", "fewshot", "--save-dir",
                 str(tmp_path / "lf")) == 0
    assert "prompt template: fewshot (--prompt-template)" in capsys.readouterr().err
    assert (tmp_path / "lf" / "results.json").read_text() == (tmp_path / "base" / "results.json").read_text()


# --- (5) errors ---------------------------------------------------------------------------------------------------

def _broken(tmp_path, tasks, task: str, relative: str, text: str | None) -> Path:
    """A copy of `task`'s folder with `relative` rewritten (None: removed)."""
    import shutil

    copy = tmp_path / "evaluation"
    shutil.copytree(tasks / task, copy / task)
    if text is None:
        (copy / task / relative).unlink()
    else:
        (copy / task / relative).write_text(text, encoding="utf-8")
    return copy


def test_bad_task_folders_and_rows_are_named_before_the_model_loads(tasks, tmp_path, capsys):
    missing = tmp_path / "no_model"  # never loaded: every error comes first
    assert _eval(missing, tasks, "mmlu5_test") == 2
    assert_one_line_error(capsys, 2, "mmlu5", "no such folder", "ceval, cmmlu, mmlu")
    assert _eval(missing, tasks, "mmlu_dev") == 2
    assert_one_line_error(capsys, 2, "mmlu_dev", "test, validation, train")
    assert _eval(missing, tasks, "cmmlu_validation") == 2
    assert_one_line_error(capsys, 2, "cmmlu has no validation split", "cmmlu_test")

    copy = _broken(tmp_path / "a", tasks, "ceval", "mapping.json", None)
    assert _eval(missing, copy, "ceval_validation") == 2
    assert_one_line_error(capsys, 2, str(copy / "ceval"), "no mapping.json", "holds no task folder")

    copy = _broken(tmp_path / "b", tasks, "ceval", "mapping.json", json.dumps(
        {"law": {"name": "法学", "category": "Humanities"}, "marxism": {"name": "马克思主义", "category": "Social Sciences"}}))
    assert _eval(missing, copy, "ceval_validation") == 2
    assert_one_line_error(capsys, 2, "'marxism'", "no val file", str(copy / "ceval" / "val" / "marxism_val.csv"))
    copy = _broken(tmp_path / "c", tasks, "mmlu", "mapping.json", json.dumps({"virology": {"name": "virology"}}))
    assert _eval(missing, copy, "mmlu_test") == 2
    assert_one_line_error(capsys, 2, "mapping.json", "'virology'", "'category'")

    law = _files("ceval")["val/law_val.csv"].splitlines(keepends=True)
    copy = _broken(tmp_path / "d", tasks, "ceval", "val/law_val.csv", "".join(law[:3]) + "3,题目,甲,乙,丙,丁\n")
    assert _eval(missing, copy, "ceval_validation") == 2
    assert_one_line_error(capsys, 2, "law_val.csv line 4", "6 cells for the 7 columns")
    copy = _broken(tmp_path / "e", tasks, "ceval", "val/law_val.csv", "".join(law[:2]) + "1,题目,甲,乙,丙,丁,E\n")
    assert _eval(missing, copy, "ceval_validation") == 2
    assert_one_line_error(capsys, 2, "law_val.csv line 3", "answer 'E' is not one of A, B, C, D")
    dev = _files("ceval")["dev/law_dev.csv"].splitlines(keepends=True)  # each row's explanation spans two lines
    copy = _broken(tmp_path / "f", tasks, "ceval", "dev/law_dev.csv", "".join(dev[:5]) + "2,题目,甲,乙,丙,丁,b,\n")
    assert _eval(missing, copy, "ceval_validation") == 2
    assert_one_line_error(capsys, 2, "law_dev.csv line 6", "answer 'b'")
    copy = _broken(tmp_path / "g", tasks, "cmmlu", "test/agronomy.csv", "id,Question,A,B,C\n0,q,a,b,c\n")
    assert _eval(missing, copy, "cmmlu_test") == 2
    assert_one_line_error(capsys, 2, "agronomy.csv line 1", "no column 'D'")
    assert _eval(missing, tasks, "ceval_test", "--save-dir", str(tasks / "ceval")) == 2  # a folder with files
    assert_one_line_error(capsys, 2, "--save-dir", "--overwrite")


def test_an_mmlu_zip_without_a_subjects_file_names_the_member_it_expected(tasks, tmp_path, capsys):
    import shutil

    copy = tmp_path / "evaluation" / "mmlu"
    shutil.copytree(tasks / "mmlu", copy)
    with zipfile.ZipFile(tasks / "mmlu" / "mmlu.zip") as source, zipfile.ZipFile(copy / "mmlu.zip", "w") as z:
        for member in source.namelist():
            if member != "data/test/philosophy_test.csv":
                z.writestr(member, source.read(member))
    assert _eval(tmp_path / "no_model", copy.parent, "mmlu_test") == 2
    assert_one_line_error(capsys, 2, "'philosophy'", "no test file",
                          f"{copy / 'mmlu.zip'}:data/test/philosophy_test.csv")
