"""`NPROC_PER_NODE=2 tunelab train` end to end on CPU (gloo): two ranks train, checkpoint, and resume exactly.

LoRA dropout is on, so the resumed loss curve only matches if every rank gets back its own RNG state.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train_helpers import child_env, copy_stopped_after, logged_steps, train_on_ranks

CONFIG = """\
pretrained_model_name_or_path = {model!r}
method = "lora"
data_path = {data!r}
data_format = "conversation"
prompt_template = "qwen_chat"
max_length = 96
batch_size = 2
accumulative_counts = 2
lr = 1e-2
lr_scheduler = "constant"
warmup_ratio = 0.0
lora_r = 8
lora_alpha = 16
lora_dropout = 0.1
max_steps = 6
save_steps = 3
save_total_limit = -1
logging_steps = 1
evaluation_freq = 1000
evaluation_inputs = []
seed = 1
"""


def _assert_adapter_loads_trained(base_dir: Path, adapter_dir: Path) -> None:
    """Rank 0 wrote whole adapter weights (not its ZeRO-3 partition): peft loads them and lora_B has trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero


def _assert_engine_checkpoint_reads_back(checkpoint: Path) -> None:
    """DeepSpeed's own checkpoint (the optimizer/ folder, ZeRO partitions), consolidated in one process, holds the
    adapter weights rank 0 saved, under the names the model has."""
    from safetensors.torch import load_file

    from tunelab.train.deepspeed_engine import load_consolidated_state_dict

    whole = load_consolidated_state_dict(checkpoint / "optimizer")
    saved = load_file(checkpoint / "model" / "adapter_model.safetensors")
    assert saved
    for name, weight in saved.items():  # peft saves without the adapter's name
        key = name.replace(".lora_A.weight", ".lora_A.default.weight")
        key = key.replace(".lora_B.weight", ".lora_B.default.weight")
        torch.testing.assert_close(whole[key].float(), weight.float(), msg=name)


def _losses(work_dir: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in logged_steps(work_dir).items()}


@pytest.mark.parametrize("engine", ["ddp", pytest.param("zero3", marks=pytest.mark.slow)])
def test_two_ranks_train_and_resume_reproduces_the_curve(engine, tiny_llama_dir, tmp_path):
    from tunelab.data import self_cognition

    data = self_cognition.write(tmp_path / "data.json", name="Duo", author="tests", n=48)
    config = tmp_path / "two_ranks.py"
    text = CONFIG.format(model=str(tiny_llama_dir), data=str(data)) + "loraplus_lr_ratio = 4.0\n"  # resumed too
    if engine == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'tunelab[deepspeed]'")
        # every weight partitioned (the preset keeps weights under 1e6 elements, all of a tiny model's, whole)
        ds = tmp_path / "zero3.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
        text += f"deepspeed = {str(ds)!r}\n"
    config.write_text(text)

    proc = train_on_ranks(config, tmp_path / "run")
    assert proc.stdout.count("done: 6 steps") == 1, proc.stdout  # rank 0 speaks for all
    steps = [line for line in proc.stderr.splitlines() if line.startswith("step ")]  # piped: plain whole lines
    assert [line.split()[1] for line in steps] == [f"{i}/6" for i in range(1, 7)], proc.stderr
    assert all(" loss " in line and line.split()[-2] == "eta" for line in steps), steps
    assert proc.stderr.count("has no pad token") == 1, proc.stderr
    assert proc.stderr.count("Loading weights: 100%") == 1, proc.stderr  # transformers' loading bar
    full = _losses(tmp_path / "run")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "run" / "iter_3" / "rng_rank1.pt").is_file()  # rank 1 kept its own generators
    _assert_adapter_loads_trained(tiny_llama_dir, tmp_path / "run" / "iter_6" / "model")
    if engine == "zero3":
        _assert_engine_checkpoint_reads_back(tmp_path / "run" / "iter_6")

    # as if the run died after iter_3: resume on 2 ranks and compare every later loss
    resumed_dir = copy_stopped_after(tmp_path / "run", tmp_path / "resumed", step=3, later=6)
    train_on_ranks(config, resumed_dir, 2, "--resume", "auto")
    resumed = _losses(resumed_dir)
    for step in (4, 5, 6):
        assert abs(resumed[step] - full[step]) < 1e-6, (step, resumed[step], full[step])


def _preference_on_two_ranks_and_one(tiny_llama_dir, tmp_path, objective: str, records: list[dict],
                                     one_process: list[str], settings: str = "") -> tuple[dict, dict]:
    """({step: loss} of `objective` trained on 2 ranks with the reference precomputed, the same in one process with
    the adapters switched off and `one_process` overrides that give it the same global batches)."""
    data = tmp_path / f"{objective}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    text = CONFIG.format(model=str(tiny_llama_dir), data=str(data)).replace('data_format = "conversation"',
                                                                             f'objective = "{objective}"')
    text = text.replace("lora_dropout = 0.1", "lora_dropout = 0.0").replace("lr = 1e-2", "lr = 2e-3")
    config = tmp_path / f"{objective}.py"
    config.write_text(text + 'reference = "precomputed"\npack_to_max_length = False\n' + settings)
    train_on_ranks(config, tmp_path / "two")
    assert (tmp_path / "two" / "reference_logps_train.npz").is_file()

    from tunelab.config.loader import load_config
    from tunelab.train.loop import train

    one = load_config(config, ["reference=adapters_off", *one_process])
    single = train(one, tmp_path / "one", config_path=config, device="cpu").losses
    two = _losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4, 5, 6]
    return two, single


def test_two_ranks_train_dpo_as_one_process_does(tiny_llama_dir, tmp_path):
    """DPO on 2 ranks (the reference precomputed, each rank scoring half the rows) gives the curve of one process
    with the adapters switched off for the same global batches: pairs are counted over ranks, as tokens are."""
    from tests.train_helpers import WORDS

    pairs = [{"prompt": f"Tell me about the {WORDS[i % 15]}.", "chosen": f"Sure! The {WORDS[i % 15]} is lovely.",
              "rejected": f"No. {WORDS[(i * 7) % 15]}."} for i in range(32)]
    two, single = _preference_on_two_ranks_and_one(tiny_llama_dir, tmp_path, "dpo", pairs, ["accumulative_counts=4"])
    assert two[6] < two[1]
    for step in two:
        assert two[step] == pytest.approx(single[step], abs=1e-5), step
    last = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()][-1]
    assert last["accuracy"] > 0.5 and last["reward_margin"] > 0


def test_two_ranks_train_kto_with_the_kl_estimate_of_one_process(tiny_llama_dir, tmp_path):
    """KTO on 2 ranks: each rank's loss uses the KL estimate over both ranks' KL replies (as TRL gathers them), so
    2 ranks of 1 sample a micro-batch give the curve of one process with both samples in its micro-batch. A KL
    estimate of the rank's own sample alone gives another curve."""
    from tests.train_helpers import WORDS

    samples = [{"prompt": f"Tell me about the {WORDS[i % 15]}.",
                "completion": (f"Sure! The {WORDS[i % 15]} is lovely." if i % 2 else f"No. {WORDS[(i * 7) % 15]}."),
                "label": bool(i % 2)} for i in range(32)]
    two, single = _preference_on_two_ranks_and_one(tiny_llama_dir, tmp_path, "kto", samples, ["batch_size=2"],
                                                   "batch_size = 1\nbeta = 0.5\n")
    for step in two:
        assert two[step] == pytest.approx(single[step], abs=1e-5), step
    kl = {r["step"]: r["kl"] for r in logged_steps(tmp_path / "two", "kl").values()}
    assert len(kl) == 6 and any(v > 0 for v in kl.values())  # the estimate is in play, not clamped to 0 throughout


def test_an_error_every_rank_meets_is_printed_once(tiny_llama_dir, tmp_path):
    """A bad record is found inside the processes (each rank reads the data): the launch prints its message once,
    naming the ranks that stopped on it, not once per rank; the exit code is the processes' (2)."""
    import subprocess
    import sys

    data = tmp_path / "data.jsonl"
    data.write_text('{"conversation": [{"input": "hi", "output": "hello"}]}\n{"conversation": oops}\n')
    config = tmp_path / "bad_data.py"
    config.write_text(CONFIG.format(model=str(tiny_llama_dir), data=str(data)))
    env = child_env(NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(config), "--work-dir", str(tmp_path / "w"),
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    named = [line for line in proc.stderr.splitlines() if "data.jsonl" in line and "line 2" in line]
    assert len(named) == 1, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert "failed (exitcode" not in proc.stderr  # torchrun's own log line about it: the last line says it
    assert "rank" in proc.stderr.splitlines()[-1]


def test_deepspeed_in_one_process_trains_resumes_and_ends_its_process_group(tmp_path, tiny_llama_dir, capsys,
                                                                              monkeypatch):
    """`tunelab train CFG --deepspeed zero2` without a launcher (one GPU, as XTuner's tutorials run it) stopped in
    deepspeed.initialize ("Distributed backend is not initialized"): the engine starts a one-process group, and the
    run ends it again, with the LOCAL_RANK it set for DeepSpeed (left set, a next `tunelab train` in this process
    would take itself for a torchrun worker and start no ranks)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'tunelab[deepspeed]'")
    import json
    import os

    monkeypatch.delenv("LOCAL_RANK", raising=False)

    from tests.train_helpers import write_config
    from tunelab.cli.main import main

    config = write_config(tmp_path, tiny_llama_dir, max_steps=2, dtype="fp32", gradient_checkpointing=False)
    work = tmp_path / "w"
    assert main(["train", str(config), "--work-dir", str(work), "--device", "cpu", "--deepspeed", "zero2"]) == 0
    assert not torch.distributed.is_initialized()
    assert "LOCAL_RANK" not in os.environ
    longer = config.with_name("longer.py")
    longer.write_text(config.read_text().replace("max_steps = 2", "max_steps = 3"))
    assert main(["train", str(longer), "--work-dir", str(work), "--device", "cpu", "--deepspeed", "zero2",
                 "--resume", "auto"]) == 0
    assert not torch.distributed.is_initialized()
    steps = [json.loads(line)["step"] for line in (work / "train_log.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3]
    # a checkpoint whose optimiser state does not fit (its record edited to say LoRA+ was on) stops the resume,
    # and the group goes with it: the next run in this process starts its own
    meta_file = work / "iter_3" / "tunelab.json"
    meta = json.loads(meta_file.read_text())
    meta["run"]["settings"]["loraplus_lr_ratio"] = 16.0
    meta_file.write_text(json.dumps(meta))
    lora_plus = config.with_name("loraplus.py")
    lora_plus.write_text(longer.read_text().replace("max_steps = 3", "max_steps = 4") + "loraplus_lr_ratio = 16.0\n")
    capsys.readouterr()
    code = main(["train", str(lora_plus), "--work-dir", str(work), "--device", "cpu", "--deepspeed", "zero2",
                 "--resume", "auto"])
    assert code == 2 and "its optimiser state does not fit" in capsys.readouterr().err
    assert not torch.distributed.is_initialized() and "LOCAL_RANK" not in os.environ
