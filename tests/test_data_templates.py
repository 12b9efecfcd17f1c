"""Chat templates: the exported chat_template, token ids at piece joins, 'hf', and guessing from a model.
(Each built-in template against its vendor's published one: test_template_vendors.py.)"""

from __future__ import annotations

import json

import pytest

from tunelab.data.encode import IGNORE_INDEX, encode_batch
from tunelab.data.templates import TEMPLATES, get_template, guess_template, tool_support
from tunelab.errors import TunelabError

CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2\n\n第二行"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up",
                                           "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}]
TOOL_CHAT = [{"role": "user", "content": "Define cat"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "lookup", "arguments": {"word": "cat"}}}]},
             {"role": "tool", "content": "a small animal"}, {"role": "assistant", "content": "A cat is an animal."}]
VARIANTS = [CHAT, CHAT[1:], CHAT[:4], CHAT[1:4]]
# a free-form (custom) tool beside a function, as InternLM2's code interpreter is written (templates whose
# tool_support lists it): its description, a call whose input is code, its output answered by id
FREE_FORM_TOOLS = [{"type": "custom", "custom": {"name": "interpreter", "description": "Run Python in a notebook."}},
                   *TOOLS]
FREE_FORM_CHAT = [{"role": "user", "content": "2**10?"},
                  {"role": "assistant", "content": "Let me run it.", "tool_calls": [
                      {"id": "c1", "type": "custom", "custom": {"name": "interpreter",
                                                                "input": "```python\nprint(2**10)\n```"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "1024"},
                  {"role": "assistant", "content": "It is 1024."}]
NO_TOOLS = {"llama2_chat", "llama3_chat", "mistral", "mixtral", "mistral_v1", "gemma", "gemma3", "yi_chat", "zephyr",
            "chatglm3", "baichuan2_chat", "internlm_chat", "vicuna", "default", "deepseek_v2", "deepseek_v3",
            "deepseek_v3_chat", "deepseek_r1", "chatml", "qwen_chat", "qwen2_chat", "qwen1_5_chat", "phi3_chat"}

# Every special token the built-in templates write, so each renders into real token ids.
TEMPLATE_TOKENS = [
    "<|startoftext|>", "<|python_tag|>", "<|eom_id|>", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "<think>", "</think>", "<tool_response>", "</tool_response>", "<|tool|>",
    "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<｜User｜>", "<｜Assistant｜>", "<eoh>", "<eoa>", "<|User|>",
    "<|Bot|>", "<|System|>",
]


def test_every_template_has_stop_words_and_a_vendor(tiny_tokenizer):
    for name in TEMPLATES:
        if name != "hf":  # as training and chat get it: with the model's tokenizer (fewshot's stop word is its EOS)
            template = get_template(name, tiny_tokenizer)
            assert template.stop_words and template.vendor, name


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"hf"}))
def test_exported_chat_template_renders_what_training_renders(name, tiny_tokenizer):
    """transformers' own apply_chat_template, given to_jinja(), renders exactly render()."""
    template = get_template(name, tiny_tokenizer)  # as training and export get it (fewshot writes the tokenizer's EOS)
    tokenizer = tiny_tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = template.to_jinja()
    try:
        cases = [(m, None) for m in VARIANTS] + ([] if name in NO_TOOLS else [(TOOL_CHAT, TOOLS), (TOOL_CHAT[:3], TOOLS)])
        if tool_support(template).free_form:
            cases += [(FREE_FORM_CHAT, FREE_FORM_TOOLS), (FREE_FORM_CHAT[:3], FREE_FORM_TOOLS)]
        for messages, tools in cases:
            for gen in (False, True):
                assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen,
                                                     date_string="26 Jul 2024") == \
                    template.render(messages, tools=tools, add_generation_prompt=gen), (messages, gen)
    finally:
        tokenizer.chat_template = saved


def test_export_uses_the_training_system_prompt():
    import dataclasses

    template = dataclasses.replace(get_template("qwen2_5_chat"), default_system="Be a pirate.")
    assert template.render(CHAT[1:3]).startswith("<|im_start|>system\nBe a pirate.<|im_end|>")
    assert 'set default_system = "Be a pirate."' in template.to_jinja()


def test_reply_marked_not_trained_stays_context():
    messages = [CHAT[1], {**CHAT[2], "train": False}, *CHAT[3:]]
    trained = [t for t, flag in get_template("llama3_chat").segments(messages) if flag]
    assert trained == ["A2\n\n第二行<|eot_id|>"]


@pytest.fixture(scope="module")
def template_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": TEMPLATE_TOKENS})
    return tokenizer


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """A Llama-2-style tokenizer (sentencepiece's leading '▁', BOS/EOS and [INST] as special tokens): tokenising the
    pieces of a conversation separately gives other ids at their joins than tokenising the whole text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab.model.tiny import _CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    special = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                                             show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=special[3:])


@pytest.mark.parametrize("name", ["qwen2_5_chat", "qwen3_chat", "llama3_1_chat", "mistral_v3", "mistral_tekken",
                                  "glm4_chat", "internlm2_chat", "phi4_mini", "gemma", "deepseek_r1", "llama2_chat"])
def test_trained_ids_are_the_tokenizers_ids_of_the_whole_text(name, template_tokenizer):
    template = get_template(name)
    tools = None if name in NO_TOOLS else TOOLS
    messages = CHAT[1:] if tools is None else TOOL_CHAT
    _check_ids(template, template_tokenizer, messages, tools)


@pytest.mark.parametrize("name", ["mistral_tekken", "llama2_chat", "mistral", "mistral_v3"])
def test_ids_at_piece_joins_with_a_sentencepiece_tokenizer(name, sentencepiece_tokenizer):
    template = get_template(name)
    chat = [*CHAT[:4], {"role": "assistant", "content": "Hello, how can I help you today?"}]  # in its small vocab
    if name == "mistral_tekken":  # "[/INST]A1": alone, the piece "A1" would get a leading "▁"
        pieces = [i for text, _ in template.segments(chat)
                  for i in sentencepiece_tokenizer(text, add_special_tokens=False)["input_ids"]]
        whole = sentencepiece_tokenizer(template.render(chat), add_special_tokens=False)["input_ids"]
        assert pieces != whole, "this tokenizer should show the join problem the encoder avoids"
    _check_ids(template, sentencepiece_tokenizer, chat, None)


def test_fewshot_trains_each_reply_and_the_eos_after_the_last_as_llama_factory(sentencepiece_tokenizer):
    """LLaMA-Factory's fewshot (efficient_eos): the system prompt and each message as they are, a reply followed by
    "\\n\\n", the tokenizer's EOS after the last one; each message tokenised alone as its `_encode` does, and trained:
    the replies with their "\\n\\n", and that EOS."""
    tokenizer = sentencepiece_tokenizer
    system, q1, a1, q2, a2 = ("You are a helpful assistant.", "Who are you?", "I am an AI assistant.",
                              "What is the capital of China?", "Beijing is the capital.")
    chat = [{"role": "system", "content": system}, {"role": "user", "content": q1},
            {"role": "assistant", "content": a1}, {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    template = get_template("fewshot", tokenizer)
    assert template.render(chat) == system + q1 + a1 + "\n\n" + q2 + a2 + "\n\n</s>"
    assert template.render(chat[:4], add_generation_prompt=True) == system + q1 + a1 + "\n\n" + q2
    assert template.stop_words == ("</s>",) and 'set eos_token = "</s>"' in template.to_jinja()
    # LLaMA-Factory's row by hand (SupervisedDatasetProcessor._encode_data_example with efficient_eos)
    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    source1, target1, source2, target2 = enc(system) + enc(q1), enc(a1 + "\n\n"), enc(q2), enc(a2 + "\n\n")
    labels = [IGNORE_INDEX] * len(source1) + target1 + [eos] + [IGNORE_INDEX] * (len(source2) - 1) + target2 + [eos]
    row = encode_batch(template, tokenizer, [{"messages": chat}], 4096, "assistant")[0][0].row
    assert row["input_ids"] == source1 + target1 + source2 + target2 + [eos]
    # the same labels but one: LLaMA-Factory also trains an EOS after the first reply, as the label of the next
    # question's first token, which the text does not hold there; tunelab trains only the tokens of the text
    labels[len(source1) + len(target1)] = IGNORE_INDEX
    assert row["labels"] == labels
    assert tokenizer(template.render(chat), add_special_tokens=False)["input_ids"] != row["input_ids"]  # kept apart


def _check_ids(template, tokenizer, messages, tools):
    row = encode_batch(template, tokenizer, [{"messages": messages, **({"tools": tools} if tools else {})}],
                       4096, "assistant")[0][0].row
    text = template.render(messages, tools=tools)
    assert row["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    trained_text = "".join(t for t, flag in template.segments(messages, tools=tools) if flag)
    labelled = [i for i in row["labels"] if i != IGNORE_INDEX]
    decoded = tokenizer.decode(labelled, skip_special_tokens=False).replace(" ", "")
    assert decoded == trained_text.replace(" ", ""), (decoded, trained_text)


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
    # the end-of-turn token is trained; the '\n' written after it is the next turn's prompt, as in the built-ins
    assert [text for text, flag in hf.segments(CHAT) if flag] == ["A1<|im_end|>", "A2\n\n第二行<|im_end|>"]
    assert "<|im_end|>" in hf.stop_words and hf.to_jinja() == tokenizer.chat_template


def test_hf_template_uses_generation_marks(tiny_tokenizer_dir):
    """A chat_template with {% generation %} (transformers' assistant mask) says itself what is trained."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
        "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}")
    hf = get_template("hf", tokenizer)
    assert "".join(t for t, _ in hf.segments(CHAT)) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert [t for t, flag in hf.segments(CHAT) if flag] == ["A1<|im_end|>", "A2\n\n第二行<|im_end|>"]


def test_hf_template_that_rewrites_earlier_turns_is_refused_clearly(tiny_tokenizer_dir):
    """Qwen3's template drops reasoning from earlier replies, so diffing growing prefixes cannot find the replies."""
    from pathlib import Path

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = (Path(__file__).with_name("vendor_templates") / "qwen3.jinja").read_text()
    hf = get_template("hf", tokenizer)
    with pytest.raises(TunelabError, match="built-in template"):
        hf.segments(CHAT)


def test_hf_template_that_refuses_a_system_prompt(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """Gemma-2's own chat_template raises 'System role not supported'. With prompt_template = 'hf', data without a
    system prompt trains (the data cache's probe conversation, which has one, is rendered without it), and SYSTEM
    (or a record's system message) stops with the template's reason and the fix."""
    import json
    from pathlib import Path

    from tunelab.config.schema import TrainConfig
    from tunelab.data.dataset import build_datasets
    from tunelab.model.tokenizer import load_tokenizer

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    tokenizer.chat_template = (Path(__file__).with_name("vendor_templates") / "gemma.jinja").read_text()
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "Hi?", "output": "Hello."}] * 2))
    cfg = TrainConfig(data_path=str(tmp_path / "d.json"), prompt_template="hf", max_length=256)
    bundle = build_datasets(cfg, tokenizer, log=lambda m: None)
    assert bundle.stats.samples == 2
    with pytest.raises(TunelabError, match=r"prompt_template='hf': the tokenizer's chat_template refuses this "
                                           r"conversation \(System role not supported\).*remove SYSTEM"):
        build_datasets(TrainConfig(**{**vars(cfg), "SYSTEM": "Be brief."}), tokenizer, log=lambda m: None)
    # a refusal of a conversation without a system prompt does not blame one
    with pytest.raises(TunelabError, match=r"\(Conversation roles must alternate.*\)\. Fix the conversation") as info:
        get_template("hf", tokenizer).render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert "SYSTEM" not in str(info.value)
    # in training data, the refused record is named by how it starts (a search finds it)
    (tmp_path / "two.json").write_text(json.dumps([{"messages": [
        {"role": "user", "content": "First question, asked twice"}, {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"}]}]))
    with pytest.raises(TunelabError, match=r"^the sample whose first message starts 'First question, asked twice': "
                                           r".*Conversation roles must alternate"):
        build_datasets(TrainConfig(**{**vars(cfg), "data_path": str(tmp_path / "two.json")}), tokenizer,
                       log=lambda m: None)


def test_unknown_template_lists_known_ones():
    with pytest.raises(TunelabError, match="qwen2_5_chat"):
        get_template("qwen-chat")


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"]}, "internlm2_chat"),
    ({"model_type": "qwen2", "_name_or_path": "Qwen/Qwen2.5-7B-Instruct"}, "qwen2_5_chat"),
    ({"model_type": "qwen2", "_name_or_path": "Qwen/Qwen2-7B-Instruct"}, "qwen2_chat"),
    ({"model_type": "qwen3"}, "qwen3_chat"),
    ({"model_type": "llama", "vocab_size": 128256}, "llama3_chat"),
    ({"model_type": "llama", "vocab_size": 128256, "_name_or_path": "meta-llama/Llama-3.1-8B-Instruct"},
     "llama3_1_chat"),
    ({"model_type": "llama", "_name_or_path": "meta-llama/Llama-3.2-3B-Instruct"}, "llama3_2_chat"),
    ({"model_type": "llama", "vocab_size": 32000}, "llama2_chat"),
    ({"model_type": "mistral"}, "mistral"),
    ({"model_type": "mistral", "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.3"}, "mistral_v3"),
    ({"model_type": "mistral", "_name_or_path": "mistralai/Mistral-Nemo-Instruct-2407"}, "mistral_tekken"),
    ({"model_type": "mixtral"}, "mistral"),
    ({"model_type": "gemma2"}, "gemma"),
    ({"model_type": "phi3"}, "phi3_chat"),
    ({"model_type": "phi3", "_name_or_path": "microsoft/Phi-4-mini-instruct"}, "phi4_mini"),
    ({"model_type": "chatglm"}, "chatglm3"),
    ({"model_type": "chatglm", "_name_or_path": "THUDM/glm-4-9b-chat"}, "glm4_chat"),
    ({"model_type": "glm4"}, "glm4_chat"),
    ({"model_type": "deepseek_v2"}, "deepseek_v2"),
    ({"model_type": "deepseek_v3"}, "deepseek_v3"),
    ({"model_type": "deepseek_v3", "_name_or_path": "deepseek-ai/DeepSeek-R1"}, "deepseek_r1"),
    ({"architectures": ["BaichuanForCausalLM"]}, "baichuan2_chat"),
    ({"model_type": "llama", "_name_or_path": "01-ai/Yi-6B-Chat"}, "yi_chat"),
    ({"model_type": "bert"}, None),
])
def test_guess_template(config, expected):
    assert guess_template(config) == expected


def test_guess_template_reads_a_model_dir(tiny_llama_dir, tiny_qwen2_dir):
    assert guess_template(tiny_llama_dir) == "llama2_chat"
    assert guess_template(str(tiny_qwen2_dir)) == "qwen2_chat"


def test_guess_prefers_the_tokenizers_template_when_the_version_is_unknown(tmp_path):
    """A Qwen2-architecture model of unknown version that ships a chat_template: 'hf' beats a guessed version."""
    model = tmp_path / "my-finetune"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert guess_template(model) == "qwen2_chat"
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert guess_template(model) == "hf"
    (model / "config.json").write_text(json.dumps({"model_type": "newfamily"}))
    assert guess_template(model) == "hf"


def test_guess_template_ignores_hints_in_the_users_own_folders(tmp_path):
    model = tmp_path / "vicuna_experiments" / "runs" / "llama3-merged"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128256}))
    assert guess_template(model) == "llama3_chat"
    yi = tmp_path / "Yi-6B-Chat" / "merged"
    yi.mkdir(parents=True)
    (yi / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64000}))
    assert guess_template(yi) == "yi_chat"


def test_the_templates_table_of_docs_data_md_names_every_template_and_alias():
    """docs/DATA.md's table of templates lists each name get_template takes (other names in brackets), no more."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "DATA.md").read_text(encoding="utf-8")
    table = text.split("| name (other names) |", 1)[1].split("\n\n", 1)[0]
    first_cells = [line.split("|")[1] for line in table.splitlines()[2:] if line.startswith("|")]
    listed = {name for cell in first_cells for name in re.findall(r"`([\w.]+)`", cell)}
    assert listed == set(TEMPLATES)
