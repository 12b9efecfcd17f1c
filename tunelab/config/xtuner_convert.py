"""Move an XTuner config's settings into a tunelab config: `tunelab convert xtuner-config IN.py OUT.py`.

    path, migration = convert("internlm2_chat_1_8b_qlora_alpaca_e3.py", "my_config.py")

`migrate` maps what `tunelab.config.xtuner_config.read_xtuner_config` read (PART-1 settings, the model dict, the
dataset and its dataset_map_fn, the schedule) to tunelab settings, collecting what did not carry over and what works
differently; `convert` writes them through tunelab's own config template (the one `copy-cfg` uses), with a header
listing both, and checks that the result loads.
"""

from __future__ import annotations

import ast
import builtins
import math
import os
import re
import string
import symtable
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.xtuner_config import XTUNER_MODULES, Ref, XtunerConfig, read_xtuner_config
from tunelab.config.xtuner_map_fns import XTUNER_MAP_FNS
from tunelab.errors import TunelabError

# XTuner's dataset_map_fn -> the tunelab format that reads the same records the same way
MAP_FN_FORMATS = {"alpaca_map_fn": "alpaca", "openai_map_fn": "messages", "pretrain_map_fn": "text",
                  "default_map_fn": "alpaca", "wizardlm_map_fn": "sharegpt", "msagent_react_map_fn": "agent"}
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
# PART-1 names tunelab has no setting for, and why that is fine
_NOT_NEEDED = {
    "use_varlen_attn": "tunelab always keeps packed samples apart (varlen attention on a GPU, masks elsewhere)",
    "dataloader_num_workers": "tunelab's data is prepared and cached before training",
    "optim_type": "tunelab uses AdamW (optimizer = 'adamw_8bit' for 8-bit states)",
}


# --- mapping to tunelab settings ------------------------------------------------------------------

@dataclass
class Migration:
    settings: dict[str, Any]
    not_carried: list[str]
    """One line each: what was left behind and what to do about it."""
    notes: list[str]
    """Behaviour that differs from XTuner's though the setting carried over."""
    map_fn_source: str = ""
    """The map function written into the config, with the imports and helpers it uses before it."""
    origins: dict[str, str] = field(default_factory=dict)
    """Setting -> the XTuner name it was read from (`lr`, `train_cfg.max_iters`), for error messages."""


def migrate(cfg: XtunerConfig) -> Migration:
    env, out, lost, notes = cfg.env, {}, [], []
    used, origins = set(), {}

    def take(name: str, key: str | None = None, kind=(int, float, str, list, tuple, bool)) -> None:
        value = env.get(name)
        if name in env:
            used.add(name)
            origins[key or name] = name
            if isinstance(value, kind) and not isinstance(value, Ref):
                out[key or name] = list(value) if isinstance(value, tuple) and key != "betas" else value
            else:
                lost.append(f"{name} = {getattr(value, 'text', value)!r}: not a plain value; set "
                            f"{key or name} by hand")

    for name in ("max_length", "pack_to_max_length", "batch_size", "accumulative_counts", "lr", "max_epochs",
                 "betas", "weight_decay", "max_norm", "warmup_ratio", "save_steps", "save_total_limit",
                 "evaluation_freq", "evaluation_inputs"):
        take(name)
    _model(cfg, out, lost, notes, used)
    _template(env, out, lost, used)
    _system(env.get("SYSTEM"), out, lost, notes, used)
    used.add("SYSTEM")
    map_fn_source = _data(cfg, out, lost, notes, used)
    _schedule(env, out, lost, notes)
    _runtime(cfg, out, lost, notes, origins)
    for key in ("weight_decay", "max_norm", "lr", "warmup_ratio"):
        if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = float(out[key])
    seed = (env.get("randomness") or {}).get("seed") if isinstance(env.get("randomness"), dict) else None
    if isinstance(seed, int):
        out["seed"], origins["seed"] = seed, "randomness.seed"
    if env.get("sequence_parallel_size", 1) not in (1, None):
        # The same meaning: each row over that many GPUs; accumulative_counts (XTuner multiplies it by the size so
        # the global batch stays put) is micro-batches per step of each group, as tunelab counts it.
        take("sequence_parallel_size")
        notes.append(f"sequence_parallel_size = {env['sequence_parallel_size']}: each row over that many GPUs; "
                     f"start a multiple of it (NPROC_PER_NODE), as with XTuner")
    used.add("sequence_parallel_size")
    for name in cfg.part1:
        if name in _NOT_NEEDED:
            notes.append(f"{name}: {_NOT_NEEDED[name]}")
        elif name not in used and not any(name in line for line in lost):
            lost.append(f"{name} = {_show(env.get(name))}: no tunelab setting of that name")
    lost += _unread_runtime(cfg)
    if "deepspeed" not in out:
        notes.append("deepspeed: XTuner takes it on the command line (--deepspeed deepspeed_zero2); so does "
                     "tunelab: `tunelab train THIS_FILE --deepspeed zero2` (zero1, zero2, zero3, *_offload), or set "
                     "deepspeed here")
    return Migration(out, lost, notes, map_fn_source, origins)


# --- what XTuner runs past PART 1: the loop, the hooks, the strategy ---------------------------------

# mmengine names past PART 1 that `_runtime` and the sections above read, or that need nothing in tunelab
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


def _runtime(cfg: XtunerConfig, out: dict, lost: list, notes: list, origins: dict) -> None:
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
            lost.append(f"default_hooks.{name} = {_show(hook)}: tunelab has no hook of that kind")
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
                _system(hook["system"], out, lost, notes, set())
                origins["SYSTEM"] = "EvaluateChatHook system"
            for key in hook:
                if key not in ("type", "tokenizer", "evaluation_inputs", "every_n_iters", "max_new_tokens", "system",
                               "prompt_template", "stop_word", "stop_words"):
                    lost.append(f"EvaluateChatHook {key} = {_show(hook[key])}: tunelab's evaluation has no such "
                                f"setting")
        elif kind not in _QUIET_HOOKS:
            lost.append(f"custom_hooks: {_show(hook)}: tunelab has no hook of that kind")
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
        backends = [_kind(b) or _show(b)
                    for b in vis.get("vis_backends") or []]
        put("report_to", [_VIS_BACKENDS[b] for b in backends if b in _VIS_BACKENDS], "visualizer")
        lost += [f"visualizer backend {b}: tunelab has no tracker of that kind (report_to)" for b in backends
                 if b not in _VIS_BACKENDS and b != "LocalVisBackend"]
    elif vis is not None:
        lost.append(f"visualizer = {_show(vis)}: set report_to by hand")
    if env.get("load_from") is not None:
        lost.append(f"load_from = {_show(env['load_from'])}: tunelab starts from pretrained_model_name_or_path; "
                    f"to go on with a tunelab run, `tunelab train ... --resume auto`")
    if env.get("resume") not in (None, False):
        lost.append(f"resume = {_show(env['resume'])}: pass --resume auto to `tunelab train` instead")


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
                lost.append(f"strategy = {_show(strategy)}: no ZeRO stage 1-3 read from it; pass --deepspeed by hand")
                return
        origins["deepspeed"] = "strategy"
    elif kind == "FSDPStrategy":
        out["fsdp"], origins["fsdp"] = True, "strategy"
        notes.append("fsdp = True: XTuner's FSDPStrategy; tunelab shards with FSDP2, its own settings")
    else:
        lost.append(f"strategy = {_show(strategy)}: tunelab has DeepSpeed presets (deepspeed) and FSDP (fsdp)")


def _unread_runtime(cfg: XtunerConfig) -> list[str]:
    """Names assigned past PART 1 that nothing read, and statements that were not read."""
    reached, seen = set(), set()

    def walk(value):
        if id(value) in seen:
            return
        seen.add(id(value))
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
        lost.append(f"{name} = {_short(_show(cfg.env.get(name)))} (line {line}): not read by tunelab")
    return lost + [f"{line}" for line in cfg.unread]


def _short(text: str) -> str:
    return text if len(text) <= 100 else text[:97] + "..."


def _show(value: Any) -> str:
    return getattr(value, "text", None) or repr(value)


def _model(cfg: XtunerConfig, out: dict, lost: list, notes: list, used: set) -> None:
    env = cfg.env
    model = env.get("model") if isinstance(env.get("model"), dict) else {}
    kind = getattr(model.get("type"), "last", "")
    if kind and kind not in ("SupervisedFinetune",):
        raise TunelabError(f"{cfg.path}: an XTuner {kind} config. tunelab converts supervised fine-tuning configs "
                           f"(model = dict(type=SupervisedFinetune, ...)); "
                           + ("multimodal training has its own configs (`tunelab list-cfg -p llava`)."
                              if "LLaVA" in kind else "preference training (DPO / KTO) reads its data through "
                              "tunelab.data.preference.") )
    llm = model.get("llm") if isinstance(model.get("llm"), dict) else {}
    name = llm.get("pretrained_model_name_or_path", env.get("pretrained_model_name_or_path"))
    used.add("pretrained_model_name_or_path")
    if isinstance(name, str):
        out["pretrained_model_name_or_path"] = name
    else:
        lost.append(f"pretrained_model_name_or_path = {_show(name)}: set it by hand")
    if llm.get("trust_remote_code"):
        notes.append("trust_remote_code: XTuner's configs set it; tunelab leaves it off (InternLM2 loads natively, "
                     "no remote code). Set trust_remote_code = True only for a model that needs its own code")
    quant = llm.get("quantization_config") if isinstance(llm.get("quantization_config"), dict) else {}
    lora = model.get("lora") if isinstance(model.get("lora"), dict) else None
    bits = 4 if quant.get("load_in_4bit") else 8 if quant.get("load_in_8bit") else None
    out["method"] = "full" if lora is None else "qlora" if bits else "lora"
    if bits and lora is None:
        lost.append("a quantised model without LoRA: tunelab trains quantised bases through LoRA only; "
                    "method = 'full' is used")
    if bits == 8:
        out["quant_bits"] = 8
    if lora is not None:
        for src, key in (("r", "lora_r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"),
                         ("target_modules", "lora_target_modules"), ("bias", "lora_bias")):
            value = lora.get(src)
            if isinstance(value, (int, float, str, list, tuple)) and not isinstance(value, Ref):
                out[key] = list(value) if isinstance(value, tuple) else value
        if isinstance(out.get("lora_dropout"), int):
            out["lora_dropout"] = float(out["lora_dropout"])
    if "float16" in _show(llm.get("torch_dtype")):
        notes.append("dtype: the XTuner config computes in float16; tunelab's dtype = 'auto' uses bf16 where the GPU "
                     "has it (fp16 with loss scaling elsewhere)")


def _template(env: dict, out: dict, lost: list, used: set) -> None:
    used.add("prompt_template")
    value = env.get("prompt_template")
    if value is None:
        return
    name = value.last if isinstance(value, Ref) else value
    from tunelab.data.templates import TEMPLATES

    if isinstance(name, str) and name in TEMPLATES:
        out["prompt_template"] = name
    else:
        out["prompt_template"] = "hf"
        lost.append(f"prompt_template = {_show(value)}: tunelab has no template of that name; 'hf' (the tokenizer's "
                    f"own chat_template) is used. See docs/DATA.md, Templates")


def _system(value: Any, out: dict, lost: list, notes: list, used: set) -> None:
    if value is None or value == "":
        return
    if isinstance(value, Ref) and value.text.startswith("SYSTEM_TEMPLATE.") and value.last in SYSTEM_TEMPLATES:
        value = SYSTEM_TEMPLATES[value.last]
    if not isinstance(value, str):
        lost.append(f"SYSTEM = {_show(value)}: write the system prompt as text")
        return
    out["SYSTEM"] = value
    notes.append("SYSTEM: XTuner uses it for evaluation only; tunelab also gives it to training samples that have no "
                 "system prompt (SYSTEM = '' trains as XTuner did)")


def _datasets(env: dict) -> list[dict]:
    loader = env.get("train_dataloader") if isinstance(env.get("train_dataloader"), dict) else {}
    dataset = loader.get("dataset")
    if isinstance(dataset, dict) and isinstance(dataset.get("datasets"), list):  # ConcatDataset
        return [d for d in dataset["datasets"] if isinstance(d, dict)]
    return [dataset] if isinstance(dataset, dict) else []


_DATASET_KEYS = {"type", "dataset", "tokenizer", "max_length", "dataset_map_fn", "template_map_fn",
                 "remove_unused_columns", "shuffle_before_pack", "pack_to_max_length", "use_varlen_attn",
                 "map_num_proc", "input_ids_with_output"}


def _data(cfg: XtunerConfig, out: dict, lost: list, notes: list, used: set) -> str:
    """data_path, data_format (from dataset_map_fn), and the source of the map function the config needs (copied
    from the XTuner config, one of XTuner's built-in ones, or a stub that stops the data from being read)."""
    entries, functions = [], []  # functions: (dataset, map function name or None, its source)
    datasets = _datasets(cfg.env)
    if not datasets:
        lost.append("train_dataloader.dataset: not found; set data_path and data_format by hand")
        return ""
    for d in datasets:
        inner = d.get("dataset") if isinstance(d.get("dataset"), dict) else {}
        path, files = inner.get("path"), inner.get("data_files")
        if isinstance(files, dict):
            files = files.get("train")
        where = files if path in ("json", "csv", "parquet", "text") and files else path
        used.update(k for k, v in cfg.env.items() if v is where or v == where and isinstance(v, (str, list)))
        fn = d.get("dataset_map_fn")
        fn_name = fn.last if isinstance(fn, Ref) else None
        source = ""
        if fn_name in MAP_FN_FORMATS:
            fmt = MAP_FN_FORMATS[fn_name]
            if fn_name == "alpaca_map_fn":
                notes.append("alpaca_map_fn: XTuner dropped records whose output is '<nooutput>'; tunelab trains "
                             "every record (a dataset_map_fn returning None for them drops them too)")
            if fn_name == "msagent_react_map_fn":
                notes.append("msagent_react_map_fn: XTuner rewrote MS-Agent calls as ReAct text; tunelab reads them "
                             "as tool calls in the template's own tool format")
        elif fn_name in cfg.functions and not _uses_imports(cfg.functions[fn_name], cfg.imports):
            fmt, source = "conversation", _with_companions(cfg, fn_name, lost)
            notes.append(f"dataset_map_fn: {fn_name}, defined in the XTuner config, is copied (with the imports and "
                         f"helpers it uses); tunelab reads the {{'conversation': [...]}} records it returns")
        elif fn_name in XTUNER_MAP_FNS and cfg.imports.get(fn_name, "").split(".")[0] == "xtuner":
            fmt, source = "conversation", XTUNER_MAP_FNS[fn_name]
            notes.append(f"dataset_map_fn: XTuner's {fn_name} is written into this file (its code, from "
                         f"xtuner/dataset/map_fns); tunelab reads the {{'conversation': [...]}} records it returns")
        elif fn is None:
            fmt = "auto"
        else:
            # data_format 'auto' would read the raw records as something else (pretraining text, say) and train
            # them without a word: a stub that stops on the first record instead
            fmt, fn_name = "conversation", fn_name if fn_name and fn_name.isidentifier() else "xtuner_map_fn"
            source = _STUB.format(name=fn_name, text=_show(fn))
            lost.append(f"dataset_map_fn = {_show(fn)}: XTuner's own function, not carried over; this file has a "
                        f"stub {fn_name} that stops on the first record: replace its body with the function's code, "
                        f"returning {{'conversation': [{{'input': ..., 'output': ...}}]}}")
        if isinstance(where, list) and len(where) == 1:
            where = where[0]
        functions.append((where if isinstance(where, str) else _show(where), fn_name if source else None, source))
        for key in d:
            if key not in _DATASET_KEYS:
                lost.append(f"dataset {_show(where)}: {key} = {_show(d[key])}: tunelab has no setting of that name")
        if not isinstance(where, (str, list)) or isinstance(where, Ref):
            lost.append(f"dataset path {_show(where)}: set data_path by hand")
            continue
        for key in ("max_length", "pack_to_max_length", "shuffle_before_pack"):
            if isinstance(d.get(key), (int, bool)) and not isinstance(d.get(key), Ref) and key not in out:
                out[key] = d[key]
        entries += [(p, fmt) for p in (where if isinstance(where, list) else [where])]
    if len({name for _, name, _ in functions}) > 1:
        # dataset_map_fn applies to every data_path entry; data_path entries have no map function of their own
        each = "; ".join(f"{where}: {name or 'none'}" for where, name, _ in functions)
        raise TunelabError(f"{cfg.path}: train_dataloader's datasets are read with different map functions ({each}), "
                           f"and a tunelab config applies one dataset_map_fn to every data_path entry. Convert the "
                           f"datasets to one format first (e.g. save each one's mapped records as JSONL), or convert "
                           f"a config for each dataset.")
    if len(entries) == 1:
        out["data_path"], out["data_format"] = entries[0]
    elif entries:
        out["data_path"] = [{"path": p, "format": f} for p, f in entries]
        out["data_format"] = "auto"
    return functions[0][2] if functions else ""


_STUB = '''def {name}(example):
    # XTuner's {text} was not carried over: replace this body with its code, returning
    # {{"conversation": [{{"input": ..., "output": ...}}, ...]}} (the format tunelab reads).
    raise NotImplementedError("copy XTuner's {text} into this config (see the comment above it)")'''


def _with_companions(cfg: XtunerConfig, name: str, lost: list) -> str:
    """The source of the function `name` defined in the XTuner config, after the imports, the helper functions and
    the private constants (`_NAME = ...`) it uses, so that it runs in the new file as it did there."""
    imports, helpers, constants, done, todo = [], [], [], {name}, [name]
    while todo:
        fn = todo.pop()
        for used_name in _free_names(cfg.functions[fn]):
            if used_name in done or hasattr(builtins, used_name):
                continue
            done.add(used_name)
            if used_name in cfg.import_lines:
                imports.append(cfg.import_lines[used_name])
            elif used_name in cfg.functions:
                helpers.append(cfg.functions[used_name])
                todo.append(used_name)
            elif used_name.startswith("_") and not isinstance(cfg.env.get(used_name), Ref) \
                    and used_name in cfg.env:
                constants.append(f"{used_name} = {cfg.env[used_name]!r}")
            else:
                lost.append(f"{name} uses {used_name}, defined in the XTuner config: copy it into this file "
                            f"(as _{used_name} if it is not a setting)")
    return "\n\n\n".join(part for part in ("\n".join(sorted(set(imports))), "\n".join(constants), *helpers,
                                            cfg.functions[name]) if part)


def _uses_imports(source: str, imports: dict) -> bool:
    """Does the function read a name imported from mmengine / XTuner (which the new config cannot import)?"""
    return any(imports.get(n, "").split(".")[0] in XTUNER_MODULES for n in _free_names(source))


def _free_names(source: str) -> set[str]:
    """The global names a function's code reads (symtable: locals, parameters and nested scopes' own names left
    out)."""
    names, tables = set(), symtable.symtable(source, "<map_fn>", "exec").get_children()
    while tables:
        table = tables.pop()
        names.update(s.get_name() for s in table.get_symbols() if s.is_global() and s.is_referenced())
        tables += table.get_children()
    return names


def _schedule(env: dict, out: dict, lost: list, notes: list) -> None:
    schedulers = env.get("param_scheduler")
    kinds = [getattr(s.get("type"), "last", "") for s in schedulers or [] if isinstance(s, dict)]
    if kinds and kinds[-1] == "CosineAnnealingLR":
        out["lr_scheduler"] = "cosine"
    elif kinds and kinds[-1] in ("LinearLR",) and len(kinds) > 1:
        out["lr_scheduler"] = "linear"
    elif kinds and kinds[-1] == "ConstantLR":
        out["lr_scheduler"] = "constant"
    elif kinds:
        lost.append(f"param_scheduler {kinds}: tunelab has cosine, linear and constant after a linear warm-up")


# --- writing ----------------------------------------------------------------------------------------

def convert(source: str | Path, dest: str | Path, *, force: bool = False) -> tuple[Path, Migration]:
    """Write the tunelab config equivalent to the XTuner config `source`; returns its path and what was lost."""
    from tunelab.config.loader import load_config
    from tunelab.config.registry import TEMPLATE_PATH

    source, dest = Path(source), Path(dest)
    if dest.resolve() == source.resolve() or (dest.exists() and source.exists() and os.path.samefile(dest, source)):
        raise TunelabError(f"{dest} is the XTuner config being converted; writing there would destroy it. Give "
                           f"another OUT, e.g. {source.with_name(source.stem + '_tunelab.py')}")
    if dest.is_dir():
        raise TunelabError(f"{dest} is a folder; OUT is the config file to write, e.g. "
                           f"{dest / (source.stem + '_tunelab.py')}")
    if dest.exists() and not force:
        raise TunelabError(f"{dest} already exists; not overwriting it. Pass --force to replace it.")
    xtuner = read_xtuner_config(source)
    migration = migrate(xtuner)
    _check_settings(xtuner, migration)
    s = {"pretrained_model_name_or_path": "internlm/internlm2-chat-1_8b", "method": "qlora", "data_path": "",
         "data_format": "auto", "prompt_template": "internlm2_chat", "SYSTEM": "", "max_length": 2048,
         "batch_size": 1, "accumulative_counts": 16, "lr": 2e-4, "max_epochs": 3,
         "evaluation_inputs": ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"],
         "lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "lora_target_modules": "all-linear",
         **migration.settings}
    header = [f"converted from the XTuner config {source} by `tunelab convert xtuner-config`."]
    header += ["", "Not carried over (set these by hand if you need them):"] + \
        [f"  - {line}" for line in migration.not_carried or ["nothing"]]
    header += ["", "Carried over, but working differently:"] + [f"  - {line}" for line in migration.notes]
    values = {k: repr(v) for k, v in s.items()}
    values.update({
        "name": dest.stem, "file": dest.name, "description": "\n# ".join(header).replace("\n# \n", "\n#\n"),
        "next_steps": f"#   tunelab check-dataset {dest.name}   # see how the data is read",
        "trust_remote_code": "False", "optimizer": repr("adamw_8bit" if s["method"] == "qlora" else "adamw"),
        "data_note": "# From the XTuner config's dataset (dataset_map_fn -> data_format).",
        "objective": repr("sft"), "preference_block": "",
        "multimodal_block": "",  # supervised fine-tuning configs only (an XTuner LLaVA config is refused above)
    })
    text = string.Template(TEMPLATE_PATH.read_text(encoding="utf-8")).substitute(values)
    extra = []
    for key in ("pack_to_max_length", "warmup_ratio", "save_steps", "save_total_limit", "evaluation_freq",
                "weight_decay", "max_norm", "seed", "quant_bits", "lr_scheduler", "logging_steps", "report_to"):
        if key in s:
            text, found = _set_line(text, key, repr(s[key]))
            if not found:
                extra.append(f"{key} = {s[key]!r}")
    extra += [f"{key} = {s[key]!r}" for key in ("betas", "shuffle_before_pack", "lora_bias", "sequence_parallel_size",
                                                "max_steps", "eval_max_new_tokens", "deepspeed", "fsdp") if key in s]
    if migration.map_fn_source:
        name = re.findall(r"^def\s+(\w+)", migration.map_fn_source, re.M)[-1]
        extra += ["", migration.map_fn_source, "", f"dataset_map_fn = {name}"]
    if extra:
        banner = text.index("#######################################################################\n#            PART 2")
        text = text[:banner] + "# More settings from the XTuner config\n" + "\n".join(extra) + "\n\n" + text[banner:]
    # What we write must be a valid tunelab config: loaded from a scratch copy first, so a failure leaves no OUT
    # behind (a re-run would be told it exists)
    with tempfile.TemporaryDirectory() as scratch:
        trial = Path(scratch) / dest.name
        trial.write_text(text, encoding="utf-8")
        try:
            load_config(trial)
        except TunelabError as exc:
            raise TunelabError(f"{source}: the converted config would not load, so {dest} was not written:\n"
                               + str(exc).replace(str(trial), dest.name)) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    return dest, migration


def _check_settings(xtuner: XtunerConfig, migration: Migration) -> None:
    """Each carried value against tunelab's rules, named as the XTuner config has it (its name and line), before
    anything is written."""
    from tunelab.config.checks import check_setting, where
    from tunelab.config.schema import field_types

    errors = []
    for key, value in migration.settings.items():
        if key not in field_types():
            continue
        origin = migration.origins.get(key, key)
        line = xtuner.lines.get(origin.split(".")[0].split(" ")[0])
        _, error = check_setting(key, value, str(xtuner.path), line)
        if error:
            at = where(str(xtuner.path), key, line)
            named = f"{xtuner.path}: {origin} = {value!r}" + (f" (line {line})" if line else "")
            if origin != key:
                named += f", tunelab's '{key}',"
            errors.append(named + error[len(at):] if error.startswith(at) else error)
    if errors:
        raise TunelabError("\n".join(errors) + "\nFix the XTuner config (nothing was written).")


def _set_line(text: str, key: str, value: str) -> tuple[str, bool]:
    pattern = re.compile(rf"^{re.escape(key)} = [^#\n]*?(  #.*)?$", re.M)
    if not pattern.search(text):
        return text, False
    return pattern.sub(lambda m: f"{key} = {value}{m.group(1) or ''}", text, count=1), True
