"""Finding adapters on disk (in adapter directories and checkpoints), what model and adapter a MODEL a user typed
means (`model_to_load`), and checking that an adapter fits a base model.

Shared by `convert` (merge, GGUF), `chat`, `web`, `serve` and `reward`, so every verb accepts the same paths and says the same thing when an
adapter was trained for another base model. Checkpoints themselves are found by `tunelab.train.layout`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.model.shapes import local_config_file
from tunelab.train.layout import (MODEL_DIR, is_checkpoint, looks_like_work_dir, read_meta, refuse_damaged,
                                  resolve_checkpoint)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def find_adapter_dir(path: str | Path) -> tuple[Path, Path]:
    """(adapter directory, directory holding its tunelab.json) for an adapter dir, an iter_N dir or a WORK_DIR."""
    p = Path(path)
    if not p.exists():
        raise TunelabError(f"adapter not found: {p}")
    if (p / ADAPTER_CONFIG).is_file():
        _refuse_damaged_checkpoint_of(p)
        _check_adapter_files(p)
        return p, p
    if is_checkpoint(p) or looks_like_work_dir(p):
        return _adapter_of(resolve_checkpoint(p))
    if (p / "config.json").is_file():  # a model (a merged one holds its adapter already): nothing to put on a base
        merged = (read_meta(p) or {}).get("merged_adapter")
        what = f"a merged model (base + the adapter {merged})" if merged else "a full model, not a LoRA adapter"
        raise TunelabError(f"{p} is {what}: it has config.json and no {ADAPTER_CONFIG}, so there is nothing to add "
                           f"to a base model. Use it as the model itself: `tunelab chat {p}`.")
    raise TunelabError(f"{p} is not a LoRA adapter: {p / ADAPTER_CONFIG} is missing. Convert a training "
                       f"checkpoint first: `tunelab convert pth_to_hf CFG WORK_DIR/iter_N {p}`.")


def _adapter_of(ckpt: Path) -> tuple[Path, Path]:
    """(adapter directory, checkpoint) of a checkpoint `resolve_checkpoint` gave (found and checked already)."""
    if (ckpt / MODEL_DIR / ADAPTER_CONFIG).is_file():
        _check_adapter_files(ckpt / MODEL_DIR)
        return ckpt / MODEL_DIR, ckpt
    raise TunelabError(f"{ckpt}/{MODEL_DIR} is a full model, not an adapter (no {ADAPTER_CONFIG}): "
                       f"chat with it directly: `tunelab chat {ckpt}/{MODEL_DIR}`.")


def is_run_or_adapter(p: Path) -> bool:
    """A folder that is a LoRA adapter, a training checkpoint or a work dir: not a model to load as it is."""
    return p.is_dir() and ((p / ADAPTER_CONFIG).is_file() or is_checkpoint(p) or looks_like_work_dir(p))


@dataclass
class ModelToLoad:
    """What a MODEL (and --adapter) a user typed means: the model to load and the adapter to put on it."""

    base: str
    """The model to load: a hub id or a folder (a full run's WORK_DIR/iter_N/model)."""
    adapter_dir: Path | None
    """The LoRA adapter folder to put on `base`, or None."""
    meta: dict
    """The training record (tunelab.json) of the adapter, else of the model; {} when there is none."""
    run_dir: Path | None
    """The checkpoint or adapter folder typed as MODEL (the run it came from), or None when MODEL is a model."""


def model_to_load(model_path: str, adapter: str | None) -> ModelToLoad:
    """What `tunelab chat / web / serve / reward / convert gguf MODEL [--adapter A]` loads. MODEL may be a WORK_DIR or
    iter_N (a LoRA run: its base from tunelab.json with the adapter on it; a full run: its model/ with the
    checkpoint's tunelab.json), an adapter folder, or a model (hub id or folder; its tunelab.json beside it, or one
    level up for WORK_DIR/iter_N/model)."""
    p = Path(model_path)
    if is_run_or_adapter(p) and not (p / "config.json").is_file():
        if adapter:
            raise TunelabError(f"{model_path} is already a checkpoint / adapter: pass the base model as MODEL and this "
                               f"as --adapter, or use {model_path} alone as MODEL.")
        if (p / ADAPTER_CONFIG).is_file():
            adapter_dir, meta_dir = find_adapter_dir(p)
        else:
            ckpt = resolve_checkpoint(p)  # checked against its checksums once, here
            if not (ckpt / MODEL_DIR / ADAPTER_CONFIG).is_file():  # a full fine-tuning run: the model itself
                return ModelToLoad(str(ckpt / MODEL_DIR), None, read_meta(ckpt) or read_meta(ckpt / MODEL_DIR) or {},
                                   ckpt)
            adapter_dir, meta_dir = _adapter_of(ckpt)
        meta = read_meta(meta_dir) or read_meta(adapter_dir) or {}
        if not meta.get("base_model"):
            raise TunelabError(f"{meta_dir} has no tunelab.json naming its base model: pass the base model as MODEL "
                               f"and {model_path} as --adapter.")
        return ModelToLoad(str(meta["base_model"]), adapter_dir, meta, meta_dir)
    adapter_dir, meta = None, None
    if adapter:
        adapter_dir, meta_dir = find_adapter_dir(adapter)
        meta = read_meta(meta_dir) or read_meta(adapter_dir)
    _refuse_damaged_checkpoint_of(p)
    if meta is None and p.is_dir():
        meta = read_meta(p)
        if meta is None and p.name == MODEL_DIR and is_checkpoint(p.parent):  # WORK_DIR/iter_N/model
            meta = read_meta(p.parent)
    return ModelToLoad(model_path, adapter_dir, meta or {}, None)


def _refuse_damaged_checkpoint_of(folder: Path) -> None:
    """WORK_DIR/iter_N/model typed by itself is checked against its checkpoint's checksums too, as iter_N is."""
    if folder.name == MODEL_DIR and is_checkpoint(folder.parent):
        refuse_damaged(folder.parent)


def _check_adapter_files(adapter_dir: Path) -> None:
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise TunelabError(f"{adapter_dir} has {ADAPTER_CONFIG} but no weights ({' or '.join(ADAPTER_WEIGHTS)}); "
                           f"the adapter was not saved completely. Convert the checkpoint again.")


def check_adapter_runs_on(adapter_dir: Path | None, bits: int | None, device) -> None:
    """Before the base loads: a DoRA adapter on an 8-bit base cannot run on the CPU (peft's DoRA loses the 8-bit
    weight's scales there: `tunelab.model.load.check_runs_on`, which refuses training so)."""
    if adapter_dir is None or bits != 8 or str(device).split(":")[0] != "cpu":
        return
    if read_adapter_config(adapter_dir).get("use_dora"):
        raise TunelabError(f"--bits 8 with the DoRA adapter {adapter_dir} cannot run on the CPU: peft's DoRA loses "
                           f"the 8-bit weight's scales there (it runs on a GPU). Use --bits 4, or leave --bits out.")


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    except UnicodeDecodeError:
        raise TunelabError(f"{path} is not text (damaged?): convert the training checkpoint again.") from None
    if not isinstance(config, dict):
        raise TunelabError(f"{path}: expected a JSON object (peft's LoRA config), found {type(config).__name__}.")
    return config


def _unreadable(path: Path, exc: Exception) -> TunelabError:
    first = (str(exc).splitlines() or [""])[0][:200]
    return TunelabError(f"{path}: cannot be read as adapter weights ({type(exc).__name__}: {first}). The file is "
                        f"damaged or not an adapter: convert the training checkpoint again "
                        f"(`tunelab convert pth_to_hf CFG WORK_DIR/iter_N OUT`).")


def load_adapter_weights(adapter_dir: Path) -> dict:
    """The adapter's tensors (safetensors, or a .bin read with weights_only=True: no pickled code runs)."""
    adapter_dir = Path(adapter_dir)
    st = adapter_dir / "adapter_model.safetensors"
    path = st if st.is_file() else adapter_dir / "adapter_model.bin"
    try:
        if path == st:
            from safetensors.torch import load_file

            return load_file(str(st))
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, zipfile and unpickling each raise their own types for a damaged file
        raise _unreadable(path, exc) from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise _unreadable(path, TypeError(f"holds a {type(state).__name__}, not a dict of tensors"))
    return state


def adapter_tensor_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the adapter's tensors, read without loading them where possible."""
    adapter_dir = Path(adapter_dir)
    st = adapter_dir / "adapter_model.safetensors"
    if not st.is_file():
        return {k: tuple(v.shape) for k, v in load_adapter_weights(adapter_dir).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(st), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # a damaged header
        raise _unreadable(st, exc) from None


def _config_model_type(name_or_path: str) -> str | None:
    """model_type in the config.json of a local model directory or of a hub model in the local cache, else None."""
    path = local_config_file(name_or_path)
    if path is None:
        return None
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _same_name(a: str, b: str) -> bool:
    """The same model by name: the same string, the same directory, or a hub id and a local folder of its name."""
    if a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()):
        return True
    return Path(a.rstrip("/")).name.lower() == Path(b.rstrip("/")).name.lower()


def check_adapter_base(model, adapter_dir: Path, base_name: str, meta: dict | None, *, allow_other_base: bool,
                       say=print) -> None:
    """Refuse an adapter trained on a base of another architecture than `model` (a Llama adapter into a Qwen2 base
    of the same shapes would load without a complaint and produce nonsense), unless `allow_other_base`.

    The adapter's base is the one adapter_config.json (or tunelab.json) names; its architecture is what tunelab.json
    recorded at training, or that base's config.json where it is on this machine."""
    meta = meta or {}
    trained_on = read_adapter_config(adapter_dir).get("base_model_name_or_path") or meta.get("base_model")
    if not trained_on:
        return
    recorded = (meta.get("model_type") if meta.get("base_model") == trained_on else None) \
        or _config_model_type(trained_on)
    actual = {getattr(getattr(model, "config", None), "model_type", None), _config_model_type(base_name)} - {None}
    if recorded is None or not actual:
        if not _same_name(str(trained_on), str(base_name)):
            say(f"note: the adapter was trained on {trained_on}, not {base_name}; that model is not on this "
                f"machine, so only the tensor shapes could be checked")
    elif recorded not in actual:
        if not allow_other_base:
            raise TunelabError(f"the adapter {adapter_dir} was trained on {trained_on} (model_type {recorded!r}), "
                               f"but {base_name} is a {' / '.join(sorted(actual))!r} model: an adapter works on the "
                               f"model it was trained on. Pass {trained_on} as the base model, or --allow-other-base "
                               f"if this base is the right one.")
        say(f"warning: the adapter was trained on {trained_on} ({recorded}), applied to {base_name} "
            f"({', '.join(sorted(actual))}) as --allow-other-base asks")


def check_adapter_fits(model, adapter_dir: Path, base_name: str, shapes: dict[str, tuple[int, ...]], *,
                       meta: dict | None = None, allow_other_base: bool = False, say=print) -> None:
    """Raise a clear TunelabError when the adapter does not fit `model`: tensors of other shapes or modules the base
    lacks (an adapter for another base), or a base of another architecture (`check_adapter_base`).

    peft would fail later with a long 'size mismatch' traceback, or — worse — silently skip modules it cannot find.
    """
    _refuse_merged_twice(adapter_dir, base_name)
    _check_tensor_shapes(model, adapter_dir, base_name, shapes)
    check_adapter_base(model, adapter_dir, base_name, meta, allow_other_base=allow_other_base, say=say)


def apply_adapter(model, adapter_dir: Path, base_name: str, *, meta: dict | None = None,
                  allow_other_base: bool = False, say=print):
    """`model` with the LoRA adapter of `adapter_dir` on it (a peft model), after `check_adapter_fits`: how chat,
    serve, reward scoring, merge and GGUF export all put an adapter on its base."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    shapes = adapter_tensor_shapes(adapter_dir)  # read once: the vocabulary and the shape checks both use them
    _grow_vocab(model, shapes, say)
    check_adapter_fits(model, adapter_dir, base_name, shapes, meta=meta, allow_other_base=allow_other_base, say=say)
    return PeftModel.from_pretrained(model, str(adapter_dir))


def _grow_vocab(model, shapes: dict[str, tuple[int, ...]], say) -> None:
    """An adapter trained with new tokens holds the whole resized embedding and output layers (peft saves them, the
    tokenizer beside them): the base is resized to the adapter's rows first, as peft's docs do, so they load; the new
    rows come from the adapter. Fewer rows than the base's is another base, refused by check_adapter_fits."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None:
        return
    layers = {name for name, module in model.named_modules() if module is emb or module is head}
    rows = 0
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.").removesuffix(".weight")
        for wrapper in (".modules_to_save.default", ".modules_to_save", ".original_module"):
            name = name.replace(wrapper, "")
        if name in layers and len(shape) == 2:
            rows = max(rows, shape[0])
    if rows > emb.num_embeddings:
        say(f"the adapter's embeddings have {rows} rows (its tokenizer gained tokens in training), the base's "
            f"{emb.num_embeddings}: the base is resized to {rows} to take them")
        model.resize_token_embeddings(rows, mean_resizing=False)


def _refuse_merged_twice(adapter_dir: Path, base_name: str) -> None:
    """A model `convert merge` wrote already holds its adapter (tunelab.json's `merged_adapter`): applying the same
    adapter again would add its update a second time, and nothing would look wrong until the model answered."""
    base_meta = (read_meta(Path(base_name)) or {}) if Path(base_name).is_dir() else {}
    merged = base_meta.get("merged_adapter")
    if merged and Path(merged).resolve() == adapter_dir.resolve():
        raise TunelabError(f"{base_name} already holds the adapter {adapter_dir} (`convert merge` put it in; "
                           f"{base_name}/tunelab.json says so), and a second time would add its update twice: use "
                           f"{base_name} as it is, or pass the base model the adapter was trained on "
                           f"({base_meta.get('base_model')}).")


def _check_tensor_shapes(model, adapter_dir: Path, base_name: str, shapes: dict[str, tuple[int, ...]]) -> None:
    trained_on = read_adapter_config(adapter_dir).get("base_model_name_or_path") or "(not recorded)"
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    problems = []
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        for part in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"):
            if part in name:
                module_name = name.split(part)[0]
                module = modules.get(module_name)
                if module is None:
                    if f"the base has no module {module_name!r}" not in problems:  # lora_A and lora_B alike
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
