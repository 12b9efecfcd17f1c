"""The data of an XTuner config as tunelab settings: data_path and data_format from its dataset(s) and dataset_map_fn,
and the map function the converted config needs (copied from the XTuner config with what it uses, one of XTuner's
built-in ones, or a stub that stops the data from being read) (`tunelab.config.xtuner_convert`)."""

from __future__ import annotations

import builtins
import symtable

from tunelab.config.xtuner_config import XTUNER_MODULES, Ref, XtunerConfig
from tunelab.config.xtuner_map_fns import XTUNER_MAP_FNS
from tunelab.config.xtuner_runtime import show
from tunelab.errors import TunelabError

# XTuner's dataset_map_fn -> the tunelab format that reads the same records the same way
MAP_FN_FORMATS = {"alpaca_map_fn": "alpaca", "openai_map_fn": "messages", "pretrain_map_fn": "text",
                  "default_map_fn": "alpaca", "wizardlm_map_fn": "sharegpt", "msagent_react_map_fn": "agent"}
def _datasets(env: dict) -> list[dict]:
    loader = env.get("train_dataloader") if isinstance(env.get("train_dataloader"), dict) else {}
    dataset = loader.get("dataset")
    if isinstance(dataset, dict) and isinstance(dataset.get("datasets"), list):  # ConcatDataset
        return [d for d in dataset["datasets"] if isinstance(d, dict)]
    return [dataset] if isinstance(dataset, dict) else []


_DATASET_KEYS = {"type", "dataset", "tokenizer", "max_length", "dataset_map_fn", "template_map_fn",
                 "remove_unused_columns", "shuffle_before_pack", "pack_to_max_length", "use_varlen_attn",
                 "map_num_proc", "input_ids_with_output"}


def data_settings(cfg: XtunerConfig, out: dict, lost: list, notes: list, used: set) -> str:
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
            source = _STUB.format(name=fn_name, text=show(fn))
            lost.append(f"dataset_map_fn = {show(fn)}: XTuner's own function, not carried over; this file has a "
                        f"stub {fn_name} that stops on the first record: replace its body with the function's code, "
                        f"returning {{'conversation': [{{'input': ..., 'output': ...}}]}}")
        if isinstance(where, list) and len(where) == 1:
            where = where[0]
        functions.append((where if isinstance(where, str) else show(where), fn_name if source else None, source))
        for key in d:
            if key not in _DATASET_KEYS:
                lost.append(f"dataset {show(where)}: {key} = {show(d[key])}: tunelab has no setting of that name")
        if not isinstance(where, (str, list)) or isinstance(where, Ref):
            lost.append(f"dataset path {show(where)}: set data_path by hand")
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


