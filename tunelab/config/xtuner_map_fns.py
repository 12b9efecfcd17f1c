"""XTuner's built-in dataset map functions whose records tunelab has no format for. `tunelab convert xtuner-config`
writes the one a config uses into the converted config (`XTUNER_MAP_FNS[name]`, its source text).

XTuner's code (Apache-2.0), from xtuner/dataset/map_fns/dataset_map_fns/, with the docstrings dropped and
SYSTEM_TEMPLATE.* written out as its text. Each returns XTuner's {"conversation": [{"system"?, "input", "output"}]},
which tunelab reads as data_format = 'conversation'. The ones tunelab reads natively are `MAP_FN_FORMATS` in
xtuner_data.py.
"""

from __future__ import annotations

import inspect


def alpaca_zh_map_fn(example):
    return {"conversation": [{"input": f"{example['instruction_zh']}\n{example['input_zh']}",
                              "output": example["output_zh"]}]}


def arxiv_map_fn(example):
    system = ("If you are an expert in writing papers, please generate a good paper title for this paper based on "
              "other authors' descriptions of their abstracts.\n")
    return {"conversation": [{"system": system, "input": example["abstract"], "output": example["title"]}]}


def code_alpaca_map_fn(example):
    system = ("You are a professional programer. Please provide the corresponding code based on the description of "
              "Human.\n")
    return {"conversation": [{"system": system, "input": example["prompt"], "output": example["completion"]}]}


def colors_map_fn(example):
    system = ("You are a professional color designer. Please provide the corresponding colors based on the "
              "description of Human.\n")
    desc = ":".join(example["description"].split(":")[1:]).strip()
    return {"conversation": [{"system": system, "input": desc, "output": example["color"]}]}


def crime_kg_assitant_map_fn(example):
    system = "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n"
    return {"conversation": [{"system": system, "input": example["input"], "output": example["output"]}]}


def law_reference_map_fn(example):
    system = "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n"
    return {"conversation": [{"system": system, "input": example["question"], "output": example["answer"]}]}


def medical_map_fn(example):
    system = "如果你是一名医生，请根据患者的描述回答医学问题。\n"
    return {"conversation": [{"system": system, "input": "{instruction}\n{input}".format(**example),
                              "output": example["output"]}]}


def oasst1_map_fn(example):
    # '### Human: ... ### Assistant: ...' turns (timdettmers/openassistant-guanaco); a last question without an
    # answer is dropped
    data = []
    for sentence in example["text"].strip().split("###"):
        sentence = sentence.strip()
        if sentence[:6] == "Human:":
            data.append(sentence[6:].strip())
        elif sentence[:10] == "Assistant:":
            data.append(sentence[10:].strip())
    if len(data) % 2:
        data.pop()
    return {"conversation": [{"input": data[i], "output": data[i + 1]} for i in range(0, len(data), 2)]}


def openorca_map_fn(example):
    return {"conversation": [{"system": example["system_prompt"], "input": example["question"],
                              "output": example["response"]}]}


def sql_map_fn(example):
    system = ("If you are an expert in SQL, please generate a good SQL Query for Question based on the CREATE TABLE "
              "statement.\n")
    return {"conversation": [{"system": system, "input": "{context}\n{question}".format(**example),
                              "output": example["answer"]}]}


def stack_exchange_map_fn(example):
    return {"conversation": [{"input": example["question"], "output": example["response"]}]}


def tiny_codes_map_fn(example):
    system = ("You are a professional programer. Please provide the corresponding code based on the description of "
              "Human.\n")
    return {"conversation": [{"system": system, "input": example["prompt"], "output": example["response"]}]}


XTUNER_MAP_FNS: dict[str, str] = {
    fn.__name__: inspect.getsource(fn).strip()
    for fn in (alpaca_zh_map_fn, arxiv_map_fn, code_alpaca_map_fn, colors_map_fn, crime_kg_assitant_map_fn,
               law_reference_map_fn, medical_map_fn, oasst1_map_fn, openorca_map_fn, sql_map_fn, stack_exchange_map_fn,
               tiny_codes_map_fn)
}
