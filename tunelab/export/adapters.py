"""Finding adapters on disk (in adapter directories and checkpoints), and checking that an adapter fits a base model.

Shared by `convert`, `chat`, `web` and `serve`, so every verb accepts the same paths and says the same thing when an
adapter was trained for another base model. Checkpoints themselves are found by `tunelab.train.layout`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.train.layout import MODEL_DIR, is_checkpoint, looks_like_work_dir, resolve_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def find_adapter_dir(path: str | Path) -> tuple[Path, Path]:
    """(adapter directory, directory holding its tunelab.json) for an adapter dir, an iter_N dir or a WORK_DIR."""
    p = Path(path)
    if not p.exists():
        raise TunelabError(f"adapter not found: {p}")
    if (p / ADAPTER_CONFIG).is_file():
        _check_adapter_files(p)
        return p, p
    if is_checkpoint(p) or looks_like_work_dir(p):
        ckpt = resolve_checkpoint(p)
        if (ckpt / MODEL_DIR / ADAPTER_CONFIG).is_file():
            _check_adapter_files(ckpt / MODEL_DIR)
            return ckpt / MODEL_DIR, ckpt
        raise TunelabError(f"{ckpt}/{MODEL_DIR} is a full model, not an adapter (no {ADAPTER_CONFIG}): "
                           f"chat with it directly: `tunelab chat {ckpt}/{MODEL_DIR}`.")
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
