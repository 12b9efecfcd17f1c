"""What an XTuner config runs past its PART 1 settings, as tunelab settings: the training loop (`train_cfg`), the hooks
(checkpoint, logger, EvaluateChatHook), the strategy (DeepSpeed ZeRO, FSDP) and the visualizer's backends; what maps
is carried over, the rest listed as not carried over (`tunelab.config.xtuner_convert`)."""

from __future__ import annotations

import math
from typing import Any

from tunelab.config.xtuner_config import Ref, XtunerConfig

# XTuner's SYSTEM_TEMPLATE texts (xtuner/utils/templates.py) that tunelab configs spell out
SYSTEM_TEMPLATES = {
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n",
    "coder": "You are a professional programer. Please provide the corresponding code based on the description of "
             "Human.\n",
    "lawyer": "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n",
    "medical": "如果你是一名医生，请根据患者的描述回答医学问题。\n",
    "sql": "If you are an expert in SQL, please generate a good SQL Query for Question based on the CREATE TABLE "
           "statement.\n",
    "colorist": "You are a professional color designer. Please provide the corresponding colors based on the "
                "description of Human.\n",
}
# mmengine names past PART 1 that `runtime_settings` and the sections above read, or that need nothing in tunelab
_RUNTIME_NAMES = {"tokenizer", "model", "train_dataloader", "optim_wrapper", "param_scheduler", "train_cfg",
                  "custom_hooks", "default_hooks", "env_cfg", "log_level", "log_processor", "randomness",
                  "visualizer", "load_from", "resume", "runner_type", "strategy", "sampler", "launcher"}
_QUIET_HOOKS = {"DatasetInfoHook", "VarlenAttnArgsToMessageHubHook", "ThroughputHook", "DistSamplerSeedHook",
                "IterTimerHook", "ParamSchedulerHook", "HFCheckpointHook"}
_VIS_BACKENDS = {"TensorboardVisBackend": "tensorboard", "WandbVisBackend": "wandb", "MLflowVisBackend": "mlflow"}


def _kind(value: Any) -> str:
    """A dict's `type`, by its last name: dict(type=DeepSpeedStrategy) and dict(type="xtuner.DeepSpeedStrategy")."""
    kind = value.get("type") if isinstance(value, dict) else None
    return kind.last if isinstance(kind, Ref) else kind.split(".")[-1] if isinstance(kind, str) else ""


def _plain(value: Any, kind=(int, float)) -> bool:
    return isinstance(value, kind) and not isinstance(value, (bool, Ref))


def runtime_settings(cfg: XtunerConfig, out: dict, lost: list, notes: list, origins: dict) -> None:
    """The values XTuner runs with, which the structures past PART 1 hold (they win over PART-1 names, which only
    feed them), and the step counts, which XTuner counts in iterations (micro-batches)."""
    env = cfg.env
    set_by_part1 = dict(out)

    def put(key: str, value: Any, where: str) -> None:
        out[key] = value
        if not (key in set_by_part1 and set_by_part1[key] == value and type(set_by_part1[key]) is type(value)):
            origins[key] = where  # the value XTuner runs with is not the PART-1 name's: name where it is

    loader = env.get("train_dataloader") if isinstance(env.get("train_dataloader"), dict) else {}
    if _plain(loader.get("batch_size"), int):
        put("batch_size", loader["batch_size"], "train_dataloader.batch_size")
    wrapper = env.get("optim_wrapper") if isinstance(env.get("optim_wrapper"), dict) else None
    if wrapper is not None:
        counts = wrapper.get("accumulative_counts", 1)  # mmengine's default: an update every iteration
        if _plain(counts, int):
            put("accumulative_counts", counts, "optim_wrapper.accumulative_counts")
        optimizer = wrapper.get("optimizer") if isinstance(wrapper.get("optimizer"), dict) else {}
        for key in ("lr", "weight_decay"):
            if _plain(optimizer.get(key)):
                put(key, optimizer[key], f"optim_wrapper.optimizer.{key}")
        if isinstance(optimizer.get("betas"), (tuple, list)) and all(_plain(b) for b in optimizer["betas"]):
            put("betas", tuple(optimizer["betas"]), "optim_wrapper.optimizer.betas")
        clip = wrapper.get("clip_grad", "unset")
        if clip is None:
            out["max_norm"], origins["max_norm"] = 0.0, "optim_wrapper.clip_grad"  # no clipping
        elif isinstance(clip, dict) and _plain(clip.get("max_norm")):
            put("max_norm", clip["max_norm"], "optim_wrapper.clip_grad.max_norm")
    iterations = {}  # setting -> (XTuner iterations, where)
    train_cfg = env.get("train_cfg") if isinstance(env.get("train_cfg"), dict) else {}
    if "max_iters" in train_cfg:
        iterations["max_steps"] = (train_cfg["max_iters"], "train_cfg.max_iters")
    elif _plain(train_cfg.get("max_epochs"), int):
        put("max_epochs", train_cfg["max_epochs"], "train_cfg.max_epochs")
    for key in ("save_steps", "evaluation_freq"):
        if _plain(out.get(key), int):
            iterations[key] = (out.pop(key), key)
    hooks = env.get("default_hooks") if isinstance(env.get("default_hooks"), dict) else {}
    for name, hook in hooks.items():
        kind = _kind(hook)
        if name == "checkpoint" and isinstance(hook, dict):
            if hook.get("by_epoch", True) and hook.get("by_epoch") is not False:
                lost.append("default_hooks.checkpoint by_epoch: XTuner saved every epoch; tunelab saves every "
                            "save_steps optimiser steps: set save_steps by hand")
            elif "interval" in hook:
                iterations["save_steps"] = (hook["interval"], "default_hooks.checkpoint.interval")
            if "max_keep_ckpts" in hook:
                put("save_total_limit", hook["max_keep_ckpts"], "default_hooks.checkpoint.max_keep_ckpts")
        elif name == "logger" and isinstance(hook, dict):
            if "interval" in hook:
                iterations["logging_steps"] = (hook["interval"], "default_hooks.logger.interval")
        elif hook is not None and kind not in _QUIET_HOOKS:
            lost.append(f"default_hooks.{name} = {show(hook)}: tunelab has no hook of that kind")
    hooks = env.get("custom_hooks") if isinstance(env.get("custom_hooks"), list) else []
    for hook in hooks:
        kind = _kind(hook)
        if kind == "EvaluateChatHook":
            if "evaluation_inputs" in hook:
                put("evaluation_inputs", hook["evaluation_inputs"], "EvaluateChatHook evaluation_inputs")
            if "every_n_iters" in hook:
                iterations["evaluation_freq"] = (hook["every_n_iters"], "EvaluateChatHook every_n_iters")
            if "max_new_tokens" in hook:
                put("eval_max_new_tokens", hook["max_new_tokens"], "EvaluateChatHook max_new_tokens")
            if "system" in hook and hook["system"] is not env.get("SYSTEM"):
                out.pop("SYSTEM", None)
                notes[:] = [n for n in notes if not n.startswith("SYSTEM:")]
                system_setting(hook["system"], out, lost, notes)
                origins["SYSTEM"] = "EvaluateChatHook system"
            for key in hook:
                if key not in ("type", "tokenizer", "evaluation_inputs", "every_n_iters", "max_new_tokens", "system",
                               "prompt_template", "stop_word", "stop_words"):
                    lost.append(f"EvaluateChatHook {key} = {show(hook[key])}: tunelab's evaluation has no such "
                                f"setting")
        elif kind not in _QUIET_HOOKS:
            lost.append(f"custom_hooks: {show(hook)}: tunelab has no hook of that kind")
    counts = out.get("accumulative_counts", 16)
    for key, (value, where) in iterations.items():
        if not (key in set_by_part1 and set_by_part1[key] == value):
            origins[key] = where
        if _plain(value, int) and value > 0 and _plain(counts, int) and counts > 0:
            out[key] = max(1, math.ceil(value / counts))
            if counts > 1:
                notes.append(f"{key} = {out[key]}: XTuner's {where} = {value} counts iterations (micro-batches); "
                             f"tunelab counts optimiser steps, {counts} iterations each (accumulative_counts)")
        else:
            out[key] = value  # not a positive whole number: the checks before writing name it
    _strategy(env, out, lost, notes, origins)
    vis = env.get("visualizer")
    if isinstance(vis, dict):
        backends = [_kind(b) or show(b)
                    for b in vis.get("vis_backends") or []]
        put("report_to", [_VIS_BACKENDS[b] for b in backends if b in _VIS_BACKENDS], "visualizer")
        lost += [f"visualizer backend {b}: tunelab has no tracker of that kind (report_to)" for b in backends
                 if b not in _VIS_BACKENDS and b != "LocalVisBackend"]
    elif vis is not None:
        lost.append(f"visualizer = {show(vis)}: set report_to by hand")
    if env.get("load_from") is not None:
        lost.append(f"load_from = {show(env['load_from'])}: tunelab starts from pretrained_model_name_or_path; "
                    f"to go on with a tunelab run, `tunelab train ... --resume auto`")
    if env.get("resume") not in (None, False):
        lost.append(f"resume = {show(env['resume'])}: pass --resume auto to `tunelab train` instead")


def _strategy(env: dict, out: dict, lost: list, notes: list, origins: dict) -> None:
    """A DeepSpeed strategy (ZeRO stage, offload) as tunelab's deepspeed preset; FSDP as fsdp = True."""
    strategy = env.get("strategy")
    if strategy is None:
        return
    kind = _kind(strategy)
    if kind == "DeepSpeedStrategy":
        config = strategy.get("config")
        if isinstance(config, str):
            out["deepspeed"] = config
            notes.append(f"deepspeed = {config!r}: the DeepSpeed JSON of XTuner's strategy; a relative path is read "
                         f"from this file's folder, then the current directory")
        else:
            zero = config.get("zero_optimization") if isinstance(config, dict) else None
            stage = zero.get("stage") if isinstance(zero, dict) else None
            if stage in (1, 2, 3):
                offload = any(isinstance(zero.get(k), dict) and zero[k].get("device") in ("cpu", "nvme")
                              for k in ("offload_optimizer", "offload_param"))
                out["deepspeed"] = f"zero{stage}" + ("_offload" if offload and stage > 1 else "")
                notes.append(f"deepspeed = {out['deepspeed']!r}: tunelab's preset for XTuner's ZeRO stage {stage}"
                             f"{' with offload' if offload else ''}; its other DeepSpeed settings are tunelab's")
            else:
                lost.append(f"strategy = {show(strategy)}: no ZeRO stage 1-3 read from it; pass --deepspeed by hand")
                return
        origins["deepspeed"] = "strategy"
    elif kind == "FSDPStrategy":
        out["fsdp"], origins["fsdp"] = True, "strategy"
        notes.append("fsdp = True: XTuner's FSDPStrategy; tunelab shards with FSDP2, its own settings")
    else:
        lost.append(f"strategy = {show(strategy)}: tunelab has DeepSpeed presets (deepspeed) and FSDP (fsdp)")


def unread_runtime(cfg: XtunerConfig) -> list[str]:
    """Names assigned past PART 1 that nothing read, and statements that were not read."""
    reached = set()

    def walk(value):
        if id(value) in reached:
            return
        reached.add(id(value))
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    for name in _RUNTIME_NAMES:
        walk(cfg.env.get(name))
    lost = []
    for name, line in cfg.lines.items():
        if name in cfg.part1 or name in _RUNTIME_NAMES or id(cfg.env.get(name)) in reached:
            continue
        lost.append(f"{name} = {short(show(cfg.env.get(name)))} (line {line}): not read by tunelab")
    return lost + [f"{line}" for line in cfg.unread]



def short(text: str) -> str:
    return text if len(text) <= 100 else text[:97] + "..."


def show(value: Any) -> str:
    return getattr(value, "text", None) or repr(value)


def system_setting(value: Any, out: dict, lost: list, notes: list) -> None:
    if value is None or value == "":
        return
    if isinstance(value, Ref) and value.text.startswith("SYSTEM_TEMPLATE.") and value.last in SYSTEM_TEMPLATES:
        value = SYSTEM_TEMPLATES[value.last]
    if not isinstance(value, str):
        lost.append(f"SYSTEM = {show(value)}: write the system prompt as text")
        return
    out["SYSTEM"] = value
    notes.append("SYSTEM: XTuner uses it for evaluation only; tunelab also gives it to training samples that have no "
                 "system prompt (SYSTEM = '' trains as XTuner did)")
