"""The torchrun launcher, DeepSpeed config building, and the refusals made before any weight is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError
from tunelab.train import launch
from tunelab.train.deepspeed_configs import build_deepspeed_config
from tunelab.train.distributed import DistEnv, validate_distributed

LAUNCH_VARS = ["NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"]


@pytest.fixture
def fake_run(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []

    def run(cmd, check=False):
        calls.append(cmd)
        return SimpleNamespace(returncode=3)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_env_var_starts_torchrun_with_same_args_minus_nproc(fake_run, monkeypatch):
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    code = launch.maybe_relaunch(["train", "cfg.py", "--work-dir", "w", "--deepspeed", "zero2"])
    assert code == 3  # torchrun's exit code is ours
    assert fake_run == [[sys.executable, "-m", "tunelab.train.launch", "--nproc-per-node", "2", "--standalone",
                         "-m", "tunelab", "train", "cfg.py", "--work-dir", "w", "--deepspeed", "zero2"]]


def test_flag_and_multi_node_settings(fake_run, monkeypatch):
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("ADDR", "10.0.0.1")
    monkeypatch.setenv("PORT", "12345")
    launch.maybe_relaunch(["train", "cfg.py", "--nproc-per-node=4", "--fsdp"])
    assert fake_run[0][3:] == ["--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1",
                               "--master-addr", "10.0.0.1", "--master-port", "12345",
                               "-m", "tunelab", "train", "cfg.py", "--fsdp"]


def test_flag_wins_over_environment(fake_run, monkeypatch):
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    launch.maybe_relaunch(["train", "cfg.py", "--nproc_per_node", "2"])
    assert fake_run[0][4] == "2" and "--nproc_per_node" not in fake_run[0]


def test_one_process_or_inside_torchrun_does_not_relaunch(fake_run, monkeypatch):
    assert launch.maybe_relaunch(["train", "cfg.py"]) is None
    assert launch.maybe_relaunch(["train", "cfg.py", "--nproc-per-node", "1"]) is None
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")  # we are a worker torchrun started
    assert launch.maybe_relaunch(["train", "cfg.py"]) is None
    assert fake_run == []


def test_bad_launch_settings_are_refused_with_the_fix(fake_run, monkeypatch):
    monkeypatch.setenv("NPROC_PER_NODE", "two")
    with pytest.raises(TunelabError, match="NPROC_PER_NODE"):
        launch.maybe_relaunch(["train", "cfg.py"])
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("NNODES", "2")
    with pytest.raises(TunelabError, match="ADDR"):
        launch.maybe_relaunch(["train", "cfg.py"])
    assert fake_run == []


def test_settings_the_processes_cannot_run_stop_once_before_torchrun_starts(fake_run, monkeypatch, tmp_path,
                                                                             tiny_llama_dir, capsys):
    """The launching process checks the config and the sequence-parallel layout before torchrun starts any process:
    one message, not N copies of it from the processes followed by torchrun's failure report."""
    from tunelab.cli.main import main

    config = tmp_path / "cfg.py"
    config.write_text(f"pretrained_model_name_or_path = {str(tiny_llama_dir)!r}\nmethod = 'lora'\n"
                      "sequence_parallel_size = 4\n")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    assert main(["train", str(config), "--work-dir", str(tmp_path / "w")]) == 2
    assert "sequence_parallel_size = 4 with 2 processes" in capsys.readouterr().err
    monkeypatch.setenv("NPROC_PER_NODE", "3")
    config.write_text(config.read_text().replace("= 4", "= 3"))  # 3 groups' worth of processes; 4 heads
    assert main(["train", str(config), "--work-dir", str(tmp_path / "w")]) == 2
    assert "sequence_parallel_size = 3: the model has 4 attention heads" in capsys.readouterr().err
    config.write_text("batch_size = 0\n")
    assert main(["train", str(config), "--work-dir", str(tmp_path / "w")]) == 2
    assert "'batch_size' (line 1) must be a positive whole number" in capsys.readouterr().err
    assert fake_run == []
    config.write_text(f"pretrained_model_name_or_path = {str(tiny_llama_dir)!r}\nmethod = 'lora'\n"
                      "sequence_parallel_size = 2\n")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    assert main(["train", str(config), "--work-dir", str(tmp_path / "w")]) == 3  # launched: torchrun's exit code
    assert len(fake_run) == 1


def test_a_process_that_stops_ends_the_launch_with_its_exit_code_not_torchruns_traceback(monkeypatch, capsys):
    """A process that stops on a TunelabError (exit code 2) has printed its message: the launch ends with one line
    naming the rank (not torchrun's ChildFailedError traceback and failure table, which would bury the message), and
    its exit code is the process's."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failing(args):
        assert args == ["--nproc-per-node", "2", "-m", "tunelab", "train", "cfg.py"]
        raise ChildFailedError("tunelab", {1: ProcessFailure(local_rank=1, pid=99, exitcode=2, error_file="<N/A>")})

    monkeypatch.setattr(torchrun, "main", failing)
    assert launch.run_torchrun(["--nproc-per-node", "2", "-m", "tunelab", "train", "cfg.py"]) == 2
    err = capsys.readouterr().err
    assert "rank 1 stopped (exit code 2)" in err and "Traceback" not in err
    monkeypatch.setattr(torchrun, "main", lambda args: (_ for _ in ()).throw(ChildFailedError(
        "tunelab", {0: ProcessFailure(local_rank=0, pid=99, exitcode=-9, error_file="<N/A>")})))
    assert launch.run_torchrun([]) == 1
    # named (tests/train_helpers.train_on_ranks tells gloo's abort at shutdown by SIGABRT in stderr)
    assert "rank 0 was killed by SIGKILL (signal 9)" in capsys.readouterr().err
    monkeypatch.setattr(torchrun, "main", lambda args: None)
    assert launch.run_torchrun([]) == 0


def test_a_message_several_ranks_hand_over_is_printed_once(monkeypatch, tmp_path, capsys):
    """Processes that stop on a TunelabError write the message to torchrun's error file (torchrun's layout, so
    torchrun started by hand shows it too) instead of printing it; the launcher prints each distinct message once."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    files = []
    for rank, message in enumerate(["error: data.jsonl line 2: not valid JSON", "error: data.jsonl line 2: not "
                                    "valid JSON", "error: rank 2's own trouble"]):
        files.append(tmp_path / f"error_{rank}.json")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(files[-1]))
        assert launch.report_to_launcher(message)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", "")  # torchrun without a log folder: print it yourself
    assert not launch.report_to_launcher("error: x")
    monkeypatch.delenv("LOCAL_RANK")
    failures = {rank: ProcessFailure(local_rank=rank, pid=9, exitcode=2, error_file=str(file))
                for rank, file in enumerate(files)}
    assert failures[0].message == {"message": "error: data.jsonl line 2: not valid JSON",
                                   "extraInfo": {"timestamp": failures[0].error_file_data["message"]["extraInfo"][
                                       "timestamp"]}}  # torchrun reads the file as its own
    monkeypatch.setattr(torchrun, "main", lambda args: (_ for _ in ()).throw(ChildFailedError("tunelab", failures)))
    assert launch.run_torchrun([]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: data.jsonl line 2: not valid JSON", "error: rank 2's own trouble",
                   "tunelab: ranks 0, 1, 2 stopped (exit code 2) on the errors above."]
    # the rank torchrun stopped with SIGTERM after rank 0 failed, listed with the same second's timestamp: still
    # rank 0's message, not "rank 1 was killed by SIGTERM"
    stopped = ProcessFailure(local_rank=1, pid=9, exitcode=-15, error_file="<N/A>")
    first = ProcessFailure(local_rank=0, pid=8, exitcode=2, error_file=str(files[0]))
    stopped.timestamp = first.timestamp
    monkeypatch.setattr(torchrun, "main", lambda args: (_ for _ in ()).throw(ChildFailedError(
        "tunelab", {1: stopped, 0: first})))
    assert launch.run_torchrun([]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: data.jsonl line 2: not valid JSON",
                                                    "tunelab: rank 0 stopped (exit code 2) on the error above."]
    stopped.timestamp -= 1  # even when torchrun timed it first
    assert launch.run_torchrun([]) == 2
    # a rank that handed over the same message and was stopped by torchrun's SIGTERM before it exited (seen with
    # NPROC_PER_NODE=2 and a misspelt lora target): the exit code is the error's (2), not -15 (which the shell saw
    # as 241)
    capsys.readouterr()
    handed_over = ProcessFailure(local_rank=1, pid=9, exitcode=-15, error_file=str(files[1]))
    handed_over.timestamp = first.timestamp - 1
    monkeypatch.setattr(torchrun, "main", lambda args: (_ for _ in ()).throw(ChildFailedError(
        "tunelab", {1: handed_over, 0: first})))
    assert launch.run_torchrun([]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: data.jsonl line 2: not valid JSON",
                                                    "tunelab: ranks 0, 1 stopped (exit code 2) on the error above."]
    monkeypatch.setattr(torchrun, "main", lambda args: (_ for _ in ()).throw(ChildFailedError(
        "tunelab", {1: handed_over})))  # the only one to say why: a setting's error all the same
    assert launch.run_torchrun([]) == 2
    capsys.readouterr()
    killed = ProcessFailure(local_rank=1, pid=9, exitcode=-9, error_file="<N/A>")  # out of memory: the cause
    monkeypatch.setattr(torchrun, "main", lambda args: (_ for _ in ()).throw(ChildFailedError(
        "tunelab", {1: killed, 0: first})))
    assert launch.run_torchrun([]) == 1
    assert "rank 1 was killed by SIGKILL" in capsys.readouterr().err


# --- DeepSpeed config -------------------------------------------------------------------------------

def test_preset_takes_batch_accumulation_clipping_and_precision_from_config():
    cfg = TrainConfig(deepspeed="zero3_offload", batch_size=2, accumulative_counts=8, max_norm=0.5)
    ds = build_deepspeed_config(cfg, precision="bf16", world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 64 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch AdamW steps the offloaded states


def test_json_file_keeps_its_values_and_fills_auto(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 2.0,
                                "fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}))
    cfg = TrainConfig(deepspeed=str(path), batch_size=3, max_norm=1.0)
    ds = build_deepspeed_config(cfg, precision="fp16", world_size=1)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_clipping"] == 2.0
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False


def test_unknown_preset_and_bad_json_name_the_fix(tmp_path):
    with pytest.raises(TunelabError, match="zero2_offload"):
        build_deepspeed_config(TrainConfig(deepspeed="zero4"), precision="bf16", world_size=1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(TunelabError, match=r"bad\.json:1"):
        build_deepspeed_config(TrainConfig(deepspeed=str(bad)), precision="bf16", world_size=1)


# --- refusals at start ------------------------------------------------------------------------------

CPU, GPU = DistEnv(world_size=2), DistEnv(world_size=2, device=__import__("torch").device("cuda", 0))


@pytest.mark.parametrize("settings, env, reason", [
    (dict(method="lora", fsdp=True, deepspeed="zero3"), CPU, "choose one"),
    (dict(method="qlora", fsdp=True), CPU, "bitsandbytes"),
    (dict(method="lora", fsdp=True, optimizer="adamw_8bit"), CPU, "optimizer = 'adamw'"),
    (dict(method="lora", fsdp=True), DistEnv(world_size=1), "fsdp = True in one process"),
    (dict(method="qlora", deepspeed="zero3"), GPU, "bnb_4bit_quant_storage"),
    (dict(method="full", deepspeed="zero2_offload"), CPU, "already on the CPU"),
    (dict(method="lora", deepspeed="zero3_offload", optimizer="paged_adamw_8bit"), GPU, "optimizer = 'adamw'"),
])
def test_unsupported_combinations_are_refused_with_the_reason(settings, env, reason):
    if settings.get("deepspeed") and not settings.get("fsdp"):  # the deepspeed checks start by importing it
        pytest.importorskip("deepspeed")
    with pytest.raises(TunelabError, match=reason):
        validate_distributed(TrainConfig(**settings), env)


@pytest.mark.parametrize("settings", [
    dict(method="full", fsdp=True), dict(method="lora", fsdp=True), dict(method="full"),
    dict(method="qlora", deepspeed="zero2"), dict(method="lora", deepspeed="zero3"),
])
def test_supported_combinations_pass(settings):
    if settings.get("deepspeed"):
        pytest.importorskip("deepspeed")
    validate_distributed(TrainConfig(**settings), DistEnv(world_size=2))


def test_missing_deepspeed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(TunelabError, match=r"pip install 'tunelab\[deepspeed\]'"):
        validate_distributed(TrainConfig(method="lora", deepspeed="zero2"), DistEnv(world_size=2))


def test_a_crash_under_torchrun_hands_its_traceback_to_the_launcher(monkeypatch, tmp_path, capsys):
    """A process torchrun started that crashes (not a TunelabError) writes its traceback to its error file and exits
    1 without printing it; outside torchrun the exception propagates as before."""
    from tunelab.cli import main as cli_main

    def crash(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(cli_main, "build_parser", lambda: SimpleNamespace(
        parse_args=lambda argv: SimpleNamespace(func=crash)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert cli_main.main([]) == 1
    assert capsys.readouterr().err == ""
    handed = json.loads((tmp_path / "error.json").read_text())["message"]["message"]
    assert handed.startswith("Traceback") and handed.endswith("an illegal memory access was encountered")
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cli_main.main([])


def test_an_error_file_that_cannot_be_written_whole_is_left_absent(monkeypatch, tmp_path):
    """A write that fails part-way (a full disk, the very error a rank may be stopping on) hands nothing over: the
    process prints its message itself, and torchrun finds no half-written file (which it cannot parse: the launcher
    itself would stop with a JSONDecodeError traceback instead of reporting the rank)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def dump_then_fail(data, file):
        file.write('{"message": {"mess')
        raise OSError(28, "No space left on device")

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr(launch.json, "dump", dump_then_fail)
    assert not launch.report_to_launcher("error: No space left on device")
    assert list(tmp_path.iterdir()) == []
    failure = ProcessFailure(local_rank=0, pid=9, exitcode=2, error_file=str(error_file))  # parses: no file
    assert launch._reported_message(failure) is None
