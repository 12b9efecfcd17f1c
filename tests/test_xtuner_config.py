"""XTuner configs: `tunelab train` says what the file is; `tunelab convert xtuner-config` writes the equivalent
tunelab config from the file's text, without mmengine or XTuner."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from tunelab.cli.main import main
from tunelab.config.loader import load_config
from tunelab.config.xtuner_convert import convert
from tunelab.errors import TunelabError

XTUNER = Path(__file__).parent / "fixtures" / "ecosystem" / "xtuner"
ALPACA_CFG = XTUNER / "internlm2_chat_1_8b_qlora_alpaca_e3.py"
CUSTOM_CFG = XTUNER / "internlm2_chat_1_8b_qlora_custom_sft_e1.py"


def test_mmengine_is_not_needed(tmp_path, monkeypatch):
    """The file is read, never imported: converting works where mmengine and XTuner cannot be imported."""
    for name in ("mmengine", "xtuner"):
        monkeypatch.setitem(sys.modules, name, None)  # `import mmengine` now raises ImportError, installed or not
    path, _ = convert(ALPACA_CFG, tmp_path / "mine.py")
    assert load_config(path).pretrained_model_name_or_path == "internlm/internlm2-chat-1_8b"


def test_train_on_an_xtuner_config_says_what_it_is(capsys):
    assert main(["train", str(ALPACA_CFG)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is an XTuner (mmengine) config" in err and "mmengine'" not in err
    assert f"tunelab convert xtuner-config {ALPACA_CFG} internlm2_chat_1_8b_qlora_alpaca_e3_tunelab.py" in err
    with pytest.raises(TunelabError, match="XTuner"):
        load_config(ALPACA_CFG)


def test_alpaca_qlora_config_converts(tmp_path, capsys):
    out = tmp_path / "mine.py"
    assert main(["convert", "xtuner-config", str(ALPACA_CFG), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    cfg = load_config(out)
    assert (cfg.pretrained_model_name_or_path, cfg.method, cfg.quant_bits) == ("internlm/internlm2-chat-1_8b",
                                                                               "qlora", None)
    assert (cfg.data_path, cfg.data_format, cfg.prompt_template) == ("tatsu-lab/alpaca", "alpaca", "internlm2_chat")
    assert cfg.SYSTEM.startswith("Below is an instruction that describes a task.")
    assert (cfg.max_length, cfg.pack_to_max_length, cfg.batch_size, cfg.accumulative_counts) == (2048, True, 1, 16)
    assert (cfg.lr, cfg.max_epochs, cfg.betas, cfg.weight_decay, cfg.max_norm, cfg.warmup_ratio) == \
        (2e-4, 3, (0.9, 0.999), 0.0, 1.0, 0.03)
    # XTuner counts iterations (micro-batches): its checkpoint hook's 500 and EvaluateChatHook's 500 are 500 / 16
    # optimiser steps, its logger's 10 one step
    assert (cfg.save_steps, cfg.save_total_limit, cfg.evaluation_freq, cfg.logging_steps) == (32, 2, 32, 1)
    assert cfg.evaluation_inputs == ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_bias) == (64, 16, 0.1, "none")
    text = out.read_text()
    assert text.startswith("# tunelab config: mine\n# converted from the XTuner config")
    assert "PART 1  Settings" in text and "--deepspeed zero2" in text and "SYSTEM: XTuner uses it for evaluation" in text
    # XTuner's whole file, PART 5 (hooks, env_cfg, visualizer) included, carries over but for its random seed:
    # randomness = dict(seed=None) draws a new seed each run, tunelab seeds every run with a number
    assert "# Not carried over (set these by hand if you need them):\n#   - randomness.seed = None: " in text
    assert "#   - nothing\n" not in text and cfg.seed == 0
    # the header's note on XTuner's optim_type names the optimizer the file sets
    assert cfg.optimizer == "adamw_8bit" and "optim_type: XTuner's AdamW keeps 32-bit states; this config sets " \
        "optimizer = 'adamw_8bit'" in text


@pytest.mark.parametrize("randomness, seed, lost", [("dict(seed=None, deterministic=False)", 0, True),
                                                    ("dict(deterministic=False)", 0, True),
                                                    ("dict(seed=42, deterministic=False)", 42, False)])
def test_xtuners_random_seed_is_said_not_to_carry_over(tmp_path, randomness, seed, lost):
    """mmengine draws a random seed for each run when randomness.seed is None (or not given); tunelab has no such
    setting, so the written config's seed is a number and its header says the random seed did not carry over."""
    out = tmp_path / "mine.py"
    assert main(["convert", "xtuner-config", str(_xtuner(tmp_path, rest=f"randomness = {randomness}\n")),
                 str(out)]) == 0
    text = out.read_text()
    assert load_config(out).seed == seed
    assert ("randomness.seed = None: XTuner draws a new random seed for each run" in text) == lost, text[:1500]
    assert ("--seed" in text.split("Carried over, but")[0]) == lost


def test_optim_type_of_a_full_config_becomes_torchs_adamw_as_its_note_says(tmp_path):
    source = _xtuner(tmp_path, "optim_type = AdamW\n")
    out = tmp_path / "mine.py"
    assert main(["convert", "xtuner-config", str(source), str(out)]) == 0
    assert load_config(out).optimizer == "adamw"
    assert "optim_type: optimizer = 'adamw' (torch's AdamW, as XTuner's)" in out.read_text()


def test_custom_sft_config_reads_its_json_files_as_messages(tmp_path):
    path, migration = convert(CUSTOM_CFG, tmp_path / "custom.py")
    cfg = load_config(path)
    assert (cfg.data_path, cfg.data_format, cfg.max_epochs, cfg.SYSTEM) == ("/path/to/json/file.json", "messages",
                                                                             1, "")
    with pytest.raises(TunelabError, match="already exists"):
        convert(CUSTOM_CFG, path)


def test_what_cannot_carry_over_is_listed_and_a_local_map_fn_is_copied(tmp_path):
    source = tmp_path / "xtuner_cfg.py"
    source.write_text(textwrap.dedent('''\
        from datasets import load_dataset
        from mmengine.dataset import DefaultSampler
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM
        from xtuner.dataset import process_hf_dataset
        from xtuner.dataset.map_fns import template_map_fn_factory
        from xtuner.model import SupervisedFinetune
        from xtuner.utils import PROMPT_TEMPLATE

        #######################################################################
        #                          PART 1  Settings                           #
        #######################################################################
        pretrained_model_name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
        prompt_template = PROMPT_TEMPLATE.moss_sft
        max_length = int(4096 / 2)
        sequence_parallel_size = 2
        batch_size = 2
        accumulative_counts = 4
        accumulative_counts *= sequence_parallel_size
        lr = 1e-5
        my_setting = 3

        def my_map_fn(example):
            return {"conversation": [{"input": example["q"], "output": example["a"]}]}

        #######################################################################
        #                      PART 2  Model & Tokenizer                      #
        #######################################################################
        model = dict(type=SupervisedFinetune, llm=dict(type=AutoModelForCausalLM.from_pretrained,
                                                       pretrained_model_name_or_path=pretrained_model_name_or_path))
        first = dict(type=process_hf_dataset, dataset=dict(type=load_dataset, path="json", data_files="a.jsonl"),
                     dataset_map_fn=my_map_fn,
                     template_map_fn=dict(type=template_map_fn_factory, template=prompt_template))
        second = dict(type=process_hf_dataset, dataset=dict(type=load_dataset, path="json", data_files="b.jsonl"),
                      dataset_map_fn=my_map_fn)
        train_dataloader = dict(batch_size=batch_size, dataset=dict(type="ConcatDataset", datasets=[first, second]),
                                sampler=dict(type=DefaultSampler, shuffle=True))
        '''))
    path, migration = convert(source, tmp_path / "out.py")
    lost = "\n".join(migration.not_carried)
    assert "prompt_template = PROMPT_TEMPLATE.moss_sft: tunelab has no template of that name; 'hf'" in lost
    assert "sequence_parallel_size" not in lost and "my_setting = 3: no tunelab setting" in lost
    cfg = load_config(path)
    assert (cfg.method, cfg.max_length, cfg.accumulative_counts, cfg.lr, cfg.prompt_template) == \
        ("full", 2048, 8, 1e-5, "hf")
    assert cfg.sequence_parallel_size == 2  # each row over 2 GPUs, as in XTuner
    # both datasets are read with my_map_fn, which the config applies to every entry
    assert cfg.data_path == [{"path": "a.jsonl", "format": "conversation"},
                             {"path": "b.jsonl", "format": "conversation"}]
    assert cfg.dataset_map_fn({"q": "hi", "a": "yo"}) == {"conversation": [{"input": "hi", "output": "yo"}]}
    assert "  - my_setting = 3: no tunelab setting of that name" in path.read_text()


def test_llava_configs_are_named_not_converted(tmp_path):
    source = tmp_path / "llava.py"
    source.write_text("from xtuner.model import LLaVAModel\nmodel = dict(type=LLaVAModel, freeze_llm=True)\n")
    with pytest.raises(TunelabError, match=r"an XTuner LLaVAModel config.*list-cfg -p llava"):
        convert(source, tmp_path / "out.py")


# --- fuzzing findings ---------------------------------------------------------------------------------

HEAD = '''\
from datasets import load_dataset
from mmengine.hooks import CheckpointHook, LoggerHook
from transformers import AutoModelForCausalLM
from xtuner.dataset import process_hf_dataset
from xtuner.engine.hooks import DatasetInfoHook, EvaluateChatHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
pretrained_model_name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
lr = 2e-4
batch_size = 1
accumulative_counts = 4
'''
MIDDLE = '''
#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
model = dict(type=SupervisedFinetune, llm=dict(type=AutoModelForCausalLM.from_pretrained,
                                               pretrained_model_name_or_path=pretrained_model_name_or_path))
'''


def _xtuner(tmp_path, part1: str = "", rest: str = "", *, map_fn: str = "alpaca_map_fn", name: str = "xt.py") -> Path:
    imports = f"from xtuner.dataset.map_fns import {map_fn}\n" if map_fn.endswith("_map_fn") else ""
    data = (f"train_dataloader = dict(batch_size=batch_size, dataset=dict(type=process_hf_dataset, "
            f"dataset=dict(type=load_dataset, path='json', data_files='data.jsonl'), dataset_map_fn={map_fn}))\n")
    path = tmp_path / name
    path.write_text(imports + HEAD + textwrap.dedent(part1) + MIDDLE + data + textwrap.dedent(rest), encoding="utf-8")
    return path


def test_convert_refuses_to_write_over_the_xtuner_config(tmp_path, capsys):
    source = _xtuner(tmp_path)
    before = source.read_text()
    assert main(["convert", "xtuner-config", str(source), str(source), "--force"]) == 2
    assert "is the XTuner config being converted" in capsys.readouterr().err
    (tmp_path / "link.py").symlink_to(source)
    with pytest.raises(TunelabError, match="is the XTuner config being converted"):
        convert(source, tmp_path / "link.py", force=True)
    with pytest.raises(TunelabError, match="is the XTuner config being converted"):
        convert(source, tmp_path / "." / "xt.py", force=True)
    assert source.read_text() == before


def test_out_that_is_a_folder_is_refused(tmp_path, capsys):
    source, folder = _xtuner(tmp_path), tmp_path / "out"
    folder.mkdir()
    for extra in ([], ["--force"]):
        assert main(["convert", "xtuner-config", str(source), str(folder), *extra]) == 2
        err = capsys.readouterr().err
        assert "is a folder; OUT is the config file to write" in err and "Traceback" not in err, err


@pytest.mark.parametrize("line,named", [('lr = "2e-4"', "lr = '2e-4' (line 17) must be a number"),
                                        ("batch_size = 0", "batch_size = 0 (line 17)")])
def test_an_invalid_value_is_named_in_the_xtuner_config_and_nothing_is_written(tmp_path, capsys, line, named):
    source, dest = _xtuner(tmp_path, line + "\n"), tmp_path / "strlr.py"
    for _ in range(2):  # the second run says the same, not "already exists"
        assert main(["convert", "xtuner-config", str(source), str(dest)]) == 2
        err = capsys.readouterr().err
        assert f"{source}: {named}" in err and "nothing was written" in err and "strlr.py" not in err, err
        assert not dest.exists()


def test_a_value_set_past_part1_is_named_where_it_is(tmp_path):
    source = _xtuner(tmp_path, rest="train_cfg = dict(type=TrainLoop, max_iters=-3)\n")
    with pytest.raises(TunelabError, match=r"train_cfg.max_iters = -3 \(line \d+\), tunelab's 'max_steps',"):
        convert(source, tmp_path / "out.py")


@pytest.mark.parametrize("line", ["lr = 9 ** 9 ** 9", 'max_length = "x" * 10 ** 10', "lr = 2.0 ** 99999"])
def test_huge_literals_are_left_unevaluated_not_computed(tmp_path, line):
    import signal

    def too_slow(*_):
        raise TimeoutError("the converter hung evaluating a literal")

    signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(10)
    try:
        source = _xtuner(tmp_path, line + "\n")
        try:
            _, migration = convert(source, tmp_path / "out.py")
            key = line.split()[0]
            assert any(entry.startswith(f"{key} = ") for entry in migration.not_carried)
        except TunelabError as exc:  # a Ref where a number must be: named, not computed
            assert "line 17" in str(exc)
    finally:
        signal.alarm(0)


def test_settings_past_part1_carry_over_or_are_listed(tmp_path):
    """train_cfg's max_iters, the checkpoint hook, a DeepSpeed strategy, EvaluateChatHook's literals: what XTuner
    runs, in optimiser steps (XTuner counts iterations, accumulative_counts of them a step)."""
    source = _xtuner(tmp_path, rest='''\
        train_cfg = dict(type=TrainLoop, max_iters=300)
        default_hooks = dict(logger=dict(type=LoggerHook, interval=10))
        default_hooks["checkpoint"] = dict(type=CheckpointHook, by_epoch=False, interval=100, max_keep_ckpts=5)
        custom_hooks = [dict(type=DatasetInfoHook),
                        dict(type=EvaluateChatHook, system="Be brief.", evaluation_inputs=["hi?"], every_n_iters=40,
                             max_new_tokens=64, evaluation_images="a.png"),
                        dict(type="MyProfilerHook")]
        strategy = dict(type="DeepSpeedStrategy", config=dict(zero_optimization=dict(
            stage=3, offload_optimizer=dict(device="cpu"))))
        load_from = "work_dirs/old/iter_100.pth"
        my_extra = dict(a=1)
        for i in range(3):
            pass
        ''')
    path, migration = convert(source, tmp_path / "out.py")
    cfg = load_config(path)
    assert (cfg.max_steps, cfg.save_steps, cfg.save_total_limit, cfg.logging_steps) == (75, 25, 5, 3)
    assert (cfg.SYSTEM, cfg.evaluation_inputs, cfg.evaluation_freq, cfg.eval_max_new_tokens) == \
        ("Be brief.", ["hi?"], 10, 64)
    assert cfg.deepspeed == "zero3_offload"
    lost = "\n".join(migration.not_carried)
    for text in ("EvaluateChatHook evaluation_images = 'a.png'", "MyProfilerHook", "load_from = 'work_dirs/old",
                 "my_extra = {'a': 1} (line", "`for i in range(3):` (not read)"):
        assert text in lost, (text, lost)
    assert "max_iters = 300 counts iterations" in "\n".join(migration.notes)
    assert "nothing" not in path.read_text().split("Carried over")[0]


def test_xtuners_oasst1_map_fn_is_written_into_the_config(tmp_path):
    source = _xtuner(tmp_path, map_fn="oasst1_map_fn")
    path, migration = convert(source, tmp_path / "out.py")
    cfg = load_config(path)
    assert cfg.data_format == "conversation"
    record = {"text": "### Human: Can you explain X?### Assistant: Sure, X is Y.### Human: And Z?"}
    assert cfg.dataset_map_fn(record) == {"conversation": [{"input": "Can you explain X?", "output": "Sure, X is Y."}]}
    assert not any("oasst1" in line for line in migration.not_carried)


def test_an_unknown_map_fn_becomes_a_stub_that_stops_on_the_first_record(tmp_path):
    source = _xtuner(tmp_path, map_fn="fancy_map_fn")
    path, migration = convert(source, tmp_path / "out.py")
    cfg = load_config(path)
    assert cfg.data_format == "conversation"  # not 'auto', which read guanaco text as pretraining text
    with pytest.raises(NotImplementedError, match="copy XTuner's fancy_map_fn"):
        cfg.dataset_map_fn({"text": "### Human: hi ### Assistant: yo"})
    assert any("stub fancy_map_fn that stops" in line for line in migration.not_carried)


def test_a_copied_map_fn_keeps_its_imports_helpers_and_constants(tmp_path):
    source = _xtuner(tmp_path, '''\
        import re
        from json import loads as _loads
        _SEP = "|"

        def _clean(text):
            return re.sub(r"\\s+", " ", text).strip()

        def my_map_fn(example):
            meta = _loads(example["meta"])
            return {"conversation": [{"input": _clean(example["q"]) + _SEP + meta["k"], "output": example["a"]}]}
        ''', map_fn="my_map_fn")
    path, _ = convert(source, tmp_path / "out.py")
    cfg = load_config(path)
    assert cfg.dataset_map_fn({"q": " a   b ", "a": "yo", "meta": '{"k": "v"}'}) == \
        {"conversation": [{"input": "a b|v", "output": "yo"}]}


def test_datasets_with_different_map_fns_are_refused_naming_them(tmp_path):
    source = _xtuner(tmp_path, '''\
        def my_map_fn(example):
            return {"conversation": [{"input": example["q"], "output": example["a"]}]}
        ''', rest='''\
        from xtuner.dataset.map_fns import alpaca_map_fn
        first = dict(type=process_hf_dataset, dataset=dict(type=load_dataset, path="json", data_files="a.jsonl"),
                     dataset_map_fn=my_map_fn)
        second = dict(type=process_hf_dataset, dataset=dict(type=load_dataset, path="tatsu-lab/alpaca"),
                      dataset_map_fn=alpaca_map_fn)
        train_dataloader = dict(batch_size=batch_size, dataset=dict(type="ConcatDataset", datasets=[first, second]))
        ''', map_fn="my_map_fn")
    with pytest.raises(TunelabError, match=r"different map functions \(a.jsonl: my_map_fn; tatsu-lab/alpaca: none\)"):
        convert(source, tmp_path / "out.py")
    assert not (tmp_path / "out.py").exists()
