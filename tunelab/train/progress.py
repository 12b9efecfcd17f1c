"""What the user sees while training: a progress bar, a JSONL log, a loss-curve PNG, run.json, trackers.

* In a terminal: a rich progress bar with loss, lr, tokens/s, ETA and memory. Piped to a file: one plain line
  per logging step with the same and the ETA instead (a live bar would fill the file with redraws).
* `WORK_DIR/train_log.jsonl`: one JSON object per logging step (step, epoch, loss, lr, grad_norm, tokens_per_s,
  tokens: the tokens of the rows read since the last line, each counted once over all processes; memory_gb; on a
  GPU also memory_reserved_gb) and per evaluation (eval_loss).
* `WORK_DIR/loss_curve.png`: redrawn from the log at every save (matplotlib's Agg canvas, no display needed).
* `WORK_DIR/run.json`: running / finished / stopped / failed, with the settings (tunelab/train/run_status.py).
* The trackers of `report_to` get every record of the log too (tunelab/train/trackers.py).
`tunelab board` reads these files, so it shows running, finished and crashed runs alike.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.train import run_status
from tunelab.train.trackers import metrics_of, open_trackers

LOG_FILE = "train_log.jsonl"
CURVE_FILE = "loss_curve.png"


def peak_memory_gb(device: torch.device, reserved: bool = False) -> float:
    """Peak GPU memory allocated by this process (CUDA), or peak resident memory of the process (CPU).

    reserved: what the caching allocator held instead (CUDA): closer to what the card must have, and the figure to
    read with CUDA graphs, whose replays reuse memory recorded early without counting it as allocated again."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_reserved if reserved else torch.cuda.max_memory_allocated)(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


SHOWN_METRICS = ("reward_margin", "score_margin", "accuracy", "kl")  # of a preference objective, next to the loss


class TrainingMonitor:
    """Progress bar + log files for one run. Only the main process writes (`enabled=False` elsewhere)."""

    def __init__(self, work_dir: Path, *, total_steps: int, start_step: int, enabled: bool = True,
                 report_to=(), settings: dict | None = None):
        """report_to: trackers that get every record too (tunelab/train/trackers.py); settings: the run's settings
        as plain data (tunelab.config.schema.to_dict), written to run.json and logged once to each tracker."""
        self.work_dir = Path(work_dir)
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_path = self.work_dir / LOG_FILE
        self.last_step = self.start_step = start_step
        self._started = time.monotonic()  # the ETA of plain lines: the mean step time since this process began
        self._bar = self._task = None
        self._trackers: list = []
        self._shown: dict = {}  # preference metrics of the last log line, kept on the bar between log lines
        if not enabled:
            return
        _keep_log_until(self.log_path, start_step)  # a resumed run rewrites what came after its checkpoint
        settings = json.loads(json.dumps(settings or {}, default=str))  # plain JSON: callables by name
        run_status.mark_running(self.work_dir, total_steps=total_steps, start_step=start_step, settings=settings)
        self._trackers = open_trackers(report_to, work_dir=self.work_dir, settings=settings)
        from rich.console import Console

        self.console = Console(stderr=True)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, stats="")

    def message(self, text: str) -> None:
        """Print above the bar (evaluation answers, saves, warnings). Piped to a file, lines are written whole: rich
        would break them at its 80-column default, a line of the log at a time."""
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=not self.console.is_terminal)

    def update(self, record: dict, *, log: bool) -> None:
        """After every optimiser step: move the bar; on logging steps also write the record."""
        if not self.enabled:
            return
        self._shown = {k: record[k] for k in SHOWN_METRICS if k in record} or self._shown
        # no loss: every step since the line before was skipped (nonfinite = 'skip')
        loss = f"{record['loss']:.4f}" if "loss" in record else "- (skipped)"
        stats = (f"loss {loss}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s  "
                 f"mem {record['memory_gb']:.1f} GB" + "".join(f"  {k} {v:.3f}" for k, v in self._shown.items()))
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"], stats=stats)
        elif log:
            self.console.print(f"step {record['step']}/{self.total_steps}  epoch {record['epoch']:.2f}  {stats}  "
                               f"eta {self._eta(record['step'])}", markup=False, highlight=False, soft_wrap=True)
        if log:
            self.write(record)

    def _eta(self, step: int) -> str:
        """Time left at the mean step time of this process so far, as h:mm:ss (what the bar's column shows)."""
        done = step - self.start_step
        seconds = (time.monotonic() - self._started) / done * (self.total_steps - step) if done > 0 else 0.0
        minutes, secs = divmod(int(round(seconds)), 60)
        return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.last_step = max(self.last_step, int(record.get("step", 0)))
        for tracker in self._trackers:
            tracker.log(metrics_of(record), record["step"])

    def plot(self) -> Path | None:
        if self.enabled:
            return plot_loss_curve(self.log_path, self.work_dir / CURVE_FILE)
        return None

    def close(self) -> None:
        """Stop the bar and the trackers; record in run.json how the run ended. Called from the loop's `finally`,
        so an exception on its way out (sys.exc_info) means the run failed, a KeyboardInterrupt that it was
        interrupted (a second SIGINT / SIGTERM, or one before the loop listens: nothing saved since the newest
        checkpoint); no exception before the last step means it was stopped (SIGINT / SIGTERM, saved)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        error = sys.exc_info()[1]
        failed = error is not None and not isinstance(error, KeyboardInterrupt)
        for tracker in self._trackers:
            tracker.close(failed=failed)
        self._trackers = []
        if self.enabled:
            if failed:
                run_status.mark_ended(self.work_dir, "failed", error=f"{type(error).__name__}: {error}"[:2000])
            elif isinstance(error, KeyboardInterrupt):  # not "stopped", which promises the last step was saved
                run_status.mark_ended(self.work_dir, "interrupted")
            else:
                run_status.mark_ended(self.work_dir, "finished" if self.last_step >= self.total_steps else "stopped")
            self.enabled = False


class Throughput:
    """Tokens per second of the training steps in the current logging window (evaluation and saving excluded)."""

    def __init__(self):
        self.tokens, self.seconds, self._start = 0, 0.0, 0.0

    def begin(self) -> None:
        self._start = time.perf_counter()

    def end(self, tokens: int) -> None:
        self.seconds += time.perf_counter() - self._start
        self.tokens += tokens

    def rate(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def reset(self) -> None:
        self.tokens, self.seconds = 0, 0.0


def read_log(path: Path) -> list[dict]:
    """The log's records; a line cut short (the process was killed mid-write) is skipped, so resume still works."""
    if not Path(path).is_file():
        return []
    return _parse_log(Path(path).read_text(encoding="utf-8", errors="replace"))


def _parse_log(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _keep_log_until(path: Path, step: int) -> None:
    """Drop log records after `step`: they belong to steps the resumed run is about to redo."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept = "".join(json.dumps(r) + "\n" for r in _parse_log(text) if r.get("step", 0) <= step)
    if text != kept:  # also drops a line cut short by a crash
        path.write_text(kept, encoding="utf-8")


def plot_loss_curve(log_path: Path, out_path: Path) -> Path | None:
    """Draw training (and eval) loss against step from the JSONL log; None when there is nothing to draw yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(out_path)
    return out_path


def oom_message(cfg, *, step: int, device: torch.device, last: Path | None) -> str:
    """What ran out, the peak, and the one setting most worth lowering first."""
    peak = peak_memory_gb(device)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    of = f" of {total:.1f} GiB" if total else ""
    if cfg.batch_size > 1:
        fix = (f"batch_size = 1 with accumulative_counts = {cfg.batch_size * cfg.accumulative_counts} "
               f"(same effective batch)")
    elif not cfg.resolved_gradient_checkpointing():
        fix = "gradient_checkpointing = True"
    elif cfg.method == "lora":
        fix = "method = 'qlora' (4-bit base)"
    else:
        fix = f"max_length = {max(256, cfg.max_length // 2)}"
    where = f"the last complete checkpoint ({last}) is intact: continue with --resume auto" if last else \
        "no checkpoint was saved yet"
    return (f"out of memory at step {step} (peak {peak:.1f} GiB{of}). Lower the memory needed, e.g. {fix}, "
            f"via --cfg-options or the config file; `tunelab plan CFG` estimates the need. {where}.")


def check_memory_fits(cfg, device: torch.device, log=print, plan=None, world_size: int = 1) -> None:
    """Before loading anything: estimate the GPU memory this run needs on each of its `world_size` GPUs
    (tunelab.model.memory) and stop early, naming settings that would fit, when it cannot. Skipped on CPU and where
    no estimate can be made (the estimate's error is logged)."""
    if device.type != "cuda":
        return
    from tunelab.model.fit import plan_report
    from tunelab.model.memory import available_cpu_memory, estimate_memory

    try:
        estimate = estimate_memory(cfg, device, plan, world_size=world_size)
    except TunelabError as exc:  # e.g. a hub model whose shape is unknown before download
        log(f"memory plan skipped: {exc}")
        return
    cpu_free = available_cpu_memory()
    if not estimate.fits_in_cpu_memory(cpu_free):
        held = ", ".join(f"{name} = True would keep {size / 2**30:.1f} GiB"
                         for name, size in estimate.cpu_offload.items())
        raise TunelabError(
            f"{held} in CPU memory, and this machine has {cpu_free / 2**30:.1f} GiB available. Lower max_length (or "
            f"batch_size), free CPU memory, or set {' / '.join(f'{name} = False' for name in estimate.cpu_offload)} "
            "if the GPU can hold it.")
    if estimate.exceeds and cfg.check_memory:
        raise TunelabError("this run does not fit in GPU memory (estimate below). Change the settings marked "
                           "'try:' in the config or with --cfg-options, then run again (or set check_memory = False "
                           "to start anyway).\n" + plan_report(cfg, device, plan, world_size=world_size))
    if estimate.fits is False:
        log("warning: this run may run out of GPU memory (the estimate is within ~10% of measured peaks):\n"
            + plan_report(cfg, device, plan, world_size=world_size))
        return
    log(f"memory plan: about {estimate.with_overhead / 2**30:.1f} GiB needed of "
        f"{estimate.device_bytes / 2**30:.1f} GiB ({estimate.device_name})")
