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
    assert (cfg.save_steps, cfg.save_total_limit, cfg.evaluation_freq) == (500, 2, 500)
    assert cfg.evaluation_inputs == ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_bias) == (64, 16, 0.1, "none")
    text = out.read_text()
    assert text.startswith("# tunelab config: mine\n# converted from the XTuner config")
    assert "PART 1  Settings" in text and "--deepspeed zero2" in text and "SYSTEM: XTuner uses it for evaluation" in text


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
        from xtuner.dataset.map_fns import oasst1_map_fn, template_map_fn_factory
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
        second = dict(type=process_hf_dataset, dataset=dict(type=load_dataset, path="timdettmers/openassistant-guanaco"),
                      dataset_map_fn=oasst1_map_fn)
        train_dataloader = dict(batch_size=batch_size, dataset=dict(type="ConcatDataset", datasets=[first, second]),
                                sampler=dict(type=DefaultSampler, shuffle=True))
        '''))
    path, migration = convert(source, tmp_path / "out.py")
    lost = "\n".join(migration.not_carried)
    assert "prompt_template = PROMPT_TEMPLATE.moss_sft: tunelab has no template of that name; 'hf'" in lost
    assert "sequence_parallel_size" not in lost and "my_setting = 3: no tunelab setting" in lost
    assert "dataset_map_fn = oasst1_map_fn: XTuner's own function" in lost
    cfg = load_config(path)
    assert (cfg.method, cfg.max_length, cfg.accumulative_counts, cfg.lr, cfg.prompt_template) == \
        ("full", 2048, 8, 1e-5, "hf")
    assert cfg.sequence_parallel_size == 2  # each row over 2 GPUs, as in XTuner
    assert cfg.data_path == [{"path": "a.jsonl", "format": "conversation"},
                             {"path": "timdettmers/openassistant-guanaco", "format": "auto"}]
    assert cfg.dataset_map_fn({"q": "hi", "a": "yo"}) == {"conversation": [{"input": "hi", "output": "yo"}]}
    assert "  - my_setting = 3: no tunelab setting of that name" in path.read_text()


def test_llava_configs_are_named_not_converted(tmp_path):
    source = tmp_path / "llava.py"
    source.write_text("from xtuner.model import LLaVAModel\nmodel = dict(type=LLaVAModel, freeze_llm=True)\n")
    with pytest.raises(TunelabError, match=r"an XTuner LLaVAModel config.*list-cfg -p llava"):
        convert(source, tmp_path / "out.py")
