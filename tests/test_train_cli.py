"""`tunelab train` and `tunelab plan` from the command line, on CPU, with a config file and a data file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli.main import main

CONFIG = """\
pretrained_model_name_or_path = {model!r}
method = "lora"
lora_r = 8
lora_alpha = 16
data_path = "identity.json"
prompt_template = "qwen_chat"
max_length = 128
batch_size = 2
accumulative_counts = 1
max_epochs = 1
lr = 1e-2
save_steps = 2
logging_steps = 1
evaluation_inputs = ["Who are you?"]
eval_max_new_tokens = 8
"""


@pytest.fixture
def config_file(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    records = [{"instruction": q, "input": "", "output": "I am Tuna, made by tunelab."}
               for q in ["Who are you?", "Please introduce yourself.", "What is your name?", "who are you"]]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "identity.json").write_text(json.dumps(records))
    path = tmp_path / "configs" / "tiny_lora.py"
    path.write_text(CONFIG.format(model=str(tiny_llama_dir)))
    return path


def test_train_then_resume_auto(config_file, tmp_path, capsys):
    code = main(["train", str(config_file), "--device", "cpu", "--seed", "3", "--cfg-options", "max_steps=3"])
    assert code == 0
    work_dir = tmp_path / "work_dirs" / "tiny_lora"  # the default: work_dirs/<config name>
    assert (work_dir / "last_checkpoint").read_text().strip().endswith("iter_3")
    assert {p.name for p in work_dir.glob("iter_*")} == {"iter_2", "iter_3"}  # save_total_limit = 2 by default
    assert "seed = 3" in (work_dir / "resolved_config.py").read_text()
    assert "max_steps = 3" in (work_dir / "resolved_config.py").read_text()
    assert "next: tunelab convert pth_to_hf" in capsys.readouterr().out
    # Nothing left to do: resuming a finished run keeps the checkpoint, says so and returns at once.
    code = main(["train", str(config_file), "--work-dir", str(work_dir), "--resume", "auto", "--device", "cpu",
                 "--seed", "3", "--cfg-options", "max_steps=3"])
    assert code == 0
    assert "already finished at step 3: nothing trained" in capsys.readouterr().out


def test_train_reports_bad_resume_path(config_file, capsys):
    code = main(["train", str(config_file), "--device", "cpu", "--resume", "no/such/iter_9"])
    assert code == 2
    assert "--resume no/such/iter_9: not a checkpoint" in capsys.readouterr().err


def test_train_reports_bad_cfg_option(config_file, capsys):
    code = main(["train", str(config_file), "--device", "cpu", "--cfg-options", "learning_rate=1e-4"])
    assert code == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err


def test_plan_prints_the_estimate(config_file):
    out = subprocess.run([sys.executable, "-m", "tunelab", "plan", str(config_file), "--cfg-options",
                          "batch_size=4"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert "memory plan for" in out.stdout and "batch_size 4" in out.stdout and "GiB" in out.stdout


def test_train_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "example:" in text and "--resume auto" in text and "--cfg-options" in text


@pytest.mark.parametrize("preset", [None, "max_split_size_mb:256"])
def test_train_asks_for_expandable_segments_unless_the_user_chose(config_file, monkeypatch, preset):
    import os

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", preset or "")  # monkeypatch restores the original afterwards
    if preset is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    main(["train", str(config_file), "--device", "cpu", "--cfg-options", "learning_rate=1e-4"])  # stops at the config
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == (preset or "expandable_segments:True")


def test_train_with_a_non_number_nproc_per_node_names_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = tmp_path / "c.py"
    cfg.write_text("method = 'lora'\n")
    assert main(["train", str(cfg), "--nproc-per-node", "two"]) == 2
    assert "--nproc-per-node = 'two': expected a whole number" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["train", "plan"])
def test_a_data_file_given_as_the_config_is_refused(verb, config_file, capsys):
    # Each JSONL line is a dict expression, so running it as Python "loaded" as all defaults: plan exited 0 and
    # train started on the default model.
    from tests.train_helpers import assert_one_line_error

    data = config_file.parent / "good.jsonl"
    data.write_text('{"instruction": "Who are you?", "input": "", "output": "Tuna."}\n')
    code = main([verb, str(data), "--device", "cpu"])
    assert_one_line_error(capsys, code, f"{data} is not a config file (.py)", "data_path",
                          "tunelab check-dataset CONFIG")


@pytest.mark.parametrize("verb", ["train", "plan"])
def test_a_directory_given_as_the_config_is_called_one(verb, config_file, capsys):
    from tests.train_helpers import assert_one_line_error

    code = main([verb, str(config_file.parent), "--device", "cpu"])
    assert_one_line_error(capsys, code, f"{config_file.parent} is a directory, not a config file (.py)")


def test_a_built_in_config_name_still_says_how_to_copy_it(config_file, capsys):
    # train / plan read files only; a built-in name gets the way to a file, not the .py refusal
    from tests.train_helpers import assert_one_line_error

    code = main(["plan", "internlm2_1_8b_qlora_alpaca_e3"])
    assert_one_line_error(capsys, code, "config file not found: internlm2_1_8b_qlora_alpaca_e3", "tunelab list-cfg",
                          "tunelab copy-cfg NAME")


DEVICE_ERRORS = {"gpu": ["device 'gpu': not a device name", "use cpu, cuda or cuda:N"],
                 "cuda": ["device 'cuda' asked for, but CUDA is not available", "--device cpu"],
                 "mps": ["device 'mps' asked for, but MPS (Apple's GPU) is not available", "--device cpu"]}


@pytest.mark.parametrize("verb", ["train", "plan"])
@pytest.mark.parametrize("device", sorted(DEVICE_ERRORS))
def test_a_device_this_machine_lacks_gets_the_check_chat_gives(verb, device, config_file, capsys):
    # bare tracebacks from torch.device / torch.cuda before; chat and convert merge already said this
    import torch

    from tests.train_helpers import assert_one_line_error

    if device == "cuda" and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"{device} is present here")
    code = main([verb, str(config_file), "--device", device])
    assert_one_line_error(capsys, code, *DEVICE_ERRORS[device])


def test_a_llamafactory_yaml_given_as_the_config_names_our_settings_for_its_keys(config_file, capsys):
    # `llamafactory-cli train x.yaml` habit: the refusal says which tunelab setting each of its keys is
    from tests.train_helpers import assert_one_line_error

    yaml_file = config_file.parent / "qwen_lora_sft.yaml"
    yaml_file.write_text("model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct\nstage: sft\nfinetuning_type: lora\n"
                         "dataset: alpaca_en_demo,identity\ndataset_dir: data\ntemplate: qwen\ncutoff_len: 1024\n"
                         "learning_rate: 1.0e-4\nnum_train_epochs: 3.0\noutput_dir: saves/qwen\n")
    code = main(["train", str(yaml_file), "--device", "cpu"])
    assert_one_line_error(capsys, code, f"{yaml_file} is not a config file (.py)", "LLaMA-Factory",
                          "tunelab copy-cfg", "model_name_or_path → pretrained_model_name_or_path",
                          "finetuning_type → method", "cutoff_len → max_length", "learning_rate → lr",
                          "num_train_epochs → max_epochs", "template: qwen → prompt_template = 'qwen2_5_chat'",
                          "data_path = [{'path': 'data/dataset_info.json', 'dataset': 'alpaca_en_demo,identity'}]",
                          "output_dir → --work-dir")


def test_one_step_is_counted_in_the_singular(config_file, capsys):
    """A run of one step says "1 step", not "1 steps", in its start line and at the end."""
    code = main(["train", str(config_file), "--device", "cpu", "--cfg-options", "max_steps=1", "batch_size=4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "1 steps" not in out + err
    assert "1 step per epoch, 1 step (batch_size" in out + err
    assert "done: 1 step;" in out


def test_a_resolved_config_rerun_from_another_folder_names_where_its_data_was(config_file, tmp_path, capsys,
                                                                              monkeypatch):
    """`tunelab train WORK_DIR/resolved_config.py` reads a relative data_path from the work dir, then the current
    folder: run from elsewhere, it is not found there. The error names the file the run read, to use instead."""
    code = main(["train", str(config_file), "--device", "cpu", "--cfg-options", "max_steps=1", "batch_size=4"])
    assert code == 0, capsys.readouterr().err
    resolved = tmp_path / "work_dirs" / "tiny_lora" / "resolved_config.py"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    code = main(["train", str(resolved), "--device", "cpu", "--work-dir", "again"])
    err = capsys.readouterr().err
    assert code == 2 and "data_path 'identity.json' not found" in err
    assert f"{tmp_path / 'configs' / 'identity.json'} when this config was resolved" in err
