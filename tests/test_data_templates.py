"""Chat templates: the published text of each model, the HF jinja export, 'hf', and guessing from a model."""

from __future__ import annotations

import pytest

from tunelab.data.templates import TEMPLATES, get_template, guess_template
from tunelab.errors import TunelabError

CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]

CHATML = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
          "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>")
LLAMA3 = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
          "<|end_header_id|>\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
          "A2<|eot_id|>")
MISTRAL = "<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]A2</s>"
GLM = "[gMASK]<sop><|system|>\nS<|user|>\nU1<|assistant|>\nA1</s><|user|>\nU2<|assistant|>\nA2</s>"
EXPECTED = {
    "default": "S\n### Human: U1\n### Assistant: A1</s>\n### Human: U2\n### Assistant: A2</s>",
    "internlm_chat": "<s><|System|>:S\n<|User|>:U1<eoh>\n<|Bot|>:A1<eoa>\n<|User|>:U2<eoh>\n<|Bot|>:A2<eoa>",
    "internlm2_chat": "<s>" + CHATML, "internlm2_5_chat": "<s>" + CHATML, "internlm3_chat": "<s>" + CHATML,
    "qwen_chat": CHATML, "qwen2_chat": CHATML, "chatml": CHATML, "yi_chat": CHATML,
    "llama2_chat": "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST] A2 </s>",
    "llama3_chat": LLAMA3, "llama3_1_chat": LLAMA3, "mistral": MISTRAL, "mixtral": MISTRAL,
    "chatglm3": GLM, "glm4_chat": GLM,
    "baichuan2_chat": "S<reserved_106>U1<reserved_107>A1</s><reserved_106>U2<reserved_107>A2</s>",
    "gemma": "<bos><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
             "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>",
    "phi3_chat": "<|system|>\nS<|end|>\n<|user|>\nU1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nU2<|end|>\n"
                 "<|assistant|>\nA2<|end|>",
    "deepseek_v2": "<｜begin▁of▁sentence｜>S\n\nUser: U1\n\nAssistant: A1<｜end▁of▁sentence｜>User: U2\n\n"
                   "Assistant: A2<｜end▁of▁sentence｜>",
    "zephyr": "<|system|>\nS</s>\n<|user|>\nU1</s>\n<|assistant|>\nA1</s>\n<|user|>\nU2</s>\n<|assistant|>\nA2</s>",
    "vicuna": "<s>S USER: U1 ASSISTANT: A1</s>USER: U2 ASSISTANT: A2</s>",
}
VARIANTS = [CHAT, CHAT[1:], CHAT[:4], CHAT[1:4],
            CHAT[1:3] + [{"role": "tool", "content": "T"}, {"role": "assistant", "content": "A3"}]]


def test_every_template_is_checked():
    assert set(EXPECTED) | {"hf"} == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_matches_the_published_format(name):
    template = get_template(name)
    assert template.render(CHAT) == EXPECTED[name]
    assert template.stop_words, "a template without stop words never stops generating"
    trained = "".join(text for text, flag in template.segments(CHAT) if flag)
    assert trained.startswith("A1") and "A2" in trained and "U2" not in trained and "S" not in trained


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_to_jinja_reproduces_render(name, tiny_tokenizer):
    template = get_template(name)
    tokenizer = tiny_tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = template.to_jinja()
    try:
        for messages in VARIANTS:
            for gen in (False, True):
                assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
                    template.render(messages, add_generation_prompt=gen), (messages, gen)
    finally:
        tokenizer.chat_template = saved


def test_generation_prompt_opens_the_reply():
    t = get_template("qwen_chat")
    prompt = t.render(CHAT[:4], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n")
    assert t.render(CHAT[:4]).endswith("U2<|im_end|>\n")


def test_cfg_system_default_comes_from_template_when_missing():
    vicuna = get_template("vicuna")
    assert vicuna.render(CHAT[1:3]).startswith("<s>A chat between a curious user")


def test_hf_template_follows_tokenizer_and_marks_assistant(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    with pytest.raises(TunelabError, match="chat_template"):
        get_template("hf", tokenizer)
    with pytest.raises(TunelabError, match="tokenizer"):
        get_template("hf")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    hf = get_template("hf", tokenizer)
    assert hf.render(CHAT) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert hf.render(CHAT[:4], add_generation_prompt=True) == \
        tokenizer.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    trained = [text for text, flag in hf.segments(CHAT) if flag]
    assert trained == ["A1<|im_end|>\n", "A2<|im_end|>\n"]
    assert "<|im_end|>" in hf.stop_words and hf.to_jinja() == tokenizer.chat_template


def test_unknown_template_lists_known_ones():
    with pytest.raises(TunelabError, match="qwen_chat"):
        get_template("qwen-chat")


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"]}, "internlm2_chat"),
    ({"model_type": "qwen2"}, "qwen_chat"),
    ({"model_type": "llama", "vocab_size": 128256}, "llama3_chat"),
    ({"model_type": "llama", "vocab_size": 32000}, "llama2_chat"),
    ({"model_type": "mistral"}, "mistral"),
    ({"model_type": "mixtral"}, "mixtral"),
    ({"model_type": "gemma2"}, "gemma"),
    ({"model_type": "phi3"}, "phi3_chat"),
    ({"model_type": "chatglm"}, "chatglm3"),
    ({"model_type": "glm4"}, "chatglm3"),
    ({"model_type": "deepseek_v2"}, "deepseek_v2"),
    ({"architectures": ["BaichuanForCausalLM"]}, "baichuan2_chat"),
    ({"model_type": "llama", "_name_or_path": "01-ai/Yi-6B-Chat"}, "yi_chat"),
    ({"model_type": "bert"}, None),
])
def test_guess_template(config, expected):
    assert guess_template(config) == expected


def test_guess_template_reads_a_model_dir(tiny_llama_dir, tiny_qwen2_dir):
    assert guess_template(tiny_llama_dir) == "llama2_chat"
    assert guess_template(str(tiny_qwen2_dir)) == "qwen_chat"


def test_guess_template_ignores_hints_in_the_users_own_folders(tmp_path):
    import json

    from tunelab.data.templates import guess_template

    model = tmp_path / "vicuna_experiments" / "runs" / "llama3-merged"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128256}))
    assert guess_template(model) == "llama3_chat"
    yi = tmp_path / "Yi-6B-Chat" / "merged"
    yi.mkdir(parents=True)
    (yi / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64000}))
    assert guess_template(yi) == "yi_chat"
