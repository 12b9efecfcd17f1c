"""What `tunelab board` knows about a run: read from the work dir's own files, nothing else.

* `train_log.jsonl` (tunelab/train/progress.py): the curves (loss, eval loss, lr, grad norm, tokens/s, memory).
* `run.json` (tunelab/train/run_status.py): running / finished / stopped / interrupted / failed / crashed, and the settings.
* `resolved_config.py`: the settings of a run whose work dir has no run.json (or none yet).
* `eval_outputs_iter_N.json` (tunelab/train/evaluate.py): the answers to the evaluation questions at step N.

So a finished run, a running one and one that crashed are all read the same way, by a board started before, during
or after training.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from pathlib import Path

from tunelab.train.layout import RESOLVED_CONFIG
from tunelab.train.progress import LOG_FILE, read_log
from tunelab.train.run_status import read_status

# Settings shown in the run list (the rest is one click away).
SUMMARY_KEYS = ("pretrained_model_name_or_path", "method", "data_path", "prompt_template", "max_length",
                "batch_size", "accumulative_counts", "lr", "max_epochs", "max_steps", "lora_r", "deepspeed")
MARKERS = (LOG_FILE, "run.json", RESOLVED_CONFIG)


def is_work_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in MARKERS)


def find_runs(paths: list[Path]) -> list[Path]:
    """The work dirs among `paths` and their sub-folders (two levels down: `work_dirs/` and `work_dirs/group/`)."""
    found: dict[Path, None] = {}
    for root in paths:
        root = Path(root).resolve()
        if is_work_dir(root):
            found[root] = None
        for depth in ("*", "*/*"):
            for child in sorted(root.glob(depth)):
                if child.is_dir() and is_work_dir(child):
                    found[child] = None
    return list(found)


def run_id(work_dir: Path) -> str:
    """A short stable name for URLs (the path itself would need escaping)."""
    return hashlib.sha1(str(Path(work_dir).resolve()).encode()).hexdigest()[:12]


def settings_from_resolved_config(path: Path) -> dict:
    """The literal `name = value` lines of a resolved_config.py, read without running the file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return {}
    settings = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                settings[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # a function, a call: shown by name
                settings[node.targets[0].id] = ast.unparse(node.value)
    return settings


def _records(work_dir: Path) -> list[dict]:
    """The log's records as JSON can send them: an inf / NaN (an fp16 step's overflowed gradient norm, a loss gone
    wrong) becomes null, which the page draws as a gap; a record without a step (edited by hand) is left out. Read
    again only when the file changed: the page asks every 2 s, and a long run's log holds hundreds of thousands."""
    path = Path(work_dir) / LOG_FILE
    try:
        stat = path.stat()
    except OSError:
        return []
    key, kept = (stat.st_mtime_ns, stat.st_size), _LOGS.get(str(path))
    if kept is None or kept[0] != key:  # one copy a log: a growing one replaces its own
        kept = _LOGS[str(path)] = (key, _read_records(path))
    return kept[1]


_LOGS: dict[str, tuple[tuple[int, int], list[dict]]] = {}
"""Each log's records as last read, with the (mtime, size) they were read at."""


def _read_records(path: Path) -> list[dict]:
    def finite(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return [{k: finite(v) for k, v in r.items()} for r in read_log(path) if isinstance(r.get("step"), int)]


def run_summary(work_dir: Path) -> dict:
    """One row of the run list: name, state, what was trained on what, progress, the last numbers."""
    work_dir = Path(work_dir)
    status = read_status(work_dir) or {}
    settings = status.get("settings") or settings_from_resolved_config(work_dir / RESOLVED_CONFIG)
    records = _records(work_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    log_path = work_dir / LOG_FILE
    return {
        "id": run_id(work_dir), "name": work_dir.name, "path": str(work_dir),
        "state": status.get("state", "unknown"), "error": status.get("error"),
        "started": status.get("started"), "ended": status.get("ended"),
        "updated": log_path.stat().st_mtime if log_path.is_file() else None,
        # a last line without a loss (its steps all skipped, nonfinite = 'skip') still moves the run on
        "step": max((r["step"] for r in records if "eval_loss" not in r), default=0),
        "total_steps": status.get("total_steps"),
        "loss": train[-1]["loss"] if train else None, "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "summary": {k: settings[k] for k in SUMMARY_KEYS if k in settings},
        "settings": settings,
    }


def run_log(work_dir: Path) -> dict:
    """The curves: training records (step, epoch, loss, lr, grad_norm, tokens_per_s, memory_gb, ...) and eval loss."""
    records = _records(work_dir)
    return {"train": [r for r in records if "loss" in r],
            "eval": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in records if "eval_loss" in r]}


def run_answers(work_dir: Path) -> list[dict]:
    """[{"step": N, "answers": [{"question", "answer"}, ...]}] by step: the evaluations so far (0 = before training)."""
    found = []
    for path in Path(work_dir).glob("eval_outputs_iter_*.json"):
        match = re.fullmatch(r"eval_outputs_iter_(\d+)\.json", path.name)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # being written right now: next poll
            continue
        if match and isinstance(record, dict):
            found.append({"step": int(match.group(1)), "answers": record.get("answers", [])})
    return sorted(found, key=lambda r: r["step"])
