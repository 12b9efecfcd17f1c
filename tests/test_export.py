"""`tunelab convert pth_to_hf` and `convert merge`: the files other tools load give the same model as training did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chat_helpers import TEMPLATE, logits, make_lora_checkpoint
from tunelab.chat.engine import load_chat_model
from tunelab.cli.main import main
from tunelab.errors import TunelabError

TEXT = "Hello! I am an AI assistant. Who are you?"


@pytest.fixture(scope="module")
def lora_work_dir(tiny_llama_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    make_lora_checkpoint(tiny_llama_dir, work, step=5, seed=1)
    make_lora_checkpoint(tiny_llama_dir, work, step=10, seed=2)  # the last checkpoint
    return work


def _ids(tokenizer_dir):
    from tunelab.model.tokenizer import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))(TEXT, add_special_tokens=False).input_ids


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _peft_logits(base_dir, adapter_dir, ids):
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(_base(base_dir), str(adapter_dir)).eval(), ids)


def test_pth_to_hf_adapter_loads_with_peft_and_matches_checkpoint(tiny_llama_dir, lora_work_dir, tmp_path):
    out = tmp_path / "hf_adapter"
    # WORK_DIR → last_checkpoint → iter_10
    assert main(["convert", "to-hf", str(lora_work_dir), str(out), "--fp32"]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file()
    meta = json.loads((out / "tunelab.json").read_text())
    assert meta["prompt_template"] == TEMPLATE and meta["method"] == "lora"
    ids = _ids(tiny_llama_dir)
    converted = _peft_logits(tiny_llama_dir, out, ids)
    last = _peft_logits(tiny_llama_dir, lora_work_dir / "iter_10" / "model", ids)
    first = _peft_logits(tiny_llama_dir, lora_work_dir / "iter_5" / "model", ids)
    assert torch.allclose(converted, last, atol=1e-5)
    assert not torch.allclose(converted, first, atol=1e-3)  # it really is the last checkpoint
    assert not torch.allclose(converted, logits(_base(tiny_llama_dir), ids), atol=1e-3)  # the adapter matters


def test_pth_to_hf_default_bf16_and_xtuner_verb(tiny_llama_dir, lora_work_dir, tmp_path):
    from safetensors import safe_open

    config = tmp_path / "cfg.py"
    config.write_text(f"pretrained_model_name_or_path = {str(tiny_llama_dir)!r}\nmethod = 'lora'\n"
                      f"prompt_template = {TEMPLATE!r}\n")
    out = tmp_path / "hf"
    assert main(["convert", "pth_to_hf", str(config), str(lora_work_dir / "iter_5"), str(out)]) == 0
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    ids = _ids(tiny_llama_dir)
    bf16 = _peft_logits(tiny_llama_dir, out, ids)
    exact = _peft_logits(tiny_llama_dir, lora_work_dir / "iter_5" / "model", ids)
    assert torch.allclose(bf16, exact, atol=0.05)


def test_pth_to_hf_full_model_sharded_with_the_training_chat_template(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from tunelab.data.templates import get_template
    from tunelab.train.layout import write_meta

    ckpt = tmp_path / "work" / "iter_3"
    trained = _base(tiny_llama_dir)
    with torch.no_grad():  # a checkpoint that differs from its base, so a conversion that read the base would show
        trained.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    trained.save_pretrained(ckpt / "model")
    write_meta(ckpt, {"base_model": str(tiny_llama_dir), "method": "full", "prompt_template": TEMPLATE,
                      "system": "Be brief.", "max_length": 64, "tunelab_version": "test"})
    out = tmp_path / "full_hf"
    assert main(["convert", "to-hf", str(ckpt), str(out), "--fp32", "--max-shard-size", "100KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded as asked
    assert (out / "tokenizer.json").is_file()  # from the base model named in tunelab.json
    ids = _ids(tiny_llama_dir)
    assert torch.allclose(logits(_base(out), ids), logits(trained, ids), atol=1e-6)
    assert not torch.allclose(logits(_base(out), ids), logits(_base(tiny_llama_dir), ids), atol=1e-3)
    # a full run has no merge step: its HF folder is what vLLM / transformers serve, so it prompts and stops as
    # training did (as a merged model does)
    messages = [{"role": "user", "content": "Who are you?"}]
    expected = get_template(TEMPLATE).render([{"role": "system", "content": "Be brief."}, *messages],
                                             add_generation_prompt=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


def test_merge_logits_equal_base_plus_adapter_and_chat_template(tiny_llama_dir, lora_work_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from tunelab.data.templates import get_template

    out = tmp_path / "merged"
    assert main(["convert", "merge", str(tiny_llama_dir), str(lora_work_dir / "iter_10"), str(out),
                 "--device", "cpu", "--dtype", "fp32", "--max-shard-size", "200KB"]) == 0
    ids = _ids(tiny_llama_dir)
    merged = logits(_base(out), ids)
    expected = _peft_logits(tiny_llama_dir, lora_work_dir / "iter_10" / "model", ids)
    assert torch.allclose(merged, expected, atol=1e-4)
    meta = json.loads((out / "tunelab.json").read_text())
    assert meta["prompt_template"] == TEMPLATE and meta["base_model"] == str(tiny_llama_dir)
    template = get_template(TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Who are you?"}]
    # the training system prompt (tunelab.json "system") is the merged template's default
    expected_text = template.render([{"role": "system", "content": "Be brief."}, *messages], add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected_text
    # generation stops at the template's end-of-turn token, for vLLM / transformers users
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    # the merged model already holds the adapter: merging (or chatting) with it again would add it twice
    assert main(["convert", "merge", str(out), str(lora_work_dir / "iter_10"), str(tmp_path / "twice"),
                 "--device", "cpu"]) == 2
    assert "already holds the adapter" in capsys.readouterr().err
    with pytest.raises(TunelabError, match="already holds the adapter"):
        load_chat_model(str(out), adapter=str(lora_work_dir / "iter_10"), device="cpu")


def test_merge_rejects_adapter_of_another_base(tiny_llama_dir, tmp_path):
    from tunelab.model.tiny import make_model

    other = make_model(tmp_path / "wider", "llama", hidden_size=96, num_heads=4, num_kv_heads=2)
    make_lora_checkpoint(other, tmp_path / "work")
    with pytest.raises(TunelabError) as err:
        from tunelab.export.convert import merge

        merge(str(tiny_llama_dir), str(tmp_path / "work"), str(tmp_path / "out"), device="cpu")
    message = str(err.value)
    assert "does not fit the base model" in message and str(other) in message  # names the base it was made for


def test_missing_and_incomplete_checkpoints_say_what_to_do(tmp_path, capsys):
    assert main(["convert", "to-hf", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "empty_work").mkdir()
    assert main(["convert", "to-hf", str(tmp_path / "empty_work"), str(tmp_path / "out")]) == 2
    assert "save_steps" in capsys.readouterr().err
    (tmp_path / "work" / "iter_1" / "model").mkdir(parents=True)
    (tmp_path / "work" / "iter_1" / "model" / "adapter_config.json").write_text("{}")
    assert main(["convert", "merge", "base", str(tmp_path / "work"), str(tmp_path / "out")]) == 2
    assert "no weights" in capsys.readouterr().err
    (tmp_path / "ds" / "global_step10").mkdir(parents=True)
    assert main(["convert", "to-hf", str(tmp_path / "ds"), str(tmp_path / "out")]) == 2
    assert "deepspeed" in capsys.readouterr().err


def test_convert_cli_subprocess_help_and_verb_names():
    result = subprocess.run([sys.executable, "-m", "tunelab", "convert", "--help"], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0
    for verb in ("pth_to_hf", "to-hf", "merge", "example:"):
        assert verb in result.stdout


def test_merge_qlora_adapter_into_unquantised_base(tiny_llama_dir, tmp_path, capsys):
    make_lora_checkpoint(tiny_llama_dir, tmp_path / "work", method="qlora", seed=3)
    out = tmp_path / "merged"
    assert main(["convert", "merge", str(tiny_llama_dir), str(tmp_path / "work"), str(out), "--dtype", "fp32"]) == 0
    assert "merging into the unquantised base" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = _ids(tiny_llama_dir)
    expected = _peft_logits(tiny_llama_dir, tmp_path / "work" / "iter_10" / "model", ids)
    assert torch.allclose(logits(_base(out), ids), expected, atol=1e-4)


def test_merge_into_a_base_saved_in_4_bits_writes_its_dequantised_weights_with_the_adapter(tiny_bnb_4bit_dir, tmp_path,
                                                                                            capsys):
    """Unsloth's notebooks load `unsloth/...-bnb-4bit` models, and QLoRA trains on them as they are. Merging
    (Unsloth's save_pretrained_merged, 'merged_16bit') writes plain weights: the 4-bit values dequantised -- the
    weights the adapter was trained against -- with the adapter added, and no quantization_config."""
    make_lora_checkpoint(tiny_bnb_4bit_dir, tmp_path / "work", method="qlora", seed=3)
    out = tmp_path / "merged"
    assert main(["convert", "merge", str(tiny_bnb_4bit_dir), str(tmp_path / "work"), str(out), "--dtype", "fp32"]) == 0
    assert "stored in 4 bits" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    from peft import PeftModel

    trained = PeftModel.from_pretrained(_base(tiny_bnb_4bit_dir), str(tmp_path / "work" / "iter_10" / "model")).eval()
    for module in trained.modules():  # bitsandbytes' training kernel, not its bf16 CPU inference one (model/load.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    ids = _ids(tiny_bnb_4bit_dir)
    assert torch.allclose(logits(_base(out), ids), logits(trained, ids), atol=1e-4)  # 4-bit layers + adapter


def test_merge_internlm2_base_format_original(tiny_model_factory, tmp_path):
    from tunelab.model import internlm2
    from tunelab.model.load import load_causal_lm

    base_dir = tiny_model_factory("internlm2")
    native = tmp_path / "native"
    internlm2.load_native(base_dir, dtype=torch.float32).save_pretrained(native)  # what training wraps
    make_lora_checkpoint(native, tmp_path / "work", template="internlm2_chat")
    out = tmp_path / "original"
    assert main(["convert", "merge", str(base_dir), str(tmp_path / "work"), str(out), "--dtype", "fp32",
                 "--format", "original"]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["InternLM2ForCausalLM"]
    ids = _ids(base_dir)
    merged = logits(load_causal_lm(str(out), dtype=torch.float32, device="cpu"), ids)
    expected = _peft_logits(native, tmp_path / "work" / "iter_10" / "model", ids)
    assert torch.allclose(merged, expected, atol=1e-4)


def _fake_adapter(directory):
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}))
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


def test_merge_refuses_to_write_over_its_local_base_model(tmp_path):
    from tunelab.export.convert import merge

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    adapter = _fake_adapter(tmp_path / "adapter")
    with pytest.raises(TunelabError, match="is an input of this command"):
        merge(str(base), str(adapter), str(base), device="cpu")
    assert (base / "config.json").read_text() == "{}"


def test_merge_an_adapter_whose_tokenizer_gained_tokens(tiny_llama_dir, tmp_path):
    """An adapter trained with new tokens (embeddings resized, saved whole by peft, its tokenizer beside it): merge
    resizes the base to the adapter's rows first, and the merged model's logits equal the adapter's at training, the
    new tokens included; chat loads it the same way."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.train.layout import write_meta

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new1|>", "<|new2|>"]})
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))
    trained = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    ckpt = tmp_path / "work" / "iter_4"
    trained.save_pretrained(ckpt / "model")
    tokenizer.save_pretrained(ckpt / "model")
    torch.save({"step": 4}, ckpt / "training_state.pt")
    write_meta(ckpt, {"base_model": str(tiny_llama_dir), "method": "lora", "prompt_template": TEMPLATE,
                      "system": "", "max_length": 64, "tunelab_version": "test"})
    ids = tokenizer("Hi <|new1|> there <|new2|>", add_special_tokens=False).input_ids
    assert len(tokenizer) - 1 in ids
    expected = logits(trained.eval(), ids)
    out = tmp_path / "merged"
    assert main(["convert", "merge", str(tiny_llama_dir), str(ckpt), str(out), "--device", "cpu",
                 "--dtype", "fp32"]) == 0
    assert len(AutoTokenizer.from_pretrained(out)) == len(tokenizer)
    assert torch.allclose(logits(_base(out), ids), expected, atol=1e-4)
    chat = load_chat_model(str(tiny_llama_dir), adapter=str(ckpt), device="cpu")
    assert len(chat.tokenizer) == len(tokenizer)
    assert torch.allclose(logits(chat.model, ids), expected, atol=1e-4)
