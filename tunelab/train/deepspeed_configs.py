"""DeepSpeed ZeRO presets (`deepspeed = 'zero2'` in a config, or `--deepspeed zero2`) and the config built from them.

A preset says only how states are partitioned and offloaded; batch size, accumulation, clipping and precision come
from the tunelab config, so one setting lives in one place. A path to a DeepSpeed JSON is used as written, except
that "auto" values are filled in from the tunelab config (the convention of HF Trainer and accelerate).

| preset        | partitioned across ranks             | offloaded to CPU RAM |
|---------------|--------------------------------------|----------------------|
| zero1         | optimizer states                     | -                    |
| zero2         | optimizer states, gradients          | -                    |
| zero2_offload | optimizer states, gradients          | optimizer states     |
| zero3         | optimizer states, gradients, weights | -                    |
| zero3_offload | optimizer states, gradients, weights | optimizer, weights   |
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tunelab.errors import TunelabError

_OVERLAP = {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e8}
_STAGE3 = {
    "stage3_prefetch_bucket_size": 5e8,
    "stage3_param_persistence_threshold": 1e6,
    # Lets the engine hand back whole 16-bit weights when rank 0 saves the model.
    "stage3_gather_16bit_weights_on_model_save": True,
}
_CPU = {"device": "cpu", "pin_memory": True}

PRESETS: dict[str, dict] = {
    "zero1": {"stage": 1},
    "zero2": {"stage": 2, **_OVERLAP},
    "zero2_offload": {"stage": 2, **_OVERLAP, "offload_optimizer": _CPU},
    "zero3": {"stage": 3, **_OVERLAP, **_STAGE3},
    "zero3_offload": {"stage": 3, **_OVERLAP, **_STAGE3, "offload_optimizer": _CPU, "offload_param": _CPU},
}


def deepspeed_installed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def require_deepspeed() -> None:
    if not deepspeed_installed():
        raise TunelabError("deepspeed is set (config key 'deepspeed' or --deepspeed) but DeepSpeed is not installed: "
                           "pip install 'tunelab[deepspeed]' (or drop --deepspeed to train with plain DDP).")


def load_deepspeed_spec(spec: str) -> dict:
    """The `zero_optimization`-bearing dict for a preset name, or the whole JSON of a path."""
    if spec in PRESETS:
        return {"zero_optimization": copy.deepcopy(PRESETS[spec])}
    path = Path(spec)
    if not path.suffix == ".json" and not path.exists():
        raise TunelabError(f"deepspeed = {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file. "
                           "Use a preset name or the path of a DeepSpeed config JSON.")
    if not path.is_file():
        raise TunelabError(f"deepspeed = {spec!r}: file not found. Give the path of a DeepSpeed config JSON "
                           f"or a preset ({', '.join(PRESETS)}).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the DeepSpeed config file.") from None


def zero_stage(spec: str) -> int:
    return int(load_deepspeed_spec(spec).get("zero_optimization", {}).get("stage", 0))


def offloads(spec: str) -> bool:
    zero = load_deepspeed_spec(spec).get("zero_optimization", {})
    return any(zero.get(key, {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param"))


def build_deepspeed_config(cfg, *, precision: str, world_size: int) -> dict:
    """The dict handed to `deepspeed.initialize`.

    precision: 'bf16', 'fp16' or 'fp32' (what the model computes in). The optimizer is ours (tunelab builds it,
    the loop's lr schedule drives it), so the config carries no "optimizer"/"scheduler" section.
    """
    ds = load_deepspeed_spec(cfg.deepspeed)
    filled = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.accumulative_counts,
        "train_batch_size": cfg.batch_size * cfg.accumulative_counts * world_size,
        "gradient_clipping": float(cfg.max_norm or 0.0),
        "steps_per_print": 10**9,  # tunelab logs; keep DeepSpeed's own step log quiet
        "wall_clock_breakdown": False,
        # ZeRO wraps our own optimizer (torch AdamW, bitsandbytes' 8-bit AdamW), not one DeepSpeed lists as tested.
        "zero_allow_untested_optimizer": True,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = precision == name
    if ds["bf16"]["enabled"] and ds["fp16"]["enabled"]:
        raise TunelabError(f"deepspeed config {cfg.deepspeed!r} enables both bf16 and fp16; enable one.")
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # Our optimizer is torch's AdamW, not DeepSpeedCPUAdam: allow it to step on the offloaded CPU states.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise TunelabError(f"deepspeed config {cfg.deepspeed!r} has an '{key}' section; remove it: tunelab builds "
                               "the optimizer and lr schedule from the config keys lr, betas, weight_decay, "
                               "lr_scheduler, warmup_ratio / warmup_steps.")
    return ds
