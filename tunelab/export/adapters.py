"""Finding checkpoints and adapters on disk, and checking that an adapter fits a base model.

Shared by `convert`, `chat`, `web` and `serve`, so every verb accepts the same paths and says the same thing when an
adapter was trained for another base model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

from tunelab.errors import TunelabError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def resolve_checkpoint(path: str | Path) -> Path:
    """The `iter_N/` directory that `path` means: an iter_N dir itself, or a WORK_DIR (→ its last checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise TunelabError(f"checkpoint not found: {p}. Pass a WORK_DIR (its last checkpoint is used) "
                           f"or one of its iter_N directories.")
    if p.is_file():
        if p.name == "last_checkpoint":
            return resolve_checkpoint(_read_last_checkpoint(p.parent))
        raise TunelabError(f"{p} is a file; tunelab checkpoints are directories (WORK_DIR/iter_N/ holding model/ "
                           f"and tunelab.json). Pass the iter_N directory or the WORK_DIR.")
    if (p / "model").is_dir():
        return p
    if (p / "last_checkpoint").is_file():
        return resolve_checkpoint(_read_last_checkpoint(p))
    iters = sorted((d for d in p.glob("iter_*") if (d / "model").is_dir() and not d.name.endswith(".tmp")),
                   key=lambda d: int(d.name.split("_")[-1]) if d.name.split("_")[-1].isdigit() else -1)
    if iters:
        return iters[-1]
    kind = sharded_checkpoint_kind(p)
    if kind:
        refuse_raw_engine_checkpoint(p, kind)
    raise TunelabError(f"{p} is not a tunelab checkpoint: expected {p}/model/ (an iter_N directory) or "
                       f"{p}/last_checkpoint (a WORK_DIR). Did training save a checkpoint yet? (see save_steps)")


def _read_last_checkpoint(work_dir: Path) -> Path:
    name = (work_dir / "last_checkpoint").read_text().strip()
    for candidate in (Path(name), work_dir / name, work_dir / Path(name).name):
        if candidate.is_dir():
            return candidate
    raise TunelabError(f"{work_dir / 'last_checkpoint'} names {name!r}, which does not exist. "
                       f"Pass one of the iter_N directories in {work_dir} instead.")


def sharded_checkpoint_kind(path: Path) -> str | None:
    """'deepspeed' / 'fsdp' when `path` looks like a sharded checkpoint written by those engines, else None."""
    if (path / "zero_to_fp32.py").exists() or list(path.glob("global_step*")) or list(path.glob("*model_states.pt")):
        return "deepspeed"
    if list(path.glob("*.distcp")):
        return "fsdp"
    return None


def refuse_raw_engine_checkpoint(path: Path, kind: str) -> NoReturn:
    """A raw DeepSpeed / FSDP checkpoint (not one of tunelab's iter_N directories): say what to do instead.

    tunelab's own training saves a consolidated `model/` in every iter_N (even with DeepSpeed / FSDP), so only raw
    engine checkpoints (e.g. XTuner's iter_N.pth/ folders) land here; `convert` does not read them.
    """
    how = (" To get whole fp32 weights from it in Python: "
           "tunelab.train.sharded_state.load_consolidated_state_dict(path) (DeepSpeed's zero_to_fp32)."
           if kind == "deepspeed" else "")
    raise TunelabError(f"{path} looks like a raw {kind} checkpoint, which `convert` cannot read. Use the iter_N "
                       f"directories tunelab's training writes (they hold a consolidated model/).{how}")


def find_adapter_dir(path: str | Path) -> tuple[Path, Path]:
    """(adapter directory, directory holding its tunelab.json) for an adapter dir, an iter_N dir or a WORK_DIR."""
    p = Path(path)
    if not p.exists():
        raise TunelabError(f"adapter not found: {p}")
    if (p / ADAPTER_CONFIG).is_file():
        _check_adapter_files(p)
        return p, p
    if (p / "model").is_dir() or (p / "last_checkpoint").is_file() or list(p.glob("iter_*")):
        ckpt = resolve_checkpoint(p)
        if (ckpt / "model" / ADAPTER_CONFIG).is_file():
            _check_adapter_files(ckpt / "model")
            return ckpt / "model", ckpt
        raise TunelabError(f"{ckpt}/model is a full model, not an adapter (no {ADAPTER_CONFIG}): "
                           f"chat with it directly: `tunelab chat {ckpt}/model`.")
    raise TunelabError(f"{p} is not a LoRA adapter: {p / ADAPTER_CONFIG} is missing. Convert a training "
                       f"checkpoint first: `tunelab convert pth_to_hf CFG WORK_DIR/iter_N {p}`.")


def _check_adapter_files(adapter_dir: Path) -> None:
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise TunelabError(f"{adapter_dir} has {ADAPTER_CONFIG} but no weights ({' or '.join(ADAPTER_WEIGHTS)}); "
                           f"the adapter was not saved completely. Convert the checkpoint again.")


def read_adapter_config(adapter_dir: Path) -> dict:
    try:
        return json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{Path(adapter_dir) / ADAPTER_CONFIG} is not valid JSON (line {exc.lineno}): {exc.msg}")


def adapter_tensor_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the adapter's tensors, read without loading them where possible."""
    adapter_dir = Path(adapter_dir)
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import torch

    state = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def check_adapter_fits(model, adapter_dir: Path, base_name: str) -> None:
    """Raise a clear TunelabError when the adapter's tensors do not fit `model` (an adapter for another base).

    peft would fail later with a long 'size mismatch' traceback, or — worse — silently skip modules it cannot find.
    """
    adapter_dir = Path(adapter_dir)
    trained_on = read_adapter_config(adapter_dir).get("base_model_name_or_path") or "(not recorded)"
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    problems = []
    for key, shape in adapter_tensor_shapes(adapter_dir).items():
        name = key.removeprefix("base_model.model.")
        for part in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"):
            if part in name:
                module_name = name.split(part)[0]
                module = modules.get(module_name)
                if module is None:
                    problems.append(f"the base has no module {module_name!r}")
                elif part == ".lora_A." and hasattr(module, "in_features") and shape[-1] != module.in_features:
                    problems.append(f"{module_name}: adapter input size {shape[-1]}, base {module.in_features}")
                elif part == ".lora_B." and hasattr(module, "out_features") and shape[0] != module.out_features:
                    problems.append(f"{module_name}: adapter output size {shape[0]}, base {module.out_features}")
                break
        else:  # modules_to_save (e.g. resized embeddings): full tensors that replace the base's
            if name in params and tuple(params[name].shape) != shape and getattr(params[name], "quant_state", None) is None:
                problems.append(f"{name}: adapter shape {list(shape)}, base {list(params[name].shape)}")
        if len(problems) >= 3:
            break
    if problems:
        raise TunelabError(
            f"the adapter {adapter_dir} does not fit the base model {base_name}: " + "; ".join(problems) + ". "
            f"It was trained on {trained_on} (adapter_config.json base_model_name_or_path): pass that base model.")
