"""The export matrix: each family of docs/MODELS.md (and each built-in config's template), trained two steps through
the CLI with LoRA, QLoRA and full fine-tuning, then `convert pth_to_hf`, `convert merge` and `convert gguf`, each
output checked with the library that loads it: transformers (`from_pretrained`, `apply_chat_template`), peft
(`PeftModel.from_pretrained` on the adapter: the merged model's logits), `tunelab chat`, gguf's reader (the chat
template and stop tokens in the file and the Ollama Modelfile) and, where installed, llama.cpp (logits and greedy
tokens, and stopping at the template's end of turn)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.train_helpers import write_config
from tunelab.cli.main import main
from tunelab.data.templates import get_template
from tunelab.model.load import load_causal_lm
from tunelab.model.tokenizer import load_tokenizer

# tiny arch -> the template its chat models use (docs/MODELS.md; the built-in configs' five among them)
FAMILIES = {"llama": "llama3_chat", "qwen2": "qwen2_5_chat", "mistral": "mistral", "qwen3": "qwen3_chat",
            "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3_chat", "glm4": "glm4_chat",
            "internlm2": "internlm2_chat"}
CASES = [(arch, template, method) for arch, template in FAMILIES.items() for method in ("lora", "qlora", "full")]
CASES.append(("llama", "llama2_chat", "lora"))  # the llama2_7b configs' template
NO_GGUF = {"glm4"}  # refused with a message (tests/test_gguf.py)
CONVERSATION = [{"role": "user", "content": "Who are you?"}]


def _cli(*args) -> None:
    assert main([str(a) for a in args]) == 0, args


@pytest.fixture(scope="module")
def exported(tiny_model_factory, tmp_path_factory):
    """(arch, template, method) -> the run's folders: base, work, hf (pth_to_hf), final (merged, or hf for a full
    run), gguf. Each case runs once per module."""
    runs: dict[tuple, dict] = {}

    def run(arch: str, template: str, method: str) -> dict:
        if (arch, template, method) in runs:
            return runs[arch, template, method]
        base, root = tiny_model_factory(arch), tmp_path_factory.mktemp(f"{arch}_{template}_{method}")
        config = write_config(root, base, method=method, prompt_template=template, max_steps=2, dtype="fp32",
                              gradient_checkpointing=False, lr=5e-2)
        paths = dict(base=base, work=root / "work", hf=root / "hf", final=root / "hf", gguf=None)
        _cli("train", config, "--work-dir", paths["work"], "--device", "cpu")
        _cli("convert", "pth_to_hf", config, paths["work"], paths["hf"])
        if method != "full":
            paths["final"] = root / "merged"
            _cli("convert", "merge", base, paths["hf"], paths["final"], "--device", "cpu", "--dtype", "fp32")
        if arch not in NO_GGUF:
            paths["gguf"] = root / "gguf" / "m.gguf"
            _cli("convert", "gguf", paths["final"], paths["gguf"], "--type", "f32")
        runs[arch, template, method] = paths
        return paths

    return run


def _prompt_ids(base: Path, template_name: str) -> tuple[str, list[int]]:
    tokenizer = load_tokenizer(str(base))
    prompt = get_template(template_name, tokenizer).render(CONVERSATION, add_generation_prompt=True)
    return prompt, tokenizer(prompt, add_special_tokens=False).input_ids


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _stop_ids(base: Path, template_name: str) -> list[int]:
    tokenizer = load_tokenizer(str(base))
    vocab = tokenizer.get_vocab()
    return [vocab[w] for w in get_template(template_name, tokenizer).stop_words if w in vocab]


@pytest.mark.parametrize("arch,template_name,method", CASES, ids=["-".join(c) for c in CASES])
def test_every_export_loads_in_its_library_with_the_training_template(arch, template_name, method, exported,
                                                                      capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = exported(arch, template_name, method)
    base, final = paths["base"], paths["final"]
    template = get_template(template_name, load_tokenizer(str(base)))
    prompt, ids = _prompt_ids(base, template_name)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    if method != "full":  # merged = base + adapter, as peft computes it from the converted adapter
        from peft import PeftModel

        adapter_config = json.loads((paths["hf"] / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(base)
        with_adapter = PeftModel.from_pretrained(load_causal_lm(str(base), dtype=torch.float32, device="cpu"),
                                                 paths["hf"])
        torch.testing.assert_close(_logits(model, ids), _logits(with_adapter, ids), atol=1e-4, rtol=0)
    # transformers prompts and stops as training did: the training template, its end of turn in generation_config
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == prompt
    eos = model.generation_config.eos_token_id
    assert set(_stop_ids(base, template_name)) <= set(eos if isinstance(eos, list) else [eos])
    for target in dict.fromkeys((paths["work"], paths["hf"], final)):  # each output chats (full: hf is final)
        _cli("chat", target, "--prompt", "Who are you?", "--max-new-tokens", "4", "--device", "cpu")
    capsys.readouterr()
    if paths["gguf"] is None:
        return
    import gguf

    reader = gguf.GGUFReader(paths["gguf"])
    assert reader.fields["tokenizer.chat_template"].contents() == template.to_jinja()
    marks = {reader.fields[k].contents() for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
             if k in reader.fields}
    assert marks & set(_stop_ids(base, template_name))  # llama.cpp's end of a reply is the template's
    modelfile = (paths["gguf"].parent / "Modelfile").read_text()
    assert [line for line in modelfile.splitlines() if line.startswith("PARAMETER stop")] == \
        [f"PARAMETER stop {json.dumps(w, ensure_ascii=False)}" for w in template.stop_words]


@pytest.mark.slow
@pytest.mark.parametrize("arch,template_name,method", [c for c in CASES if c[0] not in NO_GGUF],
                         ids=["-".join(c) for c in CASES if c[0] not in NO_GGUF])
def test_llama_cpp_runs_every_gguf_as_transformers_runs_the_hf_model(arch, template_name, method, exported):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from transformers import AutoModelForCausalLM

    paths = exported(arch, template_name, method)
    prompt, ids = _prompt_ids(paths["base"], template_name)
    model = AutoModelForCausalLM.from_pretrained(paths["final"], dtype=torch.float32)
    # an f32 KV cache: llama.cpp's default f16 one alone is ~1e-3 off
    llm = llama_cpp.Llama(str(paths["gguf"]), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    ours, theirs = _logits(model, ids).numpy(), np.array(llm.scores[:len(ids)])
    # Gemma's GELU: ggml's CPU GELU reads an f16 table (GGML_GELU_FP16), ~1e-3 of the largest logit
    tolerance = 5e-3 if arch.startswith("gemma") else 1e-5
    assert np.abs(theirs - ours).max() <= tolerance * np.abs(ours).max()
    # greedy decoding: the same tokens, and llama.cpp ends a reply at each of the template's single-token stop words
    stop_ids = _stop_ids(paths["base"], template_name)
    vocab = llm._model.vocab
    assert stop_ids and all(llama_cpp.llama_vocab_is_eog(vocab, t) for t in stop_ids)
    ends = [*stop_ids, llm.token_eos()]  # llama.cpp also ends at the eos
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=ends,
                                  pad_token_id=ends[0])[0, len(ids):].tolist()
    llm.reset()
    got = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        got.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(got) == len(expected):
            break
    assert got == expected
