"""The training loop: data → forward → loss → backward → step, in one function you can read top to bottom.

Three decisions are made once, before anything heavy is loaded, and the loop only follows them: the fast path
(`tunelab.model.plan.FastPathPlan`: how the model runs), the objective (`objective(model, batch) -> (loss_sum,
n_trained_tokens)`, the loss the step minimises) and the strategy (`strategy.py`: one process, DDP, FSDP2 or
DeepSpeed; the loop calls it for forward, backward, step and the model inside). Everything else lives next door: the
optimiser and schedule (`optim.py`), checkpoints (`checkpoint.py`) and resume (`resume.py`, `resume_settings.py`; the
file names in `layout.py`), the progress bar and logs (`progress.py`), evaluation (`evaluate.py`), the processes and
their collectives (`distributed.py`: in one process each is the identity).

Two rules keep runs exact and resumable:

* **Every trained token weighs the same.** Before the forward passes of an optimiser step we count the trained
  tokens of all its micro-batches (on all ranks), and each micro-batch's summed loss is divided by that count.
  The logged loss is therefore the mean loss per trained token of the step, whatever the padding or packing.
  (Preference objectives count pairs, or KTO samples, instead: `objective.units`.)
* **The data order is a pure function of (seed, epoch).** Each epoch is a seeded permutation of the rows, sharded
  across ranks; a checkpoint records the epoch and how many micro-batches of it were consumed, so a resumed run
  continues with exactly the next micro-batch, with the RNG states it had, and reproduces the loss curve.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.config.schema import to_dict
from tunelab.data.collate import collate
from tunelab.data.dataset import row_length
from tunelab.data.reports import counted
from tunelab.errors import TunelabError
from tunelab.model.fast import batch_to_device
from tunelab.model.fit import choose_reference, fit_plan_to_card
from tunelab.model.load import check_before_loading
from tunelab.model.model_dir import check_token_ids_fit
from tunelab.model.plan import plan_fast_path
from tunelab.model.preference import reduce_metrics, training_objective
from tunelab.model.freeze import describe_trained, partial
from tunelab.train import checkpoint as ckpt
from tunelab.train import layout, resume_settings
from tunelab.train.distributed import DistEnv, all_reduce_sum, cleanup, init_distributed, rank_shard
from tunelab.train.evaluate import run_evaluation
from tunelab.train.nonfinite import NonFiniteGuard
from tunelab.train.optim import ScaledOptimizer, StepsInBackward, build_optimizer, build_scheduler, choose_precision
from tunelab.train.resume import choose_start, load_model_weights, load_training_state, rng_state_for_rank
from tunelab.train.strategy import choose_strategy
from tunelab.train.vision import projector_note, vision_run, with_pretrained_checkpoint
from tunelab.train.workdir_lock import hold_work_dir
from tunelab.train.progress import Throughput, TrainingMonitor, check_memory_fits, oom_message, peak_memory_gb


@dataclass
class TrainResult:
    step: int
    """The last optimiser step done."""
    last_checkpoint: Path | None
    losses: dict[int, float] = field(default_factory=dict)
    """Loss (mean per trained token) of every step this call ran, by step number."""
    interrupted: bool = False
    """True when SIGINT / SIGTERM stopped the run early (after saving)."""
    already_finished: bool = False
    """True when the resumed checkpoint was the run's last step: nothing was trained."""
    skipped_steps: int = 0
    """Steps this call skipped for an inf / NaN loss or gradients (nonfinite = 'skip')."""


def _already_finished(last: Path, step: int, total: str, env: DistEnv, log) -> TrainResult:
    cleanup(env)
    log(f"{last} is the last step ({step}) of this config's run ({total}): it is already finished, nothing to "
        f"train")
    return TrainResult(step=step, last_checkpoint=last, already_finished=True)


def train(cfg, work_dir, *, resume: str | None = None, overwrite: bool = False, config_path=None,
          train_rows: list | None = None, eval_rows: list | None = None, tokenizer=None,
          device: str | None = None) -> TrainResult:
    """Train as `cfg` says, writing logs and checkpoints to `work_dir`.

    resume: None (start fresh), "auto" (the work dir's newest sound checkpoint, if any) or a checkpoint path.
    overwrite: delete the work dir's checkpoints this run would overwrite (without it such a start is refused).
    train_rows / eval_rows: rows already tokenised (see docs/DESIGN.md, Rows); built from cfg.data_path if None.
    """
    env = init_distributed(device)
    work_dir = Path(work_dir)
    with hold_work_dir(work_dir, enabled=env.is_main):  # one run per work dir; a run that dies releases it
        try:
            return _train(cfg, work_dir, env, resume=resume, overwrite=overwrite, config_path=config_path,
                          train_rows=train_rows, eval_rows=eval_rows, tokenizer=tokenizer)
        except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop listens: stopped without saving
            raise KeyboardInterrupt(_what_is_kept(work_dir)) from None


def _what_is_kept(work_dir: Path) -> str:
    """For a run stopped without saving: which checkpoint survives it, so the user knows what --resume continues."""
    newest = layout.newest_checkpoint(work_dir) if work_dir.is_dir() else None
    if newest is None:
        return "stopped without saving; no checkpoint was saved yet (--resume auto starts again from step 0)"
    return f"stopped without saving; {newest} is the newest checkpoint: continue from it with --resume auto"


def _train(cfg, work_dir: Path, env: DistEnv, *, resume, overwrite, config_path, train_rows, eval_rows,
           tokenizer) -> TrainResult:
    log = print if env.is_main else (lambda *a, **k: None)
    if env.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    # where the run starts, and refusing to overwrite checkpoints it does not continue from: before anything loads
    last = choose_start(work_dir, resume, overwrite=overwrite, env=env, log=log)
    record, resumed_step, known = None, -1, None
    if last is not None:  # its run's settings against this config's, also before anything loads
        cfg, record = resume_settings.compare(cfg, last, log=log)
        resumed_step = resume_settings.checkpoint_step_of(last, record)
        known = resume_settings.known_steps_per_epoch(record, env.world_size // cfg.sequence_parallel_size)
        if known is not None and resume_settings.finished_or_refused(last, resumed_step, cfg, known):
            return _already_finished(last, resumed_step, resume_settings.total_setting(cfg, known), env, log)
    settings_cfg = cfg  # what resolved_config.py records, once the start is accepted
    strategy = choose_strategy(cfg, env)  # refuses what the engines cannot run, before anything is loaded
    check_before_loading(cfg, env.device)  # and what the model cannot run or name: before the data step, too
    data_env = strategy.data_env  # the ranks that read different rows (sequence parallelism: one per group)
    # the fast path, with the checkpoint's arrangement fitted to this GPU's memory
    plan = fit_plan_to_card(cfg, env.device, plan_fast_path(cfg, env.device, env.world_size), world_size=env.world_size)
    reference = choose_reference(cfg, env.device, plan)  # DPO / KTO's reference model: decided once, here
    if reference:
        cfg = dataclasses.replace(cfg, reference=reference)
        log(f"reference model: {reference}")
    check_memory_fits(cfg, env.device, log, plan, env.world_size)  # before anything heavy is loaded
    from transformers import set_seed

    set_seed(cfg.seed)

    # --- data -----------------------------------------------------------------------------------
    if tokenizer is None:
        from tunelab.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.pretrained_model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    config_dir = str(Path(config_path).parent) if config_path else None
    vision = vision_run(cfg, tokenizer, config_dir)  # a LLaVA run: images per batch, evaluation pictures
    cfg = with_pretrained_checkpoint(cfg, config_dir)  # stage 2: stage 1's work dir -> its newest checkpoint
    if train_rows is None:
        from tunelab.data.dataset import build_datasets

        bundle = build_datasets(cfg, tokenizer, config_dir=config_dir, log=log)
        train_rows = bundle.train_rows
        eval_rows = bundle.eval_rows if eval_rows is None else eval_rows
    if not cfg.visual_encoder_name_or_path:  # a LLaVA run adds its image token and resizes the model itself
        check_token_ids_fit(cfg, tokenizer, train_rows)
    if len(train_rows) < data_env.world_size:
        raise TunelabError(f"data_path gives {len(train_rows)} training rows: too few to train on. "
                           f"Check data_path and data_format (`tunelab check-dataset CFG` shows what is read).")
    micro_per_epoch = math.ceil(len(rank_shard(list(range(len(train_rows))), data_env)) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.accumulative_counts)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.max_epochs
    data_fingerprint = resume_settings.rows_fingerprint(train_rows) if env.is_main else None
    if last is not None:  # with the data read: its size (a checkpoint of an older tunelab: the total only)
        resume_settings.check_data(last, record, steps_per_epoch=steps_per_epoch, rows=len(train_rows),
                                   data_ranks=data_env.world_size, fingerprint=data_fingerprint, log=log)
        # (where the record knew the steps an epoch, check_data made them these: decided before loading already)
        if known is None and resume_settings.finished_or_refused(last, resumed_step, cfg, steps_per_epoch):
            return _already_finished(last, resumed_step, resume_settings.total_setting(cfg, steps_per_epoch), env,
                                     log)
    if env.is_main:
        from tunelab.config.loader import save_resolved_config

        save_resolved_config(settings_cfg, work_dir / layout.RESOLVED_CONFIG, config_dir)

    # --- model, optimiser, schedule, precision --------------------------------------------------
    from tunelab.model.load import load_model_for_training, resolve_dtype

    model, fast_path = load_model_for_training(cfg, env.device, plan, pad_token_id=tokenizer.pad_token_id,
                                                checked=True)
    precision = choose_precision(model, resolve_dtype(cfg.dtype, env.device), env.device,
                                 fp32_master_weights=cfg.fp32_master_weights,
                                 grad_scaler=not strategy.scales_fp16_loss)
    reference_model = None
    if reference == "copy":
        from tunelab.model.load import load_reference_model

        reference_model = load_reference_model(cfg, env.device, plan)
    objective = training_objective(cfg, plan, reference, reference_model,
                                   sum_over_ranks=lambda t: all_reduce_sum(t, data_env))
    if reference == "precomputed":  # scored by the starting weights: before a checkpoint's weights are loaded
        from tunelab.train.reference import with_reference

        train_rows, eval_rows = with_reference(model, objective, train_rows, eval_rows, cfg, work_dir=work_dir,
                                               resuming=last is not None, precision=precision,
                                               pad_token_id=tokenizer.pad_token_id, env=env, log=log)
    my_eval_rows = [eval_rows[i] for i in rank_shard(list(range(len(eval_rows or []))), data_env)]
    if last is not None:
        load_model_weights(model, last)  # before any wrapper shards the weights
    optimizer = build_optimizer(model, cfg, env.device)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    stepper = ScaledOptimizer(optimizer, precision.scaler) if precision.scaler else optimizer
    if plan.optimizer_in_backward:  # each layer updated as backward hands over its gradients (no clipping)
        stepper = StepsInBackward(optimizer, model)
    strategy.setup(model, stepper, objective, precision.autocast_dtype)

    # --- resume: optimiser, schedule, RNG and data position as they were at the checkpoint ---------
    step, position = 0, {"epoch": 0, "micro_batch": 0, "data_seed": cfg.seed}
    try:  # a checkpoint that does not fit ends here: what the engine started (DeepSpeed's one-process group) ends too
        if last is not None:
            state = load_training_state(last)
            strategy.load_optimizer(last / layout.OPTIMIZER_DIR, state)
            redrawn = resume_settings.fit_schedule(state["scheduler"], cfg, total_steps)
            scheduler.load_state_dict(state["scheduler"])
            if redrawn:  # the lr of the next step: the redrawn schedule's at the resumed step
                for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)
                log(f"note: this config trains {counted(total_steps, 'step')} in all, the checkpoint's "
                    f"{counted(redrawn, 'step')}: its {cfg.lr_scheduler} schedule is redrawn over "
                    f"{counted(total_steps, 'step')}, from lr {optimizer.param_groups[0]['lr']:g} at step "
                    f"{int(state['step'])}")
            step, position = int(state["step"]), dict(state["position"])
            ckpt.set_rng_state(rng_state_for_rank(last, state, env))
            epochs_done = position["epoch"] + position["micro_batch"] / micro_per_epoch  # as the log counts them
            log(f"resumed from {last} (step {step}, epoch {epochs_done:.2f})")
    except BaseException:
        strategy.close()
        raise

    meta = layout.training_meta(cfg, getattr(model, "config", None))
    # fp16: a loss scale (ours or the engine's) makes an inf gradient norm an ordinary skipped step
    guard = NonFiniteGuard(cfg.nonfinite, scaled=precision.autocast_dtype == torch.float16, say=log)
    monitor = TrainingMonitor(work_dir, total_steps=total_steps, start_step=step, enabled=env.is_main,
                              report_to=cfg.resolved_report_to(), settings=to_dict(cfg))
    log(f"fast path: {fast_path}")
    if note := projector_note(cfg, resuming=last is not None):
        log(note)
    if plan.optimizer_in_backward:
        log("optimizer_in_backward: each layer's parameters are updated as soon as backward has their gradients "
            "(no clipping)")
    what = cfg.method + ("" if cfg.objective == "sft" else f" {cfg.objective}")
    if partial(cfg):
        what += f" ({describe_trained(model)})"
    log(f"training {what} on {env.device} ({strategy.name}): {counted(len(train_rows), 'row')}, "
        f"{counted(steps_per_epoch, 'step')} per epoch, "
        f"{counted(total_steps, 'step')} (batch_size {cfg.batch_size} x accumulative_counts "
        f"{cfg.accumulative_counts}"
        f"{f' x {data_env.world_size} ranks' if data_env.distributed else ''})")

    def evaluate(at_step: int) -> None:
        run_evaluation(strategy.module, tokenizer, cfg, at_step, eval_rows=my_eval_rows, env=env,
                       precision=precision, monitor=monitor, work_dir=work_dir, objective=strategy.objective,
                       vision=vision)

    def save(at_step: int) -> Path:
        run = resume_settings.run_record(cfg, step=at_step, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                         data_ranks=data_env.world_size, data_fingerprint=data_fingerprint)
        path = ckpt.save_checkpoint(work_dir, at_step, strategy=strategy, tokenizer=tokenizer, scheduler=scheduler,
                                    position=position, meta={**meta, resume_settings.RUN_KEY: run},
                                    save_total_limit=cfg.save_total_limit)
        monitor.plot()
        monitor.message(f"saved {path}")
        return path

    losses: dict[int, float] = {}
    interrupted = False
    try:
        if step == 0 and (cfg.evaluation_inputs or len(my_eval_rows)):
            evaluate(0)  # before training, so the answers after training have something to be compared with
        strategy.train()
        throughput, window = Throughput(), []
        graphed = plan.cuda_graphs
        # CUDA graphs replay each layer's backward into the same memory every micro-batch, so gradients summed over
        # several micro-batches need buffers of their own: allocated here, zeroed (not freed) after each step.
        # Each micro-batch then starts a new graph generation: with one generation a step, the second micro-batch
        # would not replay, and a step of two would run at recording speed (Llama-7B QLoRA: 7 s instead of 0.4 s).
        keep_grad_buffers = graphed and cfg.accumulative_counts > 1
        if keep_grad_buffers:
            allocate_grad_buffers(strategy.module)
        with ckpt.GracefulStop() as stop:
            embedding = model.get_input_embeddings() if plan.embedding_rows_ahead else None

            def data_of(group) -> StepData:
                return step_data(group, cfg, tokenizer.pad_token_id, objective, embedding, env, data_env,
                                 graphed=graphed, images=vision.images if vision else None)

            groups = micro_batch_groups(train_rows, cfg, data_env, position)
            upcoming = data_of(next(groups)) if step < total_steps else None
            while upcoming is not None:
                throughput.begin()
                # 1. data: this step's micro-batches, collated (and the first one sent to the GPU) during the step
                # before (the first step's before the loop), the trained tokens of all of them on all ranks counted
                data = upcoming
                # 2-4. forward → loss → backward, each micro-batch's loss sum divided by the step's trained tokens
                loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
                for i, batch in enumerate(data.batches):
                    if graphed:  # CUDA graphs may reuse the last micro-batch's outputs' memory from here on
                        torch.compiler.cudagraph_mark_step_begin()
                    if i > 0:  # (no wait for the GPU: the CPU is ahead, the embedding rows come from CPU ids)
                        batch = batch_to_device(batch, env.device, embedding)
                    with strategy.accumulating(last=i == len(data.batches) - 1):
                        with precision.autocast(env.device):
                            micro_loss_sum, _ = strategy.forward_loss(batch)
                        strategy.backward(precision.scale(micro_loss_sum / max(data.trained_tokens, 1)))
                    loss_sum += micro_loss_sum.detach().double()
                # The next step's data while the GPU works through this one's backward: reading the gradient
                # norm and the loss below waits for the GPU, which would then idle while the CPU collates and
                # gathers embedding rows (up to 9 ms of an 8k step; BENCHMARKS.md, "four small costs out of every
                # step").
                upcoming = data_of(next(groups)) if step + 1 < total_steps else None
                # 5. step: (fp16: unscale,) clip, update, zero the gradients; then the schedule moves on
                lr = optimizer.param_groups[0]["lr"]
                grad_norm = strategy.step(cfg.max_norm, keep_grad_buffers=keep_grad_buffers,
                                          skip_nonfinite=guard.skips)
                scheduler.step()
                step += 1
                position = {"epoch": data.epoch, "micro_batch": data.micro_done, "data_seed": position["data_seed"]}

                loss = float(all_reduce_sum(loss_sum, env)) / max(data.trained_tokens, 1)
                losses[step] = loss
                if guard.check(step, loss, grad_norm, lr=lr, last=last):  # inf / NaN: stop, or skip with a warning
                    window.append(loss)
                throughput.end(int(data.seen_tokens))
                # the last step is logged even when every step since the line before was skipped (no loss to
                # show): the log, run.json's 'finished' and skipped_steps must reach the end of the run
                log_now = (step % cfg.logging_steps == 0 or step in (1, total_steps)) and \
                    (bool(window) or step == total_steps)
                record = {"step": step, "epoch": round(data.epoch + data.micro_done / micro_per_epoch, 4),
                          **({"loss": sum(window) / len(window), "grad_norm": grad_norm} if window else {}),
                          "lr": lr, "tokens_per_s": throughput.rate(), "tokens": throughput.tokens,
                          "memory_gb": round(peak_memory_gb(env.device), 3)}
                if guard.skipped:
                    record["skipped_steps"] = guard.skipped
                if env.device.type == "cuda":
                    record["memory_reserved_gb"] = round(peak_memory_gb(env.device, reserved=True), 3)
                if log_now:  # rewards, margin, accuracy...: means over the steps since the last log line
                    record.update(reduce_metrics(objective.take_metrics(), lambda t: all_reduce_sum(t, env)))
                monitor.update(record, log=log_now)
                if log_now:
                    window = []
                    throughput.reset()
                if step % cfg.evaluation_freq == 0 or step == total_steps:
                    evaluate(step)
                stop_now = stop.requested
                if env.distributed:  # every rank stops at the same step, so all of them save it
                    stop_now = bool(all_reduce_sum(torch.tensor(float(stop_now), device=env.device), env) > 0)
                if step % cfg.save_steps == 0 or step == total_steps or stop_now:
                    last = save(step)
                if stop_now:
                    interrupted = True
                    monitor.message(f"stopped at step {step}; continue with --resume auto")
                    break
    except torch.OutOfMemoryError:
        raise TunelabError(oom_message(cfg, step=step + 1, device=env.device, last=last)) from None
    except OSError as exc:  # writing the log, the curve or a file of the work dir: a full disk, a read-only one
        raise TunelabError(f"{exc.filename or work_dir}: {exc.strerror or exc} (step {step + 1}). Free disk space or "
                           f"fix permissions, then continue with --resume auto (from "
                           f"{last.name if last else 'step 0: no checkpoint yet'}).") from None
    finally:
        monitor.close()
        strategy.close()
        cleanup(env)
    return TrainResult(step=step, last_checkpoint=last, losses=losses, interrupted=interrupted,
                       skipped_steps=guard.skipped)


@dataclass
class StepData:
    """One optimiser step's data: its micro-batches on the CPU (the first one already on the GPU) and what the
    loss is averaged over, counted over all of them and all ranks that read different rows."""
    epoch: int
    micro_done: int
    """Micro-batches of `epoch` consumed after this step (the resume position)."""
    batches: list[dict]
    trained_tokens: float
    """Trained tokens (pairs for preference objectives: `objective.units`) of the step: the loss is a mean of them."""
    seen_tokens: float


def step_data(group, cfg, pad_token_id: int, objective, embedding, env: DistEnv, data_env: DistEnv, *,
              graphed: bool, images=None) -> StepData:
    """Collate a group of `micro_batch_groups`, send its first micro-batch to the device (`embedding`: see
    `fast.batch_to_device`), count what the loss is averaged over. Under CUDA graphs every batch is a full row wide,
    so one shape (plus a few boundary sizes) is recorded."""
    epoch, micro_done, micro_batches = group
    batches = [collate(rows, pad_token_id, multiple_of=row_length(cfg) if graphed else 1, images=images)
               for rows in micro_batches]
    batches[0] = batch_to_device(batches[0], env.device, embedding)
    counts = torch.tensor([sum(objective.units(b) for b in batches),
                           sum(len(r["input_ids"]) for rows in micro_batches for r in rows)],
                          dtype=torch.float64, device=env.device if env.distributed else "cpu")
    trained_tokens, seen_tokens = all_reduce_sum(counts, data_env).tolist()  # no GPU sync in one process
    return StepData(epoch, micro_done, batches, trained_tokens, seen_tokens)


def allocate_grad_buffers(model) -> None:
    """Zeroed .grad tensors for every trained parameter, so backward adds into them instead of handing over its own
    output (which, under CUDA graphs, the next replay overwrites)."""
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)


def micro_batch_groups(rows: list, cfg, env: DistEnv, position: dict):
    """Yield (epoch, micro-batches consumed in that epoch after this group, [rows of each micro-batch]) per step.

    Epoch e visits the rows in a permutation seeded by (data_seed + e); this rank takes its share; a group is up
    to `accumulative_counts` micro-batches of `batch_size` rows (the last group of an epoch may be smaller).
    Starts at `position` (epoch, micro-batches already consumed), which is how resume skips exactly.
    """
    epoch, start = int(position["epoch"]), int(position["micro_batch"])
    while True:
        generator = torch.Generator().manual_seed(int(position["data_seed"]) + epoch)
        order = rank_shard(torch.randperm(len(rows), generator=generator).tolist(), env)
        micro = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for first in range(start, len(micro), cfg.accumulative_counts):
            group = micro[first:first + cfg.accumulative_counts]
            yield epoch, first + len(group), [[rows[i] for i in indices] for indices in group]
        epoch, start = epoch + 1, 0
