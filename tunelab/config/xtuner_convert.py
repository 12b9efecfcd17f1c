"""Move an XTuner config's settings into a tunelab config: `tunelab convert xtuner-config IN.py OUT.py`.

    path, migration = convert("internlm2_chat_1_8b_qlora_alpaca_e3.py", "my_config.py")

`migrate` maps what `tunelab.config.xtuner_config.read_xtuner_config` read (PART-1 settings, the model dict, the
dataset and its dataset_map_fn, the schedule) to tunelab settings, collecting what did not carry over and what works
differently; `convert` writes them through tunelab's own config template (the one `copy-cfg` uses), with a header
listing both, and checks that the result loads.
"""

from __future__ import annotations

import os
import re
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.checks import NOT_NEEDED
from tunelab.config.xtuner_config import Ref, XtunerConfig, read_xtuner_config
from tunelab.config.xtuner_data import data_settings
from tunelab.config.xtuner_runtime import runtime_settings, show, system_setting, unread_runtime
from tunelab.errors import TunelabError

def _optimizer(method: str) -> str:
    """The optimizer the written config sets: 8-bit AdamW for QLoRA, as tunelab's own QLoRA configs."""
    return "adamw_8bit" if method == "qlora" else "adamw"


def _optim_type_note(method: str) -> str:
    """XTuner's optim_type (torch's AdamW) beside the optimizer the written config sets."""
    if _optimizer(method) == "adamw_8bit":
        return ("optim_type: XTuner's AdamW keeps 32-bit states; this config sets optimizer = 'adamw_8bit' (8-bit "
                "states, as tunelab's QLoRA configs); optimizer = 'adamw' trains as XTuner did")
    return "optim_type: optimizer = 'adamw' (torch's AdamW, as XTuner's)"


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
    system_setting(env.get("SYSTEM"), out, lost, notes)
    used.add("SYSTEM")
    map_fn_source = data_settings(cfg, out, lost, notes, used)
    _schedule(env, out, lost, notes)
    runtime_settings(cfg, out, lost, notes, origins)
    for key in ("weight_decay", "max_norm", "lr", "warmup_ratio"):
        if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = float(out[key])
    _seed(env, out, lost, origins)
    if env.get("sequence_parallel_size", 1) not in (1, None):
        # The same meaning: each row over that many GPUs; accumulative_counts (XTuner multiplies it by the size so
        # the global batch stays put) is micro-batches per step of each group, as tunelab counts it.
        take("sequence_parallel_size")
        notes.append(f"sequence_parallel_size = {env['sequence_parallel_size']}: each row over that many GPUs; "
                     f"start a multiple of it (NPROC_PER_NODE), as with XTuner")
    used.add("sequence_parallel_size")
    for name in cfg.part1:
        if name in NOT_NEEDED:
            notes.append(f"{name}: {NOT_NEEDED[name]}")
        elif name == "optim_type":
            notes.append(_optim_type_note(out["method"]))  # set by _model
        elif name not in used and not any(name in line for line in lost):
            lost.append(f"{name} = {show(env.get(name))}: no tunelab setting of that name")
    lost += unread_runtime(cfg)
    if "deepspeed" not in out:
        notes.append("deepspeed: XTuner takes it on the command line (--deepspeed deepspeed_zero2); so does "
                     "tunelab: `tunelab train THIS_FILE --deepspeed zero2` (zero1, zero2, zero3, *_offload), or set "
                     "deepspeed here")
    return Migration(out, lost, notes, map_fn_source, origins)




def _seed(env: dict, out: dict, lost: list, origins: dict) -> None:
    """randomness.seed: a number carries over; None (mmengine's default) makes mmengine draw a new random seed for each
    run, which no tunelab setting does (a run is always seeded, so it can be repeated): the header says so."""
    randomness = env.get("randomness")
    if not isinstance(randomness, dict):
        return
    seed = randomness.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        out["seed"], origins["seed"] = seed, "randomness.seed"
    elif seed is None:
        lost.append("randomness.seed = None: XTuner draws a new random seed for each run; a tunelab run is always "
                    "seeded (seed = 0 here, the same run twice gives the same loss curve): set seed, or pass "
                    "`--seed N` to `tunelab train`, for another draw")


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
        lost.append(f"pretrained_model_name_or_path = {show(name)}: set it by hand")
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
    if "float16" in show(llm.get("torch_dtype")):
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
        lost.append(f"prompt_template = {show(value)}: tunelab has no template of that name; 'hf' (the tokenizer's "
                    f"own chat_template) is used. See docs/DATA.md, Templates")


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
        "trust_remote_code": "False", "optimizer": repr(_optimizer(s["method"])),
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
