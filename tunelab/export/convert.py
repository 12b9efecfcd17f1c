"""From a training checkpoint to files other tools read.

* `pth_to_hf`: WORK_DIR/iter_N → a HF directory: a peft adapter (LoRA / QLoRA) or a full model (full fine-tuning).
* `merge`: base model + adapter → one HF model, whose tokenizer's `chat_template` is the template used in training, so
  transformers, vLLM or LMDeploy chat with it the way it was trained.

Both copy `tunelab.json` along, so `tunelab chat` finds the template and system prompt again.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from tunelab import __version__
from tunelab.errors import TunelabError
from tunelab.export.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_adapter, find_adapter_dir,
                                     is_run_or_adapter, load_adapter_weights, model_to_load)
from tunelab.model.generate import stop_token_ids
from tunelab.model.load import pick_device
from tunelab.model.tokenizer import load_tokenizer, save_tokenizer
from tunelab.train.layout import (MODEL_DIR, META_FILE, checkpoint_step, is_checkpoint, looks_like_work_dir, read_meta,
                                  resolve_checkpoint, training_meta, write_meta)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _say(message: str) -> None:
    print(message, flush=True)


def check_output(out: Path, *inputs: Path | str | None) -> None:
    """Refuse an OUT that would write over what the command reads (the base model, the adapter, the checkpoint),
    into a training checkpoint (save_total_limit deletes those), onto a work dir's iter_* names (training replaces
    what is there) or into a work dir's top level (its checkpoints and logs); a folder inside a work dir, such as
    WORK_DIR/hf, is fine."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TunelabError(f"OUT {out} is a file: pass a directory (it is created if missing).")
    resolved = out.resolve()
    for src in inputs:
        if src is not None and Path(src).exists() and resolved == Path(src).resolve():
            raise TunelabError(f"OUT {out} is an input of this command ({src}): writing there would destroy it. "
                               f"Choose another OUT directory.")
    for folder in (resolved, *resolved.parents):
        if checkpoint_step(folder) >= 0 and is_checkpoint(folder):
            raise TunelabError(f"OUT {out} is inside the training checkpoint {folder}, which training may prune "
                               f"(save_total_limit) or replace. Choose a directory outside it, e.g. "
                               f"{folder.parent / 'hf'}.")
    if resolved.name.startswith("iter_") and looks_like_work_dir(resolved.parent):
        raise TunelabError(f"OUT {out}: training uses the iter_* names of the work dir {out.parent} for its "
                           f"checkpoints (and replaces or deletes what is there). Choose another name, e.g. "
                           f"{out.parent / 'hf'}.")
    if looks_like_work_dir(resolved):
        raise TunelabError(f"OUT {out} is a training work dir (it holds checkpoints): the export would mix with "
                           f"them. Choose a directory of its own, e.g. {out / 'hf'}.")


def _prepare_out_dir(out_dir: Path, *inputs: Path | str | None) -> None:
    """check_output, then make OUT and try writing in it, so a place that cannot be written fails before the work."""
    check_output(out_dir, *inputs)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise TunelabError(f"OUT {out_dir}: cannot write there ({exc.strerror or exc}{where}). Choose a directory "
                           f"you can write to (it is created if missing).") from None


def shard_size(text: str) -> int | str:
    """--max-shard-size as transformers reads it ('2GB', '500MB', '1GiB' or bytes), checked before any work."""
    from transformers.utils.hub import convert_file_size_to_int

    value = int(text) if str(text).isdigit() else text
    try:
        convert_file_size_to_int(value)
    except (ValueError, AttributeError):
        raise TunelabError(f"--max-shard-size {text!r}: use a whole number and a unit, e.g. 2GB, 500MB or 1GiB.") \
            from None
    return value


def _first_tokenizer(source_dirs: list):
    """The tokenizer of the first source that has one; None if none could be loaded."""
    for source in source_dirs:
        if source is None:
            continue
        if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
            continue
        try:
            return load_tokenizer(str(source))
        except (OSError, ValueError):  # a hub id that is not in the local cache, a directory with no tokenizer
            continue
    return None


# --- pth_to_hf ------------------------------------------------------------------------------------------------------

def pth_to_hf(config_path: str | None, checkpoint: str, out_dir: str, *, fp32: bool = False,
              max_shard_size: str = "2GB") -> Path:
    """Write the checkpoint's model as a HF adapter or model directory in `out_dir` (bf16, or fp32 with `fp32`)."""
    max_shard_size = shard_size(max_shard_size)
    ckpt = resolve_checkpoint(checkpoint)
    model_dir = ckpt / MODEL_DIR
    cfg = None
    if config_path:
        from tunelab.config.loader import load_config

        cfg = load_config(config_path)
    meta = read_meta(ckpt) or read_meta(model_dir)
    if meta is None:
        if cfg is None:
            raise TunelabError(f"{ckpt} has no {META_FILE} and no config was given: pass the training config so "
                               f"the base model and prompt template are known.")
        meta = training_meta(cfg)
    elif cfg is not None and meta.get("base_model") != cfg.pretrained_model_name_or_path:
        _say(f"note: {ckpt}/{META_FILE} says base_model={meta.get('base_model')!r}, the config says "
             f"{cfg.pretrained_model_name_or_path!r}; the checkpoint's own record is kept.")
    out = Path(out_dir)
    base = meta.get("base_model")
    _prepare_out_dir(out, checkpoint, ckpt, model_dir, base if base and Path(base).is_dir() else None)
    dtype = torch.float32 if fp32 else torch.bfloat16
    _say(f"converting {ckpt} ({meta.get('method', '?')}) → {out} ({'fp32' if fp32 else 'bf16'})")
    if meta.get("llava"):
        return llava_to_hf(meta, model_dir, out, dtype=dtype, max_shard_size=max_shard_size)
    tokenizer = _first_tokenizer([model_dir, ckpt, meta.get("base_model")])
    if (model_dir / ADAPTER_CONFIG).is_file():
        _save_adapter(model_dir, out, dtype)
    elif (model_dir / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        # a reward model is a sequence-classification model (tunelab.model.reward): its head comes along
        auto = AutoModelForSequenceClassification if meta.get("objective") == "reward" else AutoModelForCausalLM
        model = auto.from_pretrained(model_dir, dtype=dtype)
        # a full run has no merge step: this folder is what transformers / vLLM serve, so it gets the training
        # template and stop tokens that merge gives a merged model
        if tokenizer is not None:
            _set_training_template(model, tokenizer, template_for_export(meta, None, tokenizer))
        model.save_pretrained(out, max_shard_size=max_shard_size)
    else:
        raise TunelabError(f"{model_dir} holds neither a LoRA adapter ({ADAPTER_CONFIG}) nor a full model "
                           f"(config.json): the checkpoint is incomplete. Use an earlier iter_N directory.")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    else:
        _say(f"note: no tokenizer found next to the checkpoint or at {meta.get('base_model')!r}; "
             f"the base model's tokenizer will be used when chatting.")
    write_meta(out, meta)
    _say(f"saved to {out}")
    return out


def llava_to_hf(meta: dict, model_dir: Path, out: Path, *, dtype: torch.dtype, device: str | torch.device = "cpu",
                prompt_template: str | None = None, max_shard_size: str = "2GB") -> Path:
    """A LLaVA run's checkpoint as a HF LLaVA folder (LoRA merged in, whatever the method): the model rebuilt from
    the base models tunelab.json names plus the trained weights, with a LlavaProcessor carrying the training
    template and image processor (docs/MULTIMODAL.md)."""
    from tunelab.model import llava
    from tunelab.model.llava_train import rebuild_for_export

    settings = meta["llava"]
    _say(f"assembling {meta['base_model']} + {settings['visual_encoder']} with the trained weights of {model_dir}")
    model = rebuild_for_export(meta, model_dir, dtype=dtype, device=device)
    tokenizer = load_tokenizer(str(model_dir if (model_dir / "tokenizer_config.json").is_file() else meta["base_model"]))
    llava.add_image_token(tokenizer)
    template = template_for_export(meta, prompt_template, tokenizer)
    if template is not None:
        _add_stop_tokens(model, tokenizer, template)
    processor = llava.load_image_processor(settings["visual_encoder"], pad_to_square=settings["image_pad_to_square"])
    llava.save_hf_llava(model, tokenizer, processor, out, chat_template=template.to_jinja() if template else None,
                        max_shard_size=max_shard_size)
    write_meta(out, meta)
    _say(f"saved a HF LLaVA model to {out} (LlavaForConditionalGeneration + LlavaProcessor)")
    return out


def _add_stop_tokens(model, tokenizer, template) -> None:
    """The template's single-token stop words (e.g. <|im_end|>) join generation_config's eos_token_id."""
    stop_ids = stop_token_ids(template, tokenizer)
    gen = getattr(model, "generation_config", None)
    if gen is not None and stop_ids:
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        gen.eos_token_id = list(dict.fromkeys([*(e for e in eos if e is not None), *stop_ids]))


def _save_adapter(model_dir: Path, out: Path, dtype: torch.dtype) -> None:
    """Copy a peft adapter, storing its floating-point tensors in `dtype` as safetensors."""
    from safetensors.torch import save_file

    if not any((model_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise TunelabError(f"{model_dir} has {ADAPTER_CONFIG} but no adapter_model.safetensors: the checkpoint "
                           f"is incomplete. Use an earlier iter_N directory.")
    state = load_adapter_weights(model_dir)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(model_dir / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    if (model_dir / "README.md").is_file():
        shutil.copy2(model_dir / "README.md", out / "README.md")


# --- merge ----------------------------------------------------------------------------------------------------------

def template_for_export(meta: dict, prompt_template: str | None, tokenizer):
    """The chat template the model was trained with, with the training system prompt as its default."""
    from tunelab.data.templates import get_template, template_with_default_system

    name = prompt_template or meta.get("prompt_template")
    if not name:
        return None
    return template_with_default_system(get_template(name, tokenizer), meta.get("system"))


def _set_training_template(model, tokenizer, template) -> None:
    """The training template as the tokenizer's chat_template, and its end-of-turn token in generation_config, so
    transformers' apply_chat_template, vLLM and LMDeploy prompt and stop the way training did."""
    if template is None:
        _say("note: no prompt template recorded (no tunelab.json); the tokenizer's chat_template is unchanged")
        return
    tokenizer.chat_template = template.to_jinja()
    _add_stop_tokens(model, tokenizer, template)
    _say(f"chat_template set from prompt template {template.name!r}")


def _refuse_swapped(base: str, adapter: str, out_dir: str) -> None:
    """BASE an adapter or checkpoint and ADAPTER a model: the two given the other way round."""
    if (Path(adapter) / "config.json").is_file() and is_run_or_adapter(Path(base)):
        raise TunelabError(f"BASE {base} is an adapter or checkpoint and ADAPTER {adapter} a model: the two are "
                           f"swapped. The order is BASE ADAPTER OUT: `tunelab convert merge {adapter} {base} "
                           f"{out_dir}`.")


def _base_model(base: str) -> str:
    """The model BASE means, read as chat and convert gguf read a MODEL (`model_to_load`): a full fine-tuning run's
    WORK_DIR or iter_N is its model/, and its checksums.json is checked before any weight is read (also where
    iter_N/model is typed), so a damaged checkpoint is refused here as there. A LoRA run is not a model."""
    p = Path(base)
    if (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file():
        # an adapter folder: `model_to_load` would ask for the base it lacks in chat's words (MODEL, --adapter)
        trained_on = (read_meta(p) or {}).get("base_model") or "ITS_BASE"
    else:
        to_load = model_to_load(base, None)
        if to_load.adapter_dir is None:
            return to_load.base
        trained_on = to_load.base
    raise TunelabError(f"BASE {base} is a LoRA adapter or checkpoint, not a model: merge it into its own base first "
                       f"(`tunelab convert merge {trained_on} {base} merged`), then use merged as BASE.")


def merge(base: str, adapter: str, out_dir: str, *, max_shard_size: str = "2GB", device: str = "auto",
          dtype: str = "auto", prompt_template: str | None = None, output_format: str = "hf",
          trust_remote_code: bool = False, allow_other_base: bool = False) -> Path:
    """Merge `adapter` into `base` and save a HF model + tokenizer (with the training chat_template) in `out_dir`.

    allow_other_base: merge although the adapter was trained on a base of another architecture."""
    from tunelab.model.load import load_causal_lm, stored_bits

    max_shard_size = shard_size(max_shard_size)
    _refuse_swapped(base, adapter, out_dir)
    base = _base_model(base)
    adapter_dir, meta_dir = find_adapter_dir(adapter)
    meta = read_meta(meta_dir) or read_meta(adapter_dir) or {}
    out = Path(out_dir)
    # a local base is read while the merged model is written: writing over it would destroy it
    _prepare_out_dir(out, adapter, adapter_dir, meta_dir, base if Path(base).is_dir() else None)
    dev = pick_device(device)
    if dtype not in ("auto", *DTYPES):
        raise TunelabError(f"--dtype {dtype!r}: use auto, bf16, fp16 or fp32.")
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]  # 'auto': the dtype the base is stored in
    if meta.get("llava"):  # a LLaVA run's adapter: its base is assembled from the language model and vision tower
        if output_format != "hf":
            raise TunelabError("--format original: a LLaVA model is written in the HF LLaVA layout only.")
        if meta.get("base_model") != base:
            _say(f"note: the adapter was trained on {meta.get('base_model')!r}; using BASE {base!r} as its language "
                 "model")
        return llava_to_hf({**meta, "base_model": base}, adapter_dir, out,
                           dtype=torch.bfloat16 if torch_dtype == "auto" else torch_dtype, device=dev,
                           prompt_template=prompt_template, max_shard_size=max_shard_size)
    reward = meta.get("objective") == "reward"
    if reward and output_format != "hf":
        raise TunelabError("a reward model is written as a transformers sequence-classification model: drop "
                           f"--format {output_format}.")
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(str(tokenizer_source), trust_remote_code=trust_remote_code)
    _say(f"loading base model {base} on {dev}" + (" with a reward head (its trained weights are in the adapter)"
                                                 if reward else ""))
    # the model step's loader: hub id or directory, InternLM2 as a native graph, never quantised here
    model = load_causal_lm(base, dtype=torch_dtype, device=dev, trust_remote_code=trust_remote_code, key="BASE",
                           reward_head=reward, pad_token_id=tokenizer.pad_token_id, rope=meta.get("rope_scaling"),
                           dequantize=True)
    if bits := stored_bits(base, key="BASE"):
        _say(f"the base {base} is stored in {bits} bits (bitsandbytes); merging into its dequantised weights, the ones "
             "the adapter was trained against")
    elif meta.get("method") == "qlora":
        _say("the adapter was trained on a 4-bit base (QLoRA); merging into the unquantised base, as intended")
    _say(f"merging adapter {adapter_dir}")
    merged = apply_adapter(model, adapter_dir, base, meta=meta, allow_other_base=allow_other_base,
                           say=_say).merge_and_unload()

    _set_training_template(merged, tokenizer, template_for_export(meta, prompt_template, tokenizer))

    if output_format == "original":
        from tunelab.model.internlm2 import save_original_layout

        save_original_layout(merged, tokenizer, out)
    else:
        merged.save_pretrained(out, max_shard_size=max_shard_size)
        save_tokenizer(tokenizer, out)
    write_meta(out, {**meta, "base_model": base, "merged_adapter": str(adapter_dir),
                     "tunelab_version": meta.get("tunelab_version", __version__)})
    _say(f"saved merged model to {out}")
    return out

