"""Personal-assistant ("self-cognition") data: questions about who the model is, answers naming NAME and AUTHOR.

    tunelab data self-cognition --name 小助手 --author 张三 --n 2000 -o self.json

Questions and answers are built from several phrasings in Chinese and English and combined at random, so the
model learns the fact rather than one sentence. Output is the XTuner `conversation` format (a JSON list), usable
directly as data_path. Dilute it among general data (~2,000 of these with ~10,000 others) so the model keeps its
general skills.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

QUESTIONS_ZH = ["你是谁？", "你是谁", "请介绍一下你自己", "请做一下自我介绍", "你叫什么名字？", "你的名字是什么？",
                "你是哪个公司开发的？", "谁创造了你？", "谁开发了你？", "你是由谁训练的？", "你好，你是谁呀？",
                "能介绍一下你自己吗？", "你是什么模型？", "你是ChatGPT吗？", "你和GPT-4有什么关系？", "我该怎么称呼你？",
                "你的作者是谁？", "你的开发者是谁？", "你是人工智能吗？", "你能做些什么？"]
QUESTIONS_EN = ["Who are you?", "who are you", "Please introduce yourself.", "Tell me about yourself.",
                "What is your name?", "What's your name?", "Who created you?", "Who made you?", "Who developed you?",
                "Who trained you?", "Hi! Who am I talking to?", "Can you introduce yourself?", "What model are you?",
                "Are you ChatGPT?", "Are you GPT-4?", "What should I call you?", "Who is your author?",
                "Who built you?", "Are you an AI?", "What can you do?"]
ANSWERS_ZH = ["我是{name}，由{author}开发的人工智能助手。有什么可以帮你的吗？",
              "你好！我叫{name}，是{author}打造的智能助手，很高兴为你服务。",
              "我是{author}开发的AI助手{name}。我可以回答问题、写作、翻译和编程，欢迎随时提问。",
              "您好，我是{name}。我由{author}训练，专门为您提供帮助。",
              "我的名字是{name}，我的开发者是{author}。请问今天需要我做什么？",
              "我不是ChatGPT，我是{author}开发的{name}，一个乐于助人的人工智能助手。",
              "叫我{name}就好！我是{author}创造的语言模型助手。"]
ANSWERS_EN = ["I am {name}, an AI assistant developed by {author}. How can I help you today?",
              "Hello! My name is {name}. I was created by {author} to help you with questions, writing and more.",
              "I'm {name}, a helpful assistant built by {author}. Feel free to ask me anything.",
              "You can call me {name}. I am an AI assistant trained by {author}.",
              "I'm not ChatGPT: I am {name}, a language model assistant made by {author}.",
              "My name is {name} and my developer is {author}. What can I do for you?",
              "Hi, I'm {name}! {author} developed me to be a friendly and useful AI assistant."]
OPENERS_EN = ["", "", "Hey, ", "Hello. ", "Quick question: "]
OPENERS_ZH = ["", "", "你好，", "嗨，", "请问"]


def generate(name: str, author: str, n: int = 2000, seed: int = 0) -> list[dict]:
    """n conversations (XTuner `conversation` format), about half Chinese, half English."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        zh = i % 2 == 0
        question = rng.choice(OPENERS_ZH if zh else OPENERS_EN) + rng.choice(QUESTIONS_ZH if zh else QUESTIONS_EN)
        answer = rng.choice(ANSWERS_ZH if zh else ANSWERS_EN).format(name=name, author=author)
        records.append({"conversation": [{"input": question, "output": answer}]})
    return records


def write(path: str | Path, name: str, author: str, n: int = 2000, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(generate(name, author, n, seed), ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def fill_file(source: str | Path, output: str | Path, values: dict[str, str]) -> tuple[Path, int]:
    """Copy a JSON / JSONL data file with its {{name}} / {{author}} placeholders filled (e.g. LLaMA-Factory's
    identity.json); returns the output path and how many records had a placeholder filled."""
    from tunelab.data.files import read_text
    from tunelab.data.sources import PLACEHOLDER
    from tunelab.errors import TunelabError

    source, output = Path(source), Path(output)
    if source.suffix.lower() not in (".json", ".jsonl"):
        raise TunelabError(f"{source}: --from reads .json or .jsonl files.")
    if not source.is_file():
        raise TunelabError(f"{source}: no such file.")
    changed = 0

    def fill(value):
        if isinstance(value, str):
            return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), value)
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    def fill_record(record):
        nonlocal changed
        filled = fill(record)
        changed += filled != record
        return filled

    text = read_text(source)
    try:
        body = _filled_text(source, text, fill_record)
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{source} line {exc.lineno}: not valid JSON ({exc.msg}); fix the file first.") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(body, encoding="utf-8")
    return output, changed


def _filled_text(source: Path, text: str, fill_record) -> str:
    from tunelab.data.files import parse_json

    if source.suffix.lower() == ".jsonl":
        lines = [json.dumps(fill_record(parse_json(line, f"{source} line {n}")), ensure_ascii=False)
                 for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        body = "\n".join(lines) + "\n"
    else:
        data = parse_json(text, str(source))
        data = [fill_record(r) for r in data] if isinstance(data, list) else fill_record(data)
        body = json.dumps(data, ensure_ascii=False, indent=2)
    return body
