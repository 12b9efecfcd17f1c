"""report_to: one CPU training of the tiny model reports to every tracker installed here, and each is read back with
its own library in its offline / local mode (TensorBoard event files, wandb offline run files, an MLflow file store,
swanlab offline files): the numbers are those of train_log.jsonl, the settings are there. A tracker whose package is
not installed is skipped, saying so. Also: run.json says how a run ended."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from tests.train_helpers import assert_one_line_error, identity_rows, tiny_cfg, write_config
from tunelab.train.loop import train

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "swanlab": "swanlab"}
INSTALLED = [name for name in PACKAGES if importlib.util.find_spec(name) is not None]


def _need(name: str):
    if name not in INSTALLED:
        beside = " (scripts/test.sh runs it again with swanlab and its protobuf 6)" if name == "swanlab" else ""
        pytest.skip(f"{PACKAGES[name]} is not installed (pip install {PACKAGES[name]}); its tracker is untested "
                    f"here{beside}")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _train(model_dir, tokenizer, work_dir, report_to, **overrides):
    cfg = tiny_cfg(model_dir, max_steps=4, logging_steps=1, report_to=report_to, **overrides)
    rows = identity_rows(tokenizer)
    train(cfg, work_dir, train_rows=rows, eval_rows=rows[:4], device="cpu")
    return cfg


@pytest.fixture(scope="module")
def tracked(tiny_llama_dir, tokenizer, tmp_path_factory):
    """The work dir of one run that reported to every installed tracker, each writing locally."""
    root = tmp_path_factory.mktemp("tracked")
    work_dir = root / "run1"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_PROJECT", "tunelab-test")
        env.setenv("MLFLOW_TRACKING_URI", f"file:{root / 'mlruns'}")
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store for local use behind this
        env.setenv("MLFLOW_EXPERIMENT_NAME", "tunelab-test")
        env.setenv("SWANLAB_MODE", "offline")
        env.setenv("SWANLAB_PROJECT_NAME", "tunelab-test")
        _train(tiny_llama_dir, tokenizer, work_dir, INSTALLED, evaluation_freq=2)
        if "wandb" in INSTALLED:
            import wandb

            wandb.teardown()  # wandb's service process writes the run file on its own time: wait, as exit does
    return work_dir


def _logged(work_dir: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (work_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def test_tensorboard_gets_the_log_and_the_settings(tracked, tiny_llama_dir):
    _need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert loss == pytest.approx(_logged(tracked, "loss"), rel=1e-6) and sorted(loss) == [1, 2, 3, 4]
    assert {e.step for e in events.Scalars("eval/loss")} == {0, 2, 4}
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/memory_gb"} <= set(events.Tags()["scalars"])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "pretrained_model_name_or_path" in config_text and str(tiny_llama_dir) in config_text


def test_use_tensorboard_still_means_tensorboard():
    from tunelab.config.schema import TrainConfig

    assert TrainConfig(use_tensorboard=True).resolved_report_to() == ["tensorboard"]
    assert TrainConfig(use_tensorboard=True, report_to=["wandb", "tensorboard"]).resolved_report_to() == \
        ["wandb", "tensorboard"]


def _wandb_records(run_file: Path):
    """The protobuf records of a wandb run file: W&B's 7-byte header, then a LevelDB log (32 KiB blocks of records
    with a 7-byte header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # too little room left in the block for a header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_files_hold_the_log_and_the_settings(tracked, tiny_llama_dir):
    _need("wandb")
    run_files = list((tracked / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    history, config, run = {}, {}, None
    for record in _wandb_records(run_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
        elif kind == "run":
            run = record.run
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert run.project == "tunelab-test" and run.display_name == tracked.name
    assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} == pytest.approx(
        _logged(tracked, "loss"))
    assert {s for s, h in history.items() if "eval/loss" in h} == {0, 2, 4}
    assert config["pretrained_model_name_or_path"] == str(tiny_llama_dir) and config["method"] == "full"


def test_mlflow_file_store_holds_the_log_and_the_settings(tracked, tiny_llama_dir):
    _need("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tracked.parent / 'mlruns'}")
    experiment = client.get_experiment_by_name("tunelab-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run1" and run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(_logged(tracked, "loss"))
    assert {m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")} == {0, 2, 4}
    assert run.data.params["pretrained_model_name_or_path"] == str(tiny_llama_dir)
    assert run.data.params["max_steps"] == "4"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["resolved_config.py"]


def test_swanlab_offline_files_hold_the_log_and_the_settings(tracked, tiny_llama_dir):
    _need("swanlab")  # skipped only without swanlab: scripts/test.sh runs this file again with it to test this
    try:  # swanlab's own reader of its offline run files (what `swanlab sync` uploads)
        from swanlab.proto.swanlab.record.v1.record_pb2 import Record
        from swanlab.sdk.internal.core_python.store import DataStoreReader
    except ImportError as exc:  # a failure, not a skip: a skip here would go unnoticed for every later version
        import swanlab

        pytest.fail(f"swanlab {getattr(swanlab, '__version__', '?')} moved its offline-file reader; update where "
                    f"this test imports it from: {exc}")
    import yaml

    (run_dir,) = (tracked / "swanlog").glob("run-*")
    reader = DataStoreReader()
    reader.open(next(run_dir.glob("run-*.swanlab")))
    loss, start = {}, None
    for raw in reader:
        record = Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "scalar" and record.scalar.key == "train/loss":
            loss[record.scalar.step] = record.scalar.value.number
        elif kind == "start":
            start = record.start
    reader.close()
    assert start.project == "tunelab-test" and start.name == tracked.name
    assert loss == pytest.approx(_logged(tracked, "loss"))
    config = yaml.safe_load((run_dir / "files" / "config.yaml").read_text())
    assert config["pretrained_model_name_or_path"]["value"] == str(tiny_llama_dir)


def test_a_missing_tracker_package_is_named_before_training(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """`tunelab train` names the missing package before minutes of loading the model, not when the trackers open."""
    import tunelab.model.load as load
    from tunelab.cli.main import main
    from tunelab.errors import TunelabError
    from tunelab.train import trackers

    find_spec, load_model, loaded = importlib.util.find_spec, load.load_model_for_training, []

    def loading(*args, **kwargs):
        loaded.append(args)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "wandb" else
                        find_spec(name, *a, **k))  # wandb looks not installed; everything else as it is
    monkeypatch.setattr(load, "load_model_for_training", loading)
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path, tiny_llama_dir, max_steps=1, report_to=["wandb"])
    code = main(["train", str(config), "--work-dir", str(tmp_path / "work"), "--device", "cpu"])
    assert_one_line_error(capsys, code, "'wandb'", "pip install wandb")
    assert not loaded  # the trackers open after loading and would name it too, but only then
    with pytest.raises(TunelabError, match="unknown tracker 'neptune'"):
        trackers.check_installed(["neptune"])


@pytest.mark.parametrize("uri", [None, "sqlite:///runs.db"])
def test_mlflow_on_a_database_store_without_sqlalchemy_is_named_before_training(uri, tmp_path, monkeypatch):
    """mlflow-skinny (the install docs/TRAINING.md offers) has no sqlalchemy, so it cannot open a database store, and
    mlflow 3's default store, with MLFLOW_TRACKING_URI unset, is sqlite:///mlflow.db: the run stopped with mlflow's
    traceback after loading the model. It is one line before loading, naming the two fixes."""
    _need("mlflow")
    from tunelab.errors import TunelabError
    from tunelab.train import trackers

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "sqlalchemy" else
                        find_spec(name, *a, **k))  # mlflow-skinny as it installs: no sqlalchemy
    monkeypatch.chdir(tmp_path)
    if uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TunelabError, match=r"report_to includes 'mlflow'.*sqlite:.*pip install mlflow\b.*"
                                           r"MLFLOW_TRACKING_URI"):
        trackers.check_installed(["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")  # a store mlflow-skinny opens
    trackers.check_installed(["mlflow"])


def test_report_to_is_checked_in_the_config_file(tmp_path):
    from tunelab.config.loader import load_config
    from tunelab.errors import TunelabError

    path = tmp_path / "cfg.py"
    path.write_text("report_to = ['wandb', 'comet']\n")
    with pytest.raises(TunelabError, match=r"report_to.*line 1.*'tensorboard', 'wandb', 'mlflow', 'swanlab'"):
        load_config(path)


def test_run_json_says_finished_failed_and_crashed(tracked, tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    from tunelab.train.run_status import read_status

    status = read_status(tracked)
    assert status["state"] == "finished" and status["total_steps"] == 4
    assert status["settings"]["pretrained_model_name_or_path"] == str(tiny_llama_dir)

    # an error inside the loop (a token id the model's vocabulary does not have): failed, with the error
    bad_row = {"input_ids": [1, 10**6, 2], "labels": [-100, 10**6, 2], "position_ids": [0, 1, 2]}
    with pytest.raises(IndexError):
        train(tiny_cfg(tiny_llama_dir, max_steps=2), tmp_path / "bad", train_rows=[bad_row] * 4, device="cpu")
    failed = read_status(tmp_path / "bad")
    assert failed["state"] == "failed" and failed["error"].startswith("IndexError")

    # a process killed without a word leaves "running" with a pid that is gone: read back as crashed
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "run.json").write_text(json.dumps({**status, "state": "running", "pid": child.pid}))
    assert read_status(tmp_path / "killed")["state"] == "crashed"


def test_run_json_says_stopped_when_the_loop_ends_early_without_an_error(tmp_path):
    from tunelab.train.progress import TrainingMonitor
    from tunelab.train.run_status import read_status

    monitor = TrainingMonitor(tmp_path, total_steps=4, start_step=0, settings={"lr": 1e-3})
    assert read_status(tmp_path)["state"] == "running" and read_status(tmp_path)["settings"] == {"lr": 1e-3}
    monitor.write({"step": 2, "loss": 1.0})
    monitor.close()  # SIGINT / SIGTERM: the loop saves and returns at step 2 of 4
    assert read_status(tmp_path)["state"] == "stopped"
