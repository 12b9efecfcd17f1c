"""Experiment trackers: the numbers of train_log.jsonl and the run's settings, sent where the user already looks.

`report_to = ["tensorboard", "wandb", "mlflow", "swanlab"]` (any subset) in the config. Each tracker gets every
record the JSONL log gets (train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/memory_gb, ...,
eval/loss) at its step, and the settings once. Only the main process reports (the monitor is off elsewhere).

Where each one writes is left to the library's own settings, so what users already set keeps working:

* tensorboard: WORK_DIR/tensorboard (event files; `tensorboard --logdir WORK_DIR`).
* wandb: project $WANDB_PROJECT (default "tunelab"), run files under WORK_DIR/wandb; `WANDB_MODE=offline` writes
  them without an account (`wandb sync` uploads later).
* mlflow: $MLFLOW_TRACKING_URI (a server, `sqlite:///mlflow.db`, ...; mlflow's default otherwise, sqlite:///mlflow.db
  in mlflow 3, which mlflow-skinny cannot open: no sqlalchemy), experiment $MLFLOW_EXPERIMENT_NAME (default
  "tunelab"); settings as params, resolved_config.py as an artifact.
* swanlab: project $SWANLAB_PROJECT_NAME (default "tunelab"), files under WORK_DIR/swanlog;
  `SWANLAB_MODE=offline` (or local) needs no account.

The run is named after the work dir.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from tunelab.errors import TunelabError

TRACKERS = ("tensorboard", "wandb", "mlflow", "swanlab")
# tracker -> (module to import, what to pip install)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
             "mlflow": ("mlflow", "mlflow (or mlflow-skinny)"), "swanlab": ("swanlab", "swanlab")}


def metric_name(key: str) -> str:
    """The tracker's name for a log record's key: eval_loss → eval/loss, anything else → train/<key>."""
    return "eval/loss" if key == "eval_loss" else f"train/{key}"


def metrics_of(record: dict) -> dict[str, float]:
    """The numbers of one JSONL record, by tracker name (the step is passed on its own)."""
    return {metric_name(k): float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_installed(names) -> None:
    """Stop before any loading when a tracker in report_to has no package here."""
    for name in names:
        if name not in _PACKAGES:
            raise TunelabError(f"report_to: unknown tracker {name!r}; use any of {', '.join(map(repr, TRACKERS))}.")
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TunelabError(f"report_to includes {name!r} but the {module} package is not installed here: "
                               f"pip install {package} (or remove {name!r} from report_to; train_log.jsonl and "
                               f"`tunelab board` have the same numbers).")
        if name == "mlflow":
            _check_mlflow_store()


# mlflow's database stores (mlflow.store.db.db_types.DATABASE_ENGINES), which it opens through sqlalchemy
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _check_mlflow_store() -> None:
    """mlflow-skinny leaves sqlalchemy out, so it cannot open a database store, and mlflow 3's store when
    MLFLOW_TRACKING_URI is unset is one (sqlite:///mlflow.db): said here, before loading, rather than as mlflow's
    traceback when the tracker opens."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    scheme = uri.split(":", 1)[0].split("+", 1)[0]  # postgresql+psycopg2://... is postgresql's
    if scheme in _DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
        where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else \
            "mlflow's default: MLFLOW_TRACKING_URI is not set"
        raise TunelabError(f"report_to includes 'mlflow', whose tracking store is {uri} ({where}), a database that "
                           f"mlflow opens through sqlalchemy, which is not installed here (mlflow-skinny leaves it "
                           f"out): pip install mlflow, or set MLFLOW_TRACKING_URI to a server (http://...) or to a "
                           f"file: folder with MLFLOW_ALLOW_FILE_STORE=true.")


def open_trackers(names, *, work_dir: Path, settings: dict) -> list:
    """One started tracker per name in `names`; `settings`: the run's settings as plain data (logged once)."""
    check_installed(names)
    work_dir = Path(work_dir)
    run_name = work_dir.resolve().name
    makers = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
              "swanlab": SwanLabTracker}
    return [makers[name](work_dir, run_name, settings) for name in dict.fromkeys(names)]


def _flat(settings: dict) -> dict[str, str | int | float | bool]:
    """Settings as scalars a tracker's config table shows (lists and dicts as JSON text, None as 'None')."""
    out = {}
    for key, value in settings.items():
        if value is None or isinstance(value, (list, tuple, dict)):
            value = json.dumps(value, ensure_ascii=False, default=str)
        elif not isinstance(value, (str, int, float, bool)):
            value = str(value)
        out[key] = value
    return out


class TensorBoardTracker:
    def __init__(self, work_dir: Path, run_name: str, settings: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(work_dir / "tensorboard"))
        table = "\n".join(f"| {k} | `{v}` |" for k, v in _flat(settings).items())
        self.writer.add_text("config", "| setting | value |\n|---|---|\n" + table, 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, work_dir: Path, run_name: str, settings: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunelab"), name=run_name,
                              dir=str(work_dir), config=_flat(settings), reinit="finish_previous")

    def log(self, metrics: dict[str, float], step: int) -> None:
        # a resumed run starts a new wandb run; steps go on from the checkpoint's
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    def __init__(self, work_dir: Path, run_name: str, settings: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # $MLFLOW_TRACKING_URI, or mlflow's default
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tunelab")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in _flat(settings).items()]  # mlflow's limit on one value
        for start in range(0, len(params), 100):  # at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        from tunelab.train.layout import RESOLVED_CONFIG

        if (work_dir / RESOLVED_CONFIG).is_file():  # the whole config, callables included
            self.client.log_artifact(self.run_id, str(work_dir / RESOLVED_CONFIG))

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class SwanLabTracker:
    def __init__(self, work_dir: Path, run_name: str, settings: dict):
        import swanlab

        # swanlab reads $SWANLAB_PROJECT_NAME itself, and an argument would win over it
        project = None if os.environ.get("SWANLAB_PROJECT_NAME") else "tunelab"
        self.run = swanlab.init(project=project, name=run_name,
                                log_dir=str(work_dir / "swanlog"), config=_flat(settings), reinit=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(state="crashed" if failed else "success")
