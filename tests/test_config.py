"""The config step: list-cfg, copy-cfg, loading and validating a Python config, --cfg-options."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tunelab.cli.main import main
from tunelab.config import registry
from tunelab.config.loader import load_config, save_resolved_config
from tunelab.config.schema import TrainConfig, field_docs, field_names
from tunelab.config.settings_doc import settings_markdown
from tunelab.errors import TunelabError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "cfg.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- list-cfg / copy-cfg ------------------------------------------------------------------------

def test_list_cfg_pattern_filters_case_insensitively(capsys):
    assert main(["list-cfg", "-p", "InternLM2_1_8B"]) == 0
    names = capsys.readouterr().out.split()
    assert "internlm2_1_8b_qlora_alpaca_e3" in names
    text = [n for n in names if not n.startswith("llava_")]
    assert text and all(n.startswith("internlm2_1_8b_") for n in text)
    # every method x dataset of that model, and its LLaVA configs (tower x stage), nothing else
    assert len(text) == len(registry.METHODS) * len(registry.DATASETS)
    assert len(names) - len(text) == len(registry.VISION_TOWERS) * len(registry.LLAVA_STAGES)


def test_list_cfg_covers_the_tutorial_models():
    names = registry.list_configs()
    for expected in ["internlm2_1_8b_qlora_alpaca_e3", "internlm2_5_7b_lora_openai_e3",
                     "llama3_8b_full_alpaca_e3", "qwen2_5_0_5b_qlora_self_cognition_e3",
                     "mistral_7b_qlora_alpaca_e3", "llama2_7b_lora_alpaca_e3", "internlm2_20b_qlora_alpaca_e3"]:
        assert expected in names
    assert registry.list_configs("no-such-model") == []


@pytest.mark.parametrize("name", list(registry.llava_configs()))
def test_every_llava_config_renders_and_loads(name, tmp_path):
    path = registry.copy_config(name, tmp_path)
    cfg = load_config(path)
    model, tower, stage = registry.llava_configs()[name]
    assert cfg.pretrained_model_name_or_path == registry.MODELS[model].hub_id
    assert cfg.visual_encoder_name_or_path == registry.VISION_TOWERS[tower].hub_id
    assert cfg.vision_feature_select_strategy == registry.VISION_TOWERS[tower].select_strategy
    assert cfg.freeze_llm == (stage == "pretrain") and cfg.method == registry.LLAVA_STAGES[stage].method
    # stage 2 starts from stage 1's work dir, as `tunelab train` names it from the config's next steps
    if stage == "finetune":
        assert cfg.pretrained_pth == f"./work_dirs/llava_{model}_{tower}_pretrain"
    assert f"tunelab train {name}_copy.py --work-dir work_dirs/{name}" in path.read_text(encoding="utf-8")
    # its evaluation questions ask about a picture: the copy has the setting that names it, beside the others
    assert "\nevaluation_images = None  # " in path.read_text(encoding="utf-8")


def test_list_cfg_without_match_is_an_error(capsys):
    assert main(["list-cfg", "-p", "gpt5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gpt5" in err and "internlm2_1_8b" in err and "Traceback" not in err


@pytest.mark.parametrize("name", list(registry.builtin_configs()))
def test_every_builtin_config_renders_and_loads(name, tmp_path):
    path = registry.copy_config(name, tmp_path)
    cfg = load_config(path)
    model, method, dataset = registry.builtin_configs()[name]
    assert cfg.pretrained_model_name_or_path == registry.MODELS[model].hub_id
    assert cfg.prompt_template == registry.MODELS[model].prompt_template
    assert cfg.method == method
    assert cfg.lr == registry.learning_rate(method, dataset)
    assert cfg.objective == registry.DATASETS[dataset].objective
    assert cfg.data_path == registry.DATASETS[dataset].data_path
    assert cfg.trust_remote_code is False
    assert f"tunelab train {name}_copy.py" in path.read_text(encoding="utf-8")


def test_preference_configs_list_by_objective_and_carry_its_settings(tmp_path, capsys):
    assert main(["list-cfg", "-p", "dpo"]) == 0
    names = capsys.readouterr().out.split()
    assert "qwen2_5_1_5b_qlora_dpo_ultrafeedback_e1" in names and all("dpo" in n for n in names if "_" in n)
    dpo = load_config(registry.copy_config("qwen2_5_1_5b_qlora_dpo_ultrafeedback_e1", tmp_path))
    sft = load_config(registry.copy_config("qwen2_5_1_5b_qlora_alpaca_e3", tmp_path))
    assert (dpo.objective, dpo.beta, dpo.reference, dpo.max_length) == ("dpo", 0.1, "auto", 1024)
    assert dpo.lr < sft.lr and sft.objective == "sft"
    simpo = load_config(registry.copy_config("llama3_8b_full_simpo_ultrafeedback_e1", tmp_path))
    assert (simpo.beta, simpo.simpo_gamma) == (2.0, 1.0)
    reward = registry.copy_config("internlm2_1_8b_lora_reward_ultrafeedback_e1", tmp_path)
    assert load_config(reward).evaluation_inputs == [] and "tunelab reward rm --data" in reward.read_text()
    assert load_config(registry.copy_config("qwen2_5_0_5b_full_kto_mix_e1", tmp_path)).objective == "kto"


def test_method_defaults_differ_where_they_should(tmp_path):
    full = load_config(registry.copy_config("qwen2_5_0_5b_full_alpaca_e3", tmp_path))
    qlora = load_config(registry.copy_config("qwen2_5_0_5b_qlora_alpaca_e3", tmp_path))
    assert full.lr < qlora.lr
    assert qlora.resolved_quant_bits() == 4 and full.resolved_quant_bits() is None
    assert qlora.optimizer == "adamw_8bit" and full.optimizer == "adamw"  # QLoRA has bitsandbytes anyway
    cognition = load_config(registry.copy_config("qwen2_5_0_5b_lora_self_cognition_e3", tmp_path))
    assert cognition.evaluation_inputs == ["请介绍一下你自己", "who are you?"]
    assert cognition.data_format == "conversation"


def test_copy_cfg_writes_copy_and_refuses_overwrite(tmp_path, capsys):
    dest = tmp_path / "configs"
    assert main(["copy-cfg", "internlm2_1_8b_qlora_alpaca_e3", str(dest)]) == 0
    written = dest / "internlm2_1_8b_qlora_alpaca_e3_copy.py"
    out = capsys.readouterr().out
    assert str(written) in out and "tunelab train" in out
    written.write_text(written.read_text() + "\nlr = 1e-5\n")  # the user's edit

    assert main(["copy-cfg", "internlm2_1_8b_qlora_alpaca_e3", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "Traceback" not in err
    assert load_config(written).lr == 1e-5  # the edit survived

    assert main(["copy-cfg", "internlm2_1_8b_qlora_alpaca_e3", str(dest), "--force"]) == 0
    assert load_config(written).lr == 2e-4


def test_copy_cfg_unknown_name_suggests_close_names(tmp_path, capsys):
    with pytest.raises(TunelabError, match="internlm2_1_8b_qlora_alpaca_e3"):
        registry.copy_config("internlm2_1_8b_qlora_alpca_e3", tmp_path)
    assert main(["copy-cfg", "internlm2_1_8b_qlora_alpca_e3", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Did you mean" in err and "internlm2_1_8b_qlora_alpaca_e3" in err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_adding_a_model_is_one_table_line(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.MODELS, "tiny_local", registry.Model("/models/tiny", "qwen_chat", max_length=512))
    assert "tiny_local_lora_openai_e3" in registry.list_configs("tiny_local")
    cfg = load_config(registry.copy_config("tiny_local_lora_openai_e3", tmp_path))
    assert cfg.pretrained_model_name_or_path == "/models/tiny" and cfg.max_length == 512


def test_list_cfg_via_subprocess():
    result = subprocess.run([sys.executable, "-m", "tunelab", "list-cfg", "-p", "qwen2_5_0_5b_qlora"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"qwen2_5_0_5b_qlora_{d}_e{registry.DATASETS[d].epochs}"
                                     for d in registry.DATASETS]


# --- loading and validating ---------------------------------------------------------------------

def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, """\
        method = 'lora'
        lr = 2e-4

        max_lenght = 1024
    """)
    with pytest.raises(TunelabError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "'max_lenght'" in message and "line 4" in message
    assert "Did you mean 'max_length'?" in message


def test_names_from_other_tools_point_to_ours(tmp_path):
    path = write(tmp_path, "learning_rate = 1e-4\n")
    with pytest.raises(TunelabError, match="Did you mean 'lr'"):
        load_config(path)


@pytest.mark.parametrize("line, words", [
    ("use_varlen_attn = True", "always keeps packed samples apart"),
    ("dataloader_num_workers = 4", "prepared and cached before training"),
])
def test_xtuner_names_without_a_setting_say_why_and_to_delete_them(tmp_path, line, words):
    """An XTuner user's PART 1 name that tunelab needs no setting for is named as such, not as a helper to rename."""
    path = write(tmp_path, line + "\n")
    with pytest.raises(TunelabError) as info:
        load_config(path)
    message = str(info.value)
    assert words in message and "delete the line" in message and "start your own helper names" not in message
    with pytest.raises(TunelabError, match=words):
        load_config(write(tmp_path, "", "empty.py"), [line.replace(" = ", "=")])


def test_helpers_imports_and_private_names_are_not_settings(tmp_path):
    path = write(tmp_path, """\
        import os
        from pathlib import Path
        from math import *
        _root = Path('/data')
        data_path = str(_root / 'train.jsonl')
        class Helper:
            pass
    """)
    assert load_config(path).data_path == "/data/train.jsonl"


@pytest.mark.parametrize("line, key, words", [
    ("batch_size = '4'", "batch_size", "whole number"),
    ("pack_to_max_length = 1", "pack_to_max_length", "True or False"),
    ("max_epochs = True", "max_epochs", "whole number"),
    ("method = 'qlroa'", "method", "Did you mean 'qlora'"),
    ("max_length = 0", "max_length", "positive"),
    ("warmup_ratio = 1.5", "warmup_ratio", "below 1"),
    ("lr = 0", "lr", "greater than 0"),
    ("save_total_limit = 0", "save_total_limit", "-1"),
    ("quant_bits = 3", "quant_bits", "None, 4 or 8"),
    ("eval_split_ratio = -0.1", "eval_split_ratio", "at least 0"),
    ("evaluation_inputs = 'who are you?'", "evaluation_inputs", "a list"),
    ("evaluation_inputs = ['hi', '']", "evaluation_inputs", "evaluation_inputs[1] is an empty question"),
    ("evaluation_inputs = ['  \\n', 'hi']", "evaluation_inputs", "evaluation_inputs[0] is an empty question"),
    ("data_format = 'alpacca'", "data_format", "Did you mean 'alpaca'"),
    ("lora_r = -8", "lora_r", "positive"),
    # an entry that is not a name: an AttributeError ('int' has no rsplit) in the combination checks before
    ("lora_modules_to_save = ['lm_head', 1]", "lora_modules_to_save", "a list of module names"),
    ("lora_modules_to_save = [['lm_head']]", "lora_modules_to_save", "a list of module names"),
    # no adapter anywhere: peft's "No `target_modules` passed but also no `target_parameters` found" after loading
    ("lora_target_modules = []", "lora_target_modules", "'all-linear' or a list of module names"),
])
def test_wrong_type_or_impossible_value_names_key_file_and_line(tmp_path, line, key, words):
    path = write(tmp_path, f"# my config\nmethod = 'lora'\n{line}\n")
    with pytest.raises(TunelabError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and f"'{key}'" in message and "line 3" in message
    assert words in message


def test_ints_are_accepted_for_floats(tmp_path):
    cfg = load_config(write(tmp_path, "lr = 1\nwarmup_ratio = 0\nbetas = [0.9, 0.95]\n"))
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.betas == (0.9, 0.95)


def test_all_errors_are_reported_at_once(tmp_path):
    path = write(tmp_path, "batch_size = 0\nmax_lenght = 10\nlr = -1\n")
    message = str(pytest.raises(TunelabError, load_config, path).value)
    assert "batch_size" in message and "max_lenght" in message and "'lr'" in message


def test_full_method_with_quantised_base_is_refused(tmp_path):
    with pytest.raises(TunelabError, match=r"'quant_bits' \(line 2\): method = 'full' with quant_bits = 4"):
        load_config(write(tmp_path, "method = 'full'\nquant_bits = 4\n"))


def test_eval_max_new_tokens_past_max_length_is_refused_naming_both(tmp_path):
    """A slip (10**9) would have the evaluation questions generate until they stop, or fail inside transformers.
    The default (128) with a shorter max_length still loads: it is cut to max_length when the questions are asked."""
    path = write(tmp_path, "max_length = 512\neval_max_new_tokens = 10**9\n")
    with pytest.raises(TunelabError, match=r"'eval_max_new_tokens' \(line 2\): eval_max_new_tokens = 1000000000 is "
                                           r"more than max_length = 512.*to 512 or less"):
        load_config(path)
    assert load_config(write(tmp_path, "max_length = 512\neval_max_new_tokens = 512\n")).eval_max_new_tokens == 512
    assert load_config(write(tmp_path, "max_length = 64\n")).eval_max_new_tokens == 128


def test_cfg_options_override_and_type_check(tmp_path):
    path = write(tmp_path, "method = 'lora'\nlr = 2e-4\n")
    cfg = load_config(path, ["lr=1e-4", "evaluation_inputs=['a','b']", "prompt_template=qwen_chat",
                             "max_epochs=1", "SYSTEM=You are helpful.", "gradient_checkpointing=False"])
    assert cfg.lr == 1e-4 and cfg.max_epochs == 1 and cfg.evaluation_inputs == ["a", "b"]
    assert cfg.prompt_template == "qwen_chat" and cfg.SYSTEM == "You are helpful."
    assert cfg.gradient_checkpointing is False and cfg.method == "lora"

    with pytest.raises(TunelabError, match=r"--cfg-options: unknown setting 'max_lenght'\. Did you mean 'max_length'"):
        load_config(path, ["max_lenght=1024"])
    with pytest.raises(TunelabError, match=r"--cfg-options: 'max_length' must be a whole number; got 'long'"):
        load_config(path, ["max_length=long"])
    with pytest.raises(TunelabError, match=r"--cfg-options: 'batch_size' must be a positive"):
        load_config(path, ["batch_size=0"])
    with pytest.raises(TunelabError, match="expected key=value"):
        load_config(path, ["lr"])
    with pytest.raises(TunelabError, match=r"data_path=\"\['x.jsonl'\" is not a valid Python literal"):
        load_config(path, ["data_path=['x.jsonl'"])  # an unclosed list is not taken for a path
    assert load_config(path, ["SYSTEM=[INST] be brief"]).SYSTEM == "[INST] be brief"  # text in brackets stays text


def test_config_with_map_function(tmp_path):
    path = write(tmp_path, """\
        import re

        def my_map_fn(record):
            return {"instruction": re.sub(r"\\s+", " ", record["q"]), "input": "", "output": record["a"]}

        def other_map_fn(record):
            return {"instruction": record["q"].upper(), "input": "", "output": record["a"]}

        data_format = 'alpaca'
        dataset_map_fn = my_map_fn
    """)
    cfg = load_config(path)
    assert cfg.dataset_map_fn({"q": "hi   there", "a": "yo"}) == {"instruction": "hi there", "input": "", "output": "yo"}
    # an override may name another function defined in the file
    cfg = load_config(path, ["dataset_map_fn=other_map_fn"])
    assert cfg.dataset_map_fn({"q": "hi", "a": "yo"})["instruction"] == "HI"
    # a function named like the field is the field
    direct = write(tmp_path, "def dataset_map_fn(record):\n    return record\n", "direct.py")
    assert load_config(direct).dataset_map_fn({"x": 1}) == {"x": 1}
    bad = write(tmp_path, "dataset_map_fn = 'my_map_fn'\n", "bad.py")
    with pytest.raises(TunelabError, match=r"'dataset_map_fn' \(line 1\) must be a function or None.*no quotes"):
        load_config(bad)


def test_syntax_error_and_exception_name_file_and_line(tmp_path):
    path = write(tmp_path, "lr = 2e-4\nmax_length = (2048\nbatch_size = 1\n")
    with pytest.raises(TunelabError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "syntax error" in str(info.value) and "line 2" in str(info.value)

    # a NUL byte: Python's SyntaxError has no line number, and the message said "(line None)"
    path = write(tmp_path, "lr = 2e-4\nmax_length = 2048\x00\n", "nul.py")
    with pytest.raises(TunelabError, match=r"nul\.py: syntax error \(line 2\): source code string cannot contain "
                                           r"null bytes.*Fix that line"):
        load_config(path)

    path = write(tmp_path, "lr = 2e-4\n\nprompt_template = PROMPT_TEMPLATE.internlm2_chat\n", "raises.py")
    with pytest.raises(TunelabError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "NameError" in message and "line 3" in message
    assert "prompt_template = 'internlm2_chat'" in message  # the XTuner spelling gets the tunelab one


def test_missing_config_file(tmp_path):
    with pytest.raises(TunelabError, match="tunelab list-cfg"):
        load_config(tmp_path / "nope.py")


def test_resolved_config_round_trips(tmp_path):
    src = write(tmp_path, """\
        import json as _json
        _prefix = "Q: "
        def my_map_fn(record):
            return {"text": _prefix + _json.dumps(record["body"])}
        method = 'qlora'
        lr = 1e-4
        data_path = [{'path': 'a.jsonl', 'ratio': 0.5}, 'b.json']
        evaluation_inputs = ['你好', 'hi']
        dataset_map_fn = my_map_fn
    """)
    cfg = load_config(src, ["max_length=512"])
    out = save_resolved_config(cfg, tmp_path / "work" / "resolved_config.py")
    again = load_config(out)
    for name in field_names():
        if name != "dataset_map_fn":
            assert getattr(again, name) == getattr(cfg, name), name
    assert again.dataset_map_fn({"body": "x"}) == {"text": 'Q: "x"'}
    assert load_config(save_resolved_config(TrainConfig(), tmp_path / "defaults.py")) == TrainConfig()


@pytest.mark.parametrize("entry, says", [
    ("{'path': 'a.jsonl', 'weight': 2}", r"unknown key\(s\) 'weight'"),
    ("{'path': 'a.jsonl', 'format': 'sharegtp'}", r"unknown format 'sharegtp'; Did you mean 'sharegpt'\?"),
    ("{'path': 'a.jsonl', 'ratio': '0.5'}", r"ratio must be a finite number above 0"),
    ("{'file': 'a.jsonl'}", r"unknown key\(s\) 'file'; an entry is \{'path'"),
    ("{'ratio': 2}", r"no 'path' key"),
    # int(inf) / int(nan) when the ratio was applied: OverflowError / ValueError tracebacks
    ("{'path': 'a.jsonl', 'ratio': float('inf')}", r"ratio must be a finite number above 0.*got inf"),
    ("{'path': 'a.jsonl', 'ratio': float('nan')}", r"ratio must be a finite number above 0.*got nan"),
    # a number was iterated as names when the dataset_info.json was read ("'int' object is not iterable")
    ("{'path': 'dataset_info.json', 'dataset': 3}", r"'dataset' names datasets of a dataset_info\.json: a text "
                                                    r"\('a,b'\) or a list of texts; found int \(3\)"),
    ("{'path': 'dataset_info.json', 'dataset': ['a', None]}", r"'dataset' names datasets .*found list"),
])
def test_a_bad_data_path_entry_names_the_config_line(tmp_path, entry, says):
    """Checked when the config loads (by the data step's own rules), so the message points at the config's line."""
    path = write(tmp_path, f"method = 'lora'\ndata_path = ['b.jsonl', {entry}]\n")
    with pytest.raises(TunelabError, match=rf"cfg\.py.*'data_path'.*line 2.*data_path\[1\]: {says}"):
        load_config(path)


def test_docs_list_every_setting():
    docs = (REPO / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in docs for name in field_names())
    assert set(field_docs()) == set(field_names())
    # the table is generated from the schema; regenerate it when a setting changes (command in CONFIG.md)
    assert settings_markdown() in docs


def test_a_retired_fast_path_switch_loads_when_on_and_names_the_fix_when_off(tmp_path, caplog):
    """Configs written before the proven levers became always-on still load: `lean_lora = True` asks for what is
    on anyway; `= False` cannot be honoured alone, so it stops with what to do instead."""
    path = write(tmp_path, "method = 'lora'\nlean_lora = True\nuse_chunked_loss = True\n")
    with caplog.at_level("WARNING", logger="tunelab.config.loader"):
        assert load_config(path) == load_config(write(tmp_path, "method = 'lora'\n", "plain.py"))
    assert "'lean_lora' (line 2)" in caplog.text and "delete the line" in caplog.text
    with pytest.raises(TunelabError, match=r"'use_chunked_loss' \(line 2\) = False: .*fast_path = False"):
        load_config(write(tmp_path, "method = 'lora'\nuse_chunked_loss = False\n", "off.py"))
    with pytest.raises(TunelabError, match=r"--cfg-options: 'cudnn_attention' = False"):
        load_config(path, ["cudnn_attention=False"])


# --- copy-cfg / list-cfg: fuzzing findings --------------------------------------------------------

NAME = "internlm2_1_8b_qlora_alpaca_e3"


def test_copy_cfg_to_a_name_ending_in_py_writes_that_file(tmp_path, capsys):
    dest = tmp_path / "my_config.py"
    assert main(["copy-cfg", NAME, str(dest)]) == 0
    assert dest.is_file() and load_config(dest).method == "qlora"  # not a folder named my_config.py
    # its header's commands and the printed next step name the file written, and the run by its built-in name
    header = [line for line in dest.read_text().splitlines() if line.startswith("#   tunelab")]
    assert header and all(f"{NAME}_copy.py" not in line for line in header)
    assert f"tunelab train my_config.py --work-dir work_dirs/{NAME}" in "\n".join(header)
    assert main(["copy-cfg", NAME, str(dest)]) == 2 and "--force" in capsys.readouterr().err
    llava = tmp_path / "stage2.py"
    assert main(["copy-cfg", "llava_internlm2_1_8b_clip_vit_large_p14_336_finetune", str(llava)]) == 0
    assert "tunelab convert pth_to_hf stage2.py " in llava.read_text()


def test_copy_cfg_says_the_built_in_name_whatever_the_case_given(tmp_path, capsys):
    assert main(["copy-cfg", NAME.upper(), str(tmp_path)]) == 0
    assert f"--work-dir work_dirs/{NAME}\n" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["file_as_parent", "dangling_symlink", "folder_at_copy", "read_only"])
def test_copy_cfg_that_cannot_write_says_so_in_one_line(tmp_path, capsys, monkeypatch, case):
    (tmp_path / "afile").write_text("x")
    dest = {"file_as_parent": tmp_path / "afile" / "sub", "dangling_symlink": tmp_path / "link",
            "folder_at_copy": tmp_path, "read_only": tmp_path / "ro"}[case]
    if case == "dangling_symlink":
        dest.symlink_to(tmp_path / "missing")
    if case == "folder_at_copy":
        (tmp_path / f"{NAME}_copy.py").mkdir()
    if case == "read_only":  # root writes anywhere: a refused write, as a read-only folder gives it
        def refuse(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))
        monkeypatch.setattr(Path, "write_text", refuse)
    for extra in ([], ["--force"]):
        assert main(["copy-cfg", NAME, str(dest), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_copy_cfg_name_ignores_case_as_list_cfg_does(tmp_path, capsys):
    path = registry.copy_config(NAME.upper(), tmp_path)
    assert path.name == f"{NAME}_copy.py"
    with pytest.raises(TunelabError, match=f"Did you mean: {NAME}"):
        registry.copy_config("INTERNLM2_1_8B_QLORA_ALPCA_E3", tmp_path)


def test_list_cfg_pattern_may_be_a_glob(capsys):
    assert main(["list-cfg", "-p", "*qlora*"]) == 0
    names = capsys.readouterr().out.split()
    assert NAME in names and all("qlora" in n for n in names)
    assert registry.list_configs("INTERNLM2_1_8B_*_alpaca_e3") == [f"internlm2_1_8b_{m}_alpaca_e3"
                                                                   for m in registry.METHODS]


@pytest.mark.parametrize("theirs, ours", [("qwen", "qwen2_5_chat"), ("llama3", "llama3_chat"),
                                          ("qwen3", "qwen3_chat"), ("glm4", "glm4_chat")])
def test_llamafactory_template_names_point_to_the_same_format(tmp_path, theirs, ours):
    # LLaMA-Factory's `template: qwen` is Qwen2.5's format with its default system prompt; the closest spelling,
    # qwen_chat, is plain ChatML without it, so the suggestion must follow the format, not the spelling
    path = write(tmp_path, f"prompt_template = {theirs!r}\n")
    with pytest.raises(TunelabError, match=f"Did you mean '{ours}'\\?"):
        load_config(path)
    from tunelab.data.templates import get_template

    with pytest.raises(TunelabError, match=f"Did you mean '{ours}'\\?"):
        get_template(theirs)


def test_warmup_steps_as_unsloth_and_hf_trainer_set_it(tmp_path):
    """Unsloth's notebooks (and HF's TrainingArguments) warm up for a number of steps (`warmup_steps = 5` of
    `max_steps = 60`): the same setting here, winning over warmup_ratio as it does there, never past the run."""
    from tunelab.train.optim import warmup_steps_for

    cfg = load_config(write(tmp_path, "max_steps = 60\nwarmup_steps = 5\nwarmup_ratio = 0.5\n"))
    assert cfg.warmup_steps == 5 and warmup_steps_for(cfg, 60) == 5 and warmup_steps_for(cfg, 3) == 3
    assert warmup_steps_for(load_config(write(tmp_path, "warmup_ratio = 0.1\n")), 60) == 6  # ratio when unset
    with pytest.raises(TunelabError, match="'warmup_steps'.*line 1"):
        load_config(write(tmp_path, "warmup_steps = -1\n"))


def test_llama3_1_the_model_of_unsloths_notebooks_has_built_in_configs_with_its_own_template(tmp_path):
    """Unsloth's Llama notebooks fine-tune Llama 3.1 with its own chat template ("llama-3.1"); a copy of the Llama 3
    config would train it on Llama 3's template, which lacks 3.1's dated system block."""
    names = registry.list_configs("llama3_1_8b")
    assert "llama3_1_8b_qlora_openai_e3" in names and "llama3_1_8b_lora_alpaca_e3" in names
    cfg = load_config(registry.copy_config("llama3_1_8b_qlora_openai_e3", tmp_path))
    assert cfg.pretrained_model_name_or_path == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg.prompt_template == "llama3_1_chat"


def test_the_coming_from_unsloth_config_in_training_md_loads_with_the_notebooks_settings(tmp_path):
    """docs/TRAINING.md, "Coming from Unsloth": its config block is a config tunelab reads, holding the values of
    Unsloth's Llama-3.1 notebook (r 16, alpha 16, dropout 0, seven targets, 2 x 4, 60 steps, 5 warm-up, 8-bit AdamW,
    linear)."""
    docs = (REPO / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    block = docs.split("## Coming from Unsloth", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    cfg = load_config(write(tmp_path, block))
    assert (cfg.method, cfg.max_length, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.seed) == \
        ("qlora", 2048, 16, 16, 0.0, 3407)
    assert cfg.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (cfg.batch_size, cfg.accumulative_counts, cfg.max_steps, cfg.warmup_steps, cfg.lr) == (2, 4, 60, 5, 2e-4)
    assert (cfg.optimizer, cfg.lr_scheduler, cfg.prompt_template, cfg.data_format, cfg.train_on) == \
        ("adamw_8bit", "linear", "llama3_1_chat", "sharegpt", "assistant")
