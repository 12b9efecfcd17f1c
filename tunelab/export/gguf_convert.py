"""`tunelab convert gguf MODEL OUT.gguf`: which model (a HF folder, base + adapter, or a training WORK_DIR / checkpoint,
read as `tunelab chat` reads it), everything that can be refused before the weights load (architecture, template,
tokenizer files, an output that cannot be written), then the write (`tunelab.export.gguf.write_gguf`) and the Ollama
Modelfile beside it.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.export.gguf import ARCHITECTURES, TYPES, check_rope_fits, write_gguf
from tunelab.export.gguf_quantize import QUANTISED_TYPES, check_quantiser, f16_source, quantise


def _say(message: str) -> None:
    print(message, flush=True)


def check_gguf_architecture(config: dict, model_dir: Path) -> None:
    """Refuse, before any weights load, a model whose architecture (config.json) has no GGUF export here."""
    from tunelab.model import internlm2

    archs = config.get("architectures") or [config.get("model_type", "?")]
    if internlm2.is_internlm2(config) or any(a in ARCHITECTURES for a in archs):
        return
    raise TunelabError(f"{archs[0]}: no GGUF export for this architecture in tunelab yet ({model_dir / 'config.json'}; "
                       f"supported: {', '.join(sorted(ARCHITECTURES))}, InternLM2). llama.cpp's "
                       f"convert_hf_to_gguf.py may handle the merged model (tunelab convert merge). Nothing was "
                       f"written.")


def check_gguf_rope(config: dict, meta: dict, model_dir: Path) -> None:
    """Refuse, before any weights load, a RoPE scaling (the run's rope_scaling, else config.json's) that llama.cpp
    cannot run in the model's GGUF architecture."""
    from tunelab.model.rope import base_rope_type

    family = next((ARCHITECTURES[a] for a in config.get("architectures") or () if a in ARCHITECTURES), None)
    if family is None:  # InternLM2: written as llama
        return
    recorded = ((meta.get("rope_scaling") or {}).get("rope_parameters") or {}).get("rope_type")
    check_rope_fits(family.arch, recorded or base_rope_type(config), model_dir / "config.json")


def check_tokenizer_files(tokenizer_dir: Path) -> None:
    """The folder holds a tokenizer the GGUF file can carry (checked before transformers tries to load it)."""
    tokenizer_dir = Path(tokenizer_dir)
    if not any((tokenizer_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        present = [f for f in ("tokenizer_config.json", "vocab.json", "merges.txt") if (tokenizer_dir / f).is_file()]
        raise TunelabError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model"
                           + (f" (only {', '.join(present)})" if present else "") + ", so there is no tokenizer to "
                           "put in the GGUF file. Copy the base model's tokenizer files (tokenizer.json or "
                           "tokenizer.model, and tokenizer_config.json) into it. Nothing was written.")


def recorded_bases(model_dir: Path, adapter_dir: Path | None, meta: dict) -> list[tuple[str, str]]:
    """The base model directories a run's records name, for files its own folders lack: (path, which record)."""
    from tunelab.export.adapters import ADAPTER_CONFIG, read_adapter_config

    bases = [(str(model_dir), "the base the adapter goes on")] if adapter_dir else []
    if meta.get("base_model"):
        bases.append((str(meta["base_model"]), "tunelab.json's base_model"))
    for folder in (adapter_dir, model_dir):
        if folder is not None and (Path(folder) / ADAPTER_CONFIG).is_file():
            named = read_adapter_config(Path(folder)).get("base_model_name_or_path")
            if named:
                bases.append((str(named), "adapter_config.json's base_model_name_or_path"))
    named_by: dict[str, str] = {}
    for path, by in bases:  # each base once, with the first record that names it
        named_by.setdefault(path, by)
    return list(named_by.items())


def check_writable(out: Path, modelfile: bool) -> None:
    """Before any weights load: OUT.gguf's folder exists (made if missing) and takes new files, and neither the
    temporary OUT.gguf.tmp nor the Modelfile's path is a folder."""
    import tempfile

    from tunelab.export.ollama import modelfile_path

    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".tunelab-write-check"):
            pass
    except OSError as exc:
        raise TunelabError(f"cannot write into {folder} ({exc.strerror or exc}): choose an OUT.gguf in a folder you "
                           f"can write to. Nothing was written.") from None
    for path in [out.with_name(out.name + ".tmp"), *([modelfile_path(out)] if modelfile else [])]:
        if path.is_dir():
            raise TunelabError(f"{path} is a directory, where convert gguf writes a file: move it away or choose "
                               f"another OUT.gguf. Nothing was written.")


def convert_to_gguf(model_path: str, out_path: str, *, out_type: str = "f16", adapter: str | None = None,
                    prompt_template: str | None = None, modelfile: bool = True,
                    trust_remote_code: bool = False, allow_other_base: bool = False) -> Path:
    """MODEL (merged HF dir, a training checkpoint or WORK_DIR, or a base with `adapter` merged in memory) →
    OUT.gguf, plus an Ollama Modelfile beside it."""
    from tunelab.export.adapters import apply_adapter, model_to_load
    from tunelab.export.convert import check_output, template_for_export
    from tunelab.export.gguf_space import probe_prompts
    from tunelab.export.gguf_vocab import find_sentencepiece
    from tunelab.export.ollama import write_modelfile
    from tunelab.model.load import load_causal_lm
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.model.model_dir import read_model_config, resolve_model_dir
    from tunelab.train.layout import checkpoint_step

    out = Path(out_path)
    if out.suffix != ".gguf":
        raise TunelabError(f"{out}: name the output file NAME.gguf (llama.cpp and Ollama look for that suffix).")
    if out_type not in (*TYPES, *QUANTISED_TYPES):
        raise TunelabError(f"--type {out_type!r}: use one of {', '.join((*TYPES, *QUANTISED_TYPES))}.")
    if out_type in QUANTISED_TYPES:
        check_quantiser(out_type, out)
    if out.is_dir():
        raise TunelabError(f"{out} is a directory: name the file to write, e.g. {out / 'model.gguf'}.")
    check_output(out.parent)  # not into a training checkpoint or a work dir's top level
    to_load, given = model_to_load(model_path, adapter), adapter or model_path
    model_path, adapter_dir, meta = to_load.base, to_load.adapter_dir, to_load.meta
    if meta.get("llava"):
        raise TunelabError(f"{model_path}: a LLaVA run; convert gguf writes text models only. Export it with "
                           f"`tunelab convert merge` (a HF LLaVA folder) and llama.cpp's own converter.")
    if meta.get("objective") == "reward":
        raise TunelabError(f"{given} is a reward model: it scores replies and does not write them, "
                           f"so it has no GGUF export.")
    check_writable(out, modelfile)
    model_dir = resolve_model_dir(model_path, key="MODEL")
    config = read_model_config(model_dir, key="MODEL")
    check_gguf_architecture(config, model_dir)
    check_gguf_rope(config, meta, model_dir)
    tokenizer_dir = adapter_dir if adapter_dir and (adapter_dir / "tokenizer_config.json").is_file() else model_dir
    check_tokenizer_files(tokenizer_dir)
    tokenizer = load_tokenizer(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    # a run saved before tunelab carried tokenizer.model along: its base's, found or refused before loading
    sp_file = find_sentencepiece(tokenizer, tokenizer_dir, recorded_bases(Path(model_dir), adapter_dir, meta))
    template = template_for_export(meta, prompt_template, tokenizer)  # an unknown name: refused before loading
    _say(f"loading {model_dir}" + (f" with adapter {adapter_dir}" if adapter_dir else ""))
    model = load_causal_lm(str(model_dir), dtype="auto", device="cpu", trust_remote_code=trust_remote_code,
                           key="MODEL", rope=meta.get("rope_scaling"), dequantize=True)  # GGUF writes plain weights
    if adapter_dir:
        model = apply_adapter(model, adapter_dir, str(model_path), meta=meta, allow_other_base=allow_other_base,
                              say=_say).merge_and_unload()
    chat_template = template.to_jinja() if template is not None else getattr(tokenizer, "chat_template", None)
    if template is None and chat_template:
        _say("note: no prompt template recorded (no tunelab.json) and none given with --prompt-template: the GGUF "
             "keeps the tokenizer's own chat_template, and the Modelfile has no TEMPLATE")
    elif template is None:
        _say("note: no prompt template recorded (no tunelab.json), none given with --prompt-template, and the "
             "tokenizer has no chat_template: the GGUF has no chat template (a model for plain completion; llama.cpp "
             "adds the BOS as the tokenizer does), and the Modelfile has no TEMPLATE. Pass --prompt-template NAME "
             "to chat with it.")
    if to_load.run_dir is not None:  # a run's checkpoint: the work dir's name
        run_dir = to_load.run_dir
        name = (run_dir.parent if checkpoint_step(run_dir) >= 0 else run_dir).resolve().name
    else:
        name = Path(adapter).resolve().name if adapter else Path(str(model_dir)).name
    # below 8 bits, llama.cpp's quantiser writes the file from an f16 one beside it (gguf_quantize)
    quantised = out_type in QUANTISED_TYPES
    written = f16_source(out) if quantised else out
    write_gguf(model, tokenizer, written, out_type="f16" if quantised else out_type, name=name,
               chat_template=chat_template, tokenizer_dir=tokenizer_dir,
               eot_words=tuple(getattr(template, "stop_words", ()) or ()),
               add_bos=False if template is not None else None, sentencepiece_file=sp_file,
               probe_prompts=tuple(probe_prompts(template)))
    if quantised:
        quantise(written, out, out_type)
        written.unlink()
        _say(f"wrote {out} ({out_type} by llama.cpp's quantiser, {out.stat().st_size / 2**20:.1f} MiB)")
    if modelfile:
        write_modelfile(out, template, system=meta.get("system") or "")
    return out
