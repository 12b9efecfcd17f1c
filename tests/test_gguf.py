"""`tunelab convert gguf`: the file llama.cpp's own reader (gguf.GGUFReader) reads back holds every tensor of the model
(dequantised within its type's error), its hyperparameters, tokenizer and training chat template; the Ollama
Modelfile's TEMPLATE renders conversations as the training template does; and, where llama-cpp-python is installed,
llama.cpp computes the same logits as transformers and greedy decoding answers what `tunelab chat` answers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's GGUF reader/writer) is not installed")

from chat_helpers import ANSWER, QUESTION, make_lora_checkpoint, taught_model_dir  # noqa: E402
from go_template import render as render_go  # noqa: E402
from tunelab.data.templates import TEMPLATES, get_template  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402
from tunelab.export.gguf_convert import convert_to_gguf  # noqa: E402
from tunelab.model.load import load_model_for_inference  # noqa: E402
from tunelab.model.tokenizer import load_tokenizer  # noqa: E402

# tiny arch → (HF class, GGUF arch, the template its chat models use)
FAMILIES = {
    "llama": ("llama", "llama3_chat"), "mistral": ("llama", "mistral"), "internlm2": ("llama", "internlm2_chat"),
    "qwen2": ("qwen2", "qwen2_chat"), "qwen3": ("qwen3", "qwen_chat"), "phi3": ("phi3", "phi3_chat"),
    "gemma2": ("gemma2", "gemma"), "gemma3": ("gemma3", "gemma"),
}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you? Give three tips."}]


def _field(reader, key):
    field = reader.fields[key]
    return field.contents()


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    return params.get("full_attention", params)["rope_theta"]


def _hf_rows_of_llama_rope(gguf_rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's pairwise RoPE order: within each head, even rows are HF's first half, odd rows the second."""
    head = gguf_rows.shape[0] // n_heads
    out = np.empty_like(gguf_rows)
    for h in range(n_heads):
        block = gguf_rows[h * head:(h + 1) * head]
        out[h * head:h * head + head // 2] = block[0::2]
        out[h * head + head // 2:(h + 1) * head] = block[1::2]
    return out


def _convert(tmp_path, model_dir, arch, out_type="f16"):
    out = tmp_path / f"{arch}_{out_type}" / "model.gguf"
    convert_to_gguf(str(model_dir), str(out), out_type=out_type, prompt_template=FAMILIES[arch][1])
    return out


@pytest.mark.parametrize("arch,out_type", [(a, "f16") for a in FAMILIES] + [("llama", t) for t in ("bf16", "q8_0",
                                                                                                        "f32")])
def test_gguf_reads_back_with_every_tensor_the_hyperparameters_and_the_tokenizer(arch, out_type, tiny_model_factory,
                                                                                 tmp_path):
    model_dir = tiny_model_factory(arch)
    path = _convert(tmp_path, model_dir, arch, out_type)
    reader = gguf.GGUFReader(path)
    model, tokenizer = load_model_for_inference(str(model_dir), device="cpu", dtype="fp32")
    config = model.config
    gguf_arch = FAMILIES[arch][0]

    # hyperparameters, under llama.cpp's keys
    assert _field(reader, "general.architecture") == gguf_arch
    assert _field(reader, "general.name") == model_dir.name
    assert _field(reader, f"{gguf_arch}.block_count") == config.num_hidden_layers
    assert _field(reader, f"{gguf_arch}.embedding_length") == config.hidden_size
    assert _field(reader, f"{gguf_arch}.feed_forward_length") == config.intermediate_size
    assert _field(reader, f"{gguf_arch}.context_length") == config.max_position_embeddings
    assert _field(reader, f"{gguf_arch}.attention.head_count") == config.num_attention_heads
    assert _field(reader, f"{gguf_arch}.attention.head_count_kv") == config.num_key_value_heads
    assert _field(reader, f"{gguf_arch}.rope.freq_base") == pytest.approx(
        _rope_theta(config))
    assert _field(reader, f"{gguf_arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert _field(reader, f"{gguf_arch}.attention.key_length") == head_dim
    file_types = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
    assert _field(reader, "general.file_type") == file_types[out_type]

    # the tokenizer: every token at its id, special tokens as control tokens, merges, ids, the training template
    vocab = tokenizer.get_vocab()
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size
    internlm2 = arch == "internlm2"
    assert all(tokens[i] == t for t, i in vocab.items()) or internlm2  # sentencepiece spells pieces its own way
    if internlm2:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        assert tokens[:sp.get_piece_size()] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        assert _field(reader, "tokenizer.ggml.model") == "llama"
        assert len(_field(reader, "tokenizer.ggml.scores")) == config.vocab_size
    else:
        assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
        spec = json.loads((model_dir / "tokenizer.json").read_text())
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        assert _field(reader, "tokenizer.ggml.merges") == merges
    types = _field(reader, "tokenizer.ggml.token_type")
    for token in ("<|im_start|>", "<|im_end|>"):
        assert types[vocab[token]] == gguf.TokenType.CONTROL
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False  # templates spell the BOS out
    template = get_template(FAMILIES[arch][1], tokenizer)
    assert _field(reader, "tokenizer.chat_template") == template.to_jinja()

    # every tensor of the model, none left out, each with its values
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == gguf_arch),
                                     config.num_hidden_layers)
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    read = {t.name: t for t in reader.tensors}
    assert len(read) == len(state)
    for hf_name, expected in state.items():
        tensor = read[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape).astype(np.float32)
        if gguf_arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            values = _hf_rows_of_llama_rope(values, heads)
        if gguf_arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            values = values - 1  # llama.cpp's norm scales by w, Gemma's by 1 + w
        expected = expected.float().numpy()
        if expected.ndim == 1 or out_type == "f32":
            np.testing.assert_array_equal(values, expected, err_msg=hf_name)
        elif out_type == "q8_0":  # 8 bits a value and one f16 scale d = max|x| / 127 per 32 values: off by at
            # most half a step, plus 127 x the f16 rounding of d (2^-11 d)
            step = np.abs(expected).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert (np.abs(values - expected).reshape(-1, 32) <= step * (0.5 + 127 * 2 ** -11) + 1e-9).all(), hf_name
        else:
            np.testing.assert_allclose(values, expected, rtol=2 ** -7 if out_type == "bf16" else 2 ** -10,
                                       atol=1e-6, err_msg=hf_name)


ROPE_SCALINGS = {  # small original contexts, so the scaling changes the tiny model's frequencies
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512},
}


@pytest.fixture(scope="module")
def rope_models(tmp_path_factory):
    from tunelab.model.tiny import make_model

    return {name: make_model(tmp_path_factory.mktemp(f"rope_{name}"), "llama", rope_parameters=rope)
            for name, rope in ROPE_SCALINGS.items()}


def test_llama3_rope_scaling_travels_as_llama_cpp_frequency_factors(rope_models, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = tmp_path / "m.gguf"
    convert_to_gguf(str(rope_models["llama3"]), str(path), out_type="f32", prompt_template="qwen_chat")
    factors = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight").data
    model, _ = load_model_for_inference(str(rope_models["llama3"]), device="cpu", dtype="fp32")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config)  # transformers' own scaled frequencies
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    plain = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    np.testing.assert_allclose(factors, (plain / scaled.double()).numpy(), rtol=1e-5)  # llama.cpp divides by them
    assert factors.max() > 1  # the scaling really applies to the tiny model
    assert "llama.rope.scaling.type" not in gguf.GGUFReader(path).fields  # factors instead of a scaling kind


def test_base_plus_adapter_is_the_merged_model(tiny_llama_dir, tmp_path):
    from tunelab.export.convert import merge

    work_dir = tmp_path / "work"
    make_lora_checkpoint(tiny_llama_dir, work_dir)
    merge(str(tiny_llama_dir), str(work_dir), str(tmp_path / "merged"), dtype="fp32", device="cpu")
    convert_to_gguf(str(tmp_path / "merged"), str(tmp_path / "a" / "m.gguf"), out_type="f32")
    convert_to_gguf(str(tiny_llama_dir), str(tmp_path / "b" / "m.gguf"), out_type="f32", adapter=str(work_dir))
    merged, direct = gguf.GGUFReader(tmp_path / "a" / "m.gguf"), gguf.GGUFReader(tmp_path / "b" / "m.gguf")
    assert [t.name for t in merged.tensors] == [t.name for t in direct.tensors]
    for a, b in zip(merged.tensors, direct.tensors):
        np.testing.assert_allclose(a.data, b.data, atol=1e-6, err_msg=a.name)
    base = {t.name: t.data for t in gguf.GGUFReader(_convert(tmp_path, tiny_llama_dir, "llama", "f32")).tensors}
    adapted = {t.name for t in direct.tensors if not np.array_equal(t.data, base[t.name])}
    assert {"blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.1.ffn_down.weight"} <= adapted  # the adapter is in
    # the checkpoint's tunelab.json: template qwen_chat, system "Be brief." (the default when a chat brings none)
    template = replace(get_template("qwen_chat", load_tokenizer(str(tiny_llama_dir))), default_system="Be brief.")
    assert _field(direct, "tokenizer.chat_template") == template.to_jinja()
    assert 'SYSTEM """Be brief."""' in (tmp_path / "b" / "Modelfile").read_text()


def test_unsupported_architectures_and_bad_names_are_refused(tiny_model_factory, tmp_path):
    with pytest.raises(TunelabError, match="Glm4ForCausalLM: no GGUF export"):
        convert_to_gguf(str(tiny_model_factory("glm4")), str(tmp_path / "x.gguf"), prompt_template="glm4_chat")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(TunelabError, match="NAME.gguf"):
        convert_to_gguf(str(tiny_model_factory("llama")), str(tmp_path / "x.bin"))
    with pytest.raises(TunelabError, match="--type 'q4_k'"):
        convert_to_gguf(str(tiny_model_factory("llama")), str(tmp_path / "x.gguf"), out_type="q4_k")


# --- Ollama ---------------------------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2 {with braces} and \"quotes\", {{ go braces }}"}],
    [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "calling"},
     {"role": "tool", "content": "{\"temp\": 21}"}],
]


# Templates that do more than wrap each message's text, so no Ollama TEMPLATE is written for them: Mistral v3 /
# Tekken put the system prompt in the last user turn and number tool calls; Llama 2 writes a system prompt before a
# first assistant message without its [INST] (no pair of roles tells that apart). Llama 3.1 / 3.2's dated system
# block is fixed text before the first message, and their tool results are JSON strings (`printf "%q"`): they get one.
NO_OLLAMA_TEMPLATE = {"mistral_v3", "mistral_tekken", "llama2_chat"}
TRIMMING = {"gemma", "gemma3", "llama3_chat", "llama3_1_chat", "llama3_2_chat"}  # `| trim` on each message's text


@pytest.mark.parametrize("name", ["llama3_1_chat", "llama3_2_chat"])
def test_llama3_1_modelfile_writes_the_dated_system_block_and_quotes_tool_results(name, tiny_tokenizer):
    """Ollama before 0.30 never runs the GGUF's Jinja template (it picks the nearest of its own by edit distance,
    else the bare prompt), so Llama 3.1 -- the model of Unsloth's notebooks -- needs a TEMPLATE: the vendor's dated
    system block before the first message, and tool results written as JSON strings, as the training template
    writes them."""
    from tunelab.export.ollama import modelfile_text

    template = get_template(name, tiny_tokenizer)
    text = modelfile_text("m.gguf", template)
    assert 'TEMPLATE """' in text, text
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "Cutting Knowledge Date: December 2023" in go and 'printf "%q" .Content' in go
    for messages in ([{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "S"}, {"role": "user", "content": "weather?"},
                      {"role": "assistant", "content": "calling"},
                      {"role": "tool", "content": '{"temp": 21, "note": "a \\ b\n<ok> & é"}'}]):
        expected = template.render(messages, add_generation_prompt=True)
        data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
        assert render_go(go, data) == expected


@pytest.mark.parametrize("name", ["qwen2_5_chat", "qwen3_chat", "llama3_1_chat", "llama3_2_chat"])
def test_ollama_prompts_a_tool_model_with_the_gguf_template_which_is_the_training_one(name, tiny_tokenizer):
    """Ollama 0.30 and later (`shouldPreferChatTemplate`, server/images.go) prompt with the GGUF's Jinja template
    instead of the Modelfile's TEMPLATE when the Jinja one has a capability the TEMPLATE lacks: tools, when it
    mentions 'tools' or 'tool_call'. The GGUF holds the training template, so a tool-calling model meets its training
    format in Ollama as long as the TEMPLATE names no tools (one that did would win, with its keys sorted by Go)."""
    from tunelab.export.ollama import modelfile_text

    template = get_template(name, tiny_tokenizer)
    jinja = template.to_jinja()  # what convert gguf writes as tokenizer.chat_template
    assert "tools" in jinja or "tool_call" in jinja
    text = modelfile_text("m.gguf", template)
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0] if 'TEMPLATE """' in text else ""
    assert ".Tools" not in go and ".ToolCalls" not in go


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"hf"}))  # 'hf': the tokenizer's own, kept in the GGUF
def test_modelfile_template_renders_conversations_like_the_training_template(name, tiny_tokenizer):
    """What Ollama does with the Modelfile: SYSTEM becomes the first message when a chat has none, then TEMPLATE
    renders .Messages; the result must be the training template's prompt, the same text."""
    from tunelab.export.ollama import check_table, go_template, modelfile_text, turn_table

    template = get_template(name, tiny_tokenizer)
    text = modelfile_text("m.gguf", template, system="")
    assert "FROM ./m.gguf" in text
    assert [line for line in text.splitlines() if line.startswith("PARAMETER stop")] == \
        [f"PARAMETER stop {json.dumps(w, ensure_ascii=False)}" for w in template.stop_words]
    if template.default_system:
        assert f'SYSTEM """{template.default_system}"""' in text
    if name in NO_OLLAMA_TEMPLATE:
        assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and "# no TEMPLATE" in text
        return
    table = turn_table(template)
    assert check_table(table, template) == ("trims" if name in TRIMMING else "exact")
    go = go_template(table)
    assert f'TEMPLATE """{go}"""' in text
    for messages in CONVERSATIONS:
        try:
            expected = template.render(messages, add_generation_prompt=True)
        except TunelabError:
            continue  # e.g. a tool result in a template without tools
        sent = messages
        if messages[0]["role"] != "system" and template.default_system:  # Ollama adds the Modelfile's SYSTEM
            sent = [{"role": "system", "content": template.default_system}] + messages
        data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in sent]}
        assert render_go(go, data) == expected, (name, messages)
    # a chat ending with the assistant's words is left open for the model to continue (Ollama's convention)
    messages = CONVERSATIONS[2][:3]
    assert render_go(go, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}).endswith("A1")


# Orders of roles a chat may bring that the TEMPLATE once dropped the turn markers of (two user turns rendered as one)
ROLE_ORDERS = [("user", "user"), ("assistant", "user"), ("user", "assistant", "tool", "user"), ("system", "assistant",
               "user"), ("user", "assistant", "assistant", "user"), ("tool", "user"), ("system", "user", "user"),
               ("user", "assistant", "tool", "tool", "assistant", "user", "user")]


@pytest.mark.parametrize("name", ["qwen2_5_chat", "llama3_chat", "internlm2_chat", "qwen3_chat", "gemma", "mistral"])
@pytest.mark.parametrize("roles", ROLE_ORDERS, ids="-".join)
def test_modelfile_template_keeps_the_turn_markers_of_every_order_of_roles(name, roles, tiny_tokenizer):
    from tunelab.export.ollama import modelfile_text

    template = get_template(name, tiny_tokenizer)
    text = modelfile_text("m.gguf", template)
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    messages = [{"role": r, "content": f"{r} message {i}"} for i, r in enumerate(roles)]
    try:
        expected = template.render(messages, add_generation_prompt=True)
    except TunelabError:
        pytest.skip(f"{name} refuses this order of roles")
    sent = messages
    if messages[0]["role"] != "system" and template.default_system:
        sent = [{"role": "system", "content": template.default_system}] + messages
    if name in ("gemma", "mistral") and roles[:2] == ("system", "assistant"):
        # their templates drop a system prompt that no user turn follows (it goes into the first user turn); the
        # TEMPLATE keeps it, and writes the rest as the training template does
        assert "system message 0" not in expected
        kept = render_go(go, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in sent]})
        assert "system message 0" in kept
        sent = sent[1:]
    assert render_go(go, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in sent]}) == expected


def test_convert_gguf_cli_writes_the_file_and_the_modelfile(tmp_path_factory, tmp_path):
    from tunelab.cli.main import main

    model = taught_model_dir(tmp_path_factory)
    assert main(["convert", "gguf", str(model), str(tmp_path / "out" / "tuned.gguf"), "--type", "q8_0"]) == 0
    assert gguf.GGUFReader(tmp_path / "out" / "tuned.gguf").fields["general.file_type"].contents() == 7
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.splitlines()[1] == "FROM ./tuned.gguf" and 'PARAMETER stop "<|im_end|>"' in modelfile


# --- llama.cpp itself (llama-cpp-python compiles llama.cpp when installed: scripts/test.sh) ---------------------------

def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/test.sh builds "
                                                   "it: llama.cpp's library, ~3 min on 2 cores)")


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_llama_cpp_computes_the_logits_transformers_computes(arch, tiny_model_factory, tmp_path):
    llama_cpp = _llama_cpp()
    model_dir = tiny_model_factory(arch)
    path = _convert(tmp_path, model_dir, arch, "f32")
    model, tokenizer = load_model_for_inference(str(model_dir), device="cpu", dtype="fp32")
    prompt = get_template(FAMILIES[arch][1], tokenizer).render(CONVERSATION, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False)
    if arch != "phi3":  # Phi-3's published tokenizer strips whitespace after its markers (llama.cpp does too);
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids  # the tiny one does not
    llm.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.array(llm.scores[:len(ids)]), expected, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
def test_llama_cpp_computes_the_logits_of_scaled_rope(scaling, rope_models, tmp_path):
    llama_cpp = _llama_cpp()
    path = tmp_path / "m.gguf"
    convert_to_gguf(str(rope_models[scaling]), str(path), out_type="f32", prompt_template="qwen_chat")
    model, tokenizer = load_model_for_inference(str(rope_models[scaling]), device="cpu", dtype="fp32")
    ids = tokenizer("Hello there, who are you? " * 20, add_special_tokens=False).input_ids  # past 64 positions
    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False)
    llm.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.array(llm.scores[:len(ids)]), expected, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_llama_cpp_answers_what_tunelab_chat_answers(out_type, tmp_path_factory, tmp_path):
    llama_cpp = _llama_cpp()
    from tunelab.chat.engine import load_chat_model
    from tunelab.model.generate import GenerationSettings

    model_dir = taught_model_dir(tmp_path_factory)
    chat = load_chat_model(str(model_dir), system="")
    ours = chat.reply([{"role": "user", "content": QUESTION}], GenerationSettings(max_new_tokens=24))
    assert ours == ANSWER
    path = tmp_path / "taught.gguf"
    convert_to_gguf(str(model_dir), str(path), out_type=out_type)
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
    # the chat template inside the GGUF file formats the conversation; llama.cpp stops at <|im_end|> by itself
    reply = llm.create_chat_completion([{"role": "user", "content": QUESTION}], temperature=0.0, max_tokens=24)
    assert reply["choices"][0]["message"]["content"] == ours


def test_pre_tokenizer_names_of_published_tokenizers():
    """tokenizer.json pre-tokenizers as Qwen2.5 and Llama 3 publish them (the "pre_tokenizer" section of their
    tokenizer.json files), GPT-2's plain ByteLevel, and one llama.cpp splits another way (refused)."""
    from tunelab.export.gguf_vocab import pre_tokenizer_name

    def split(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}}

    qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    llama3 = qwen2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
    assert pre_tokenizer_name(split(qwen2), Path("qwen")) == "qwen2"
    assert pre_tokenizer_name(split(llama3), Path("llama3")) == "llama-bpe"
    gpt2 = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}}
    assert pre_tokenizer_name(gpt2, Path("gpt2")) == "gpt-2"
    with pytest.raises(TunelabError, match="pre-tokenizer llama.cpp may split differently"):
        pre_tokenizer_name(split(r"\p{N}{1,4}| ?\p{L}+"), Path("other"))


# --- what MODEL may be: a work dir or checkpoint, as `tunelab chat` takes it ----------------------------------------

def _full_run(model_dir: Path, work: Path, *, step: int = 5) -> Path:
    """WORK_DIR/iter_N/{model/, tunelab.json} of a full fine-tuning run (tunelab.json beside model/, not in it)."""
    import shutil

    ckpt = work / f"iter_{step}"
    shutil.copytree(model_dir, ckpt / "model", ignore=shutil.ignore_patterns("tunelab.json"))
    (ckpt / "tunelab.json").write_text((model_dir / "tunelab.json").read_text())
    (work / "last_checkpoint").write_text(ckpt.name)
    return ckpt


@pytest.mark.parametrize("given", ["work", "work/iter_5", "work/iter_5/model"])
def test_a_full_runs_work_dir_or_checkpoint_converts_with_its_chat_template(given, tmp_path_factory, tmp_path):
    model = taught_model_dir(tmp_path_factory)
    _full_run(model, tmp_path / "work")
    out = convert_to_gguf(str(tmp_path / given), str(tmp_path / "out" / "run.gguf"), out_type="f32")
    reader = gguf.GGUFReader(out)
    template = get_template("qwen_chat", load_tokenizer(str(model)))
    assert _field(reader, "tokenizer.chat_template") == template.to_jinja()  # from iter_5/tunelab.json
    assert "TEMPLATE" in (tmp_path / "out" / "Modelfile").read_text()
    direct = gguf.GGUFReader(convert_to_gguf(str(model), str(tmp_path / "direct" / "m.gguf"), out_type="f32"))
    for a, b in zip(reader.tensors, direct.tensors, strict=True):
        np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)


@pytest.mark.parametrize("given", ["work", "work/iter_10"])
def test_a_lora_runs_work_dir_converts_as_its_base_with_the_adapter_merged(given, tiny_llama_dir, tmp_path, capsys):
    from tunelab.cli.main import main

    make_lora_checkpoint(tiny_llama_dir, tmp_path / "work")
    assert main(["convert", "gguf", str(tmp_path / given), str(tmp_path / "a" / "m.gguf"), "--type", "f32"]) == 0
    convert_to_gguf(str(tiny_llama_dir), str(tmp_path / "b" / "m.gguf"), out_type="f32", adapter=str(tmp_path / "work"))
    from_work, base_plus = gguf.GGUFReader(tmp_path / "a" / "m.gguf"), gguf.GGUFReader(tmp_path / "b" / "m.gguf")
    for a, b in zip(from_work.tensors, base_plus.tensors, strict=True):
        np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)
    assert _field(from_work, "tokenizer.chat_template") == _field(base_plus, "tokenizer.chat_template")
    assert _field(from_work, "general.name") == "work"
    assert 'SYSTEM """Be brief."""' in (tmp_path / "a" / "Modelfile").read_text()
    with pytest.raises(TunelabError, match="already a checkpoint"):
        convert_to_gguf(str(tmp_path / given), str(tmp_path / "c" / "m.gguf"), adapter=str(tmp_path / "work"))


def test_a_sentencepiece_model_trained_converted_and_merged_exports_to_gguf(tiny_model_factory, tmp_path):
    """README's path on InternLM2 (a sentencepiece tokenizer): train -> pth_to_hf -> merge -> gguf. Each step saves the
    tokenizer, and the GGUF's vocabulary (pieces and scores) comes from the base's tokenizer.model, carried along."""
    from train_helpers import write_config

    from tunelab.cli.main import main

    base = tiny_model_factory("internlm2")
    config = write_config(tmp_path, base, prompt_template="internlm2_chat", max_steps=1)
    work = tmp_path / "work"
    assert main(["train", str(config), "--work-dir", str(work), "--device", "cpu"]) == 0
    assert main(["convert", "pth_to_hf", str(config), str(work), str(tmp_path / "adapter")]) == 0
    assert main(["convert", "merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged"),
                 "--device", "cpu"]) == 0
    for source in ("merged", "adapter", "work"):  # as README, as base + --adapter, as a work dir
        model, adapter = (str(base), str(tmp_path / source)) if source == "adapter" else (str(tmp_path / source), None)
        out = convert_to_gguf(model, str(tmp_path / f"gguf_{source}" / "m.gguf"), adapter=adapter)
        assert _field(gguf.GGUFReader(out), "tokenizer.ggml.model") == "llama", source


def test_a_run_on_a_base_saved_in_4_bits_exports_to_gguf(tiny_bnb_4bit_dir, tmp_path):
    """Unsloth's `unsloth/...-bnb-4bit` bases train with QLoRA as they are; `convert gguf WORK_DIR` (its
    save_pretrained_gguf) then writes plain weights -- the 4-bit values dequantised, the adapter merged -- not
    bitsandbytes' packed tensors and their absmax, which GGUF has no place for."""
    from train_helpers import write_config

    from tunelab.cli.main import main

    config = write_config(tmp_path, tiny_bnb_4bit_dir, method="qlora", prompt_template="llama3_1_chat", max_steps=1)
    assert main(["train", str(config), "--work-dir", str(tmp_path / "work"), "--device", "cpu"]) == 0
    out = tmp_path / "out" / "model.gguf"
    assert main(["convert", "gguf", str(tmp_path / "work"), str(out), "--type", "f32"]) == 0
    reader = gguf.GGUFReader(out)
    names = [t.name for t in reader.tensors]
    assert "blk.0.attn_q.weight" in names and not any("absmax" in n or "quant" in n for n in names)
    assert 'TEMPLATE """' in (tmp_path / "out" / "Modelfile").read_text()
