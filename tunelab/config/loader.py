"""Read a Python config file into a validated `TrainConfig`.

A config is a plain Python file: its top-level names are the settings (see `tunelab copy-cfg`).
We run it with `runpy` in its own namespace, keep the names that are settings, and check every value
against the type annotation and the allowed range of its `TrainConfig` field. Every mistake a user can
make here becomes a `TunelabError` naming the file, the line, the key and the fix.

`--cfg-options key=value ...` override settings without editing the file; the values go through the
same checks.
"""

from __future__ import annotations

import ast
import collections.abc
import difflib
import functools
import inspect
import pprint
import runpy
import sys
import textwrap
import traceback
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal, Union

from tunelab.config import schema
from tunelab.config.schema import TrainConfig
from tunelab.config.xtuner_config import is_xtuner_config, not_a_tunelab_config
from tunelab.data.formats import FORMATS
from tunelab.errors import TunelabError
from tunelab.train.trackers import TRACKERS

DATA_FORMATS = ("auto", *FORMATS)  # the data step's names: one list
DEEPSPEED_PRESETS = ("zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")

# Names other tools use for the same setting: a user coming from them gets pointed at ours.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "max_epochs", "epochs": "max_epochs",
    "gradient_accumulation_steps": "accumulative_counts", "per_device_train_batch_size": "batch_size",
    "batch_size_per_device": "batch_size", "model_name_or_path": "pretrained_model_name_or_path",
    "cutoff_len": "max_length", "max_seq_length": "max_length", "lora_rank": "lora_r",
    "template": "prompt_template", "alpaca_en_path": "data_path", "data_files": "data_path",
    "dataset": "data_path", "quantization_bit": "quant_bits", "load_in_4bit": "quant_bits",
}

# Allowed values beyond the type: field -> (test, what the value must be). Tests see type-checked values.
_positive = (lambda v: v > 0, "a positive whole number")
RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "max_length": _positive,
    "batch_size": _positive,
    "accumulative_counts": _positive,
    "max_epochs": _positive,
    "lora_r": _positive,
    "lora_alpha": _positive,
    "save_steps": _positive,
    "logging_steps": _positive,
    "evaluation_freq": _positive,
    "eval_max_new_tokens": _positive,
    "loss_chunk_size": _positive,
    "mlp_chunk_size": (lambda v: v is None or v > 0, "None or a positive whole number (e.g. 8192)"),
    "num_proc": _positive,
    "max_steps": (lambda v: v is None or v > 0, "None or a positive whole number"),
    "lr": (lambda v: v > 0, "greater than 0 (e.g. 2e-4 for LoRA, 2e-5 for full fine-tuning)"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "at least 0 and below 1 (a fraction of all steps, e.g. 0.03)"),
    "eval_split_ratio": (lambda v: 0 <= v < 1, "at least 0 and below 1 (e.g. 0.05 holds out 5%)"),
    "lora_dropout": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "max_norm": (lambda v: v >= 0, "0 or more (0 turns clipping off)"),
    "seed": (lambda v: v >= 0, "0 or more"),
    "save_total_limit": (lambda v: v == -1 or v >= 1, "-1 (keep every checkpoint) or 1 or more"),
    "quant_bits": (lambda v: v in (None, 4, 8), "None, 4 or 8"),
    "betas": (lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1), e.g. (0.9, 0.999)"),
    "data_format": (lambda v: v in DATA_FORMATS, "one of " + ", ".join(map(repr, DATA_FORMATS))),
    "deepspeed": (lambda v: v is None or v in DEEPSPEED_PRESETS or v.endswith(".json"),
                  "None, one of " + ", ".join(map(repr, DEEPSPEED_PRESETS)) + " or a path to a DeepSpeed .json"),
    "evaluation_inputs": (lambda v: all(isinstance(q, str) for q in v), "a list of strings (questions)"),
    "report_to": (lambda v: all(t in TRACKERS for t in v), "a list of any of " + ", ".join(map(repr, TRACKERS))),
    "lora_target_modules": (lambda v: isinstance(v, str) or all(isinstance(m, str) for m in v),
                            "'all-linear' or a list of module names like ['q_proj', 'v_proj']"),
    "data_path": (lambda v: not isinstance(v, list) or all(isinstance(d, str) or (isinstance(d, dict) and "path" in d)
                                                           for d in v),
                  "a path, or a list of paths / {'path': ..., 'format': ..., 'ratio': ...} dicts"),
}


@functools.lru_cache(maxsize=None)
def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string under it in schema.py), '' where there is none."""
    tree = ast.parse(Path(schema.__file__).read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    docs: dict[str, str] = {}
    for stmt, nxt in zip(cls.body, cls.body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            is_doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                and isinstance(nxt.value.value, str)
            docs[stmt.target.id] = " ".join(nxt.value.value.split()) if is_doc else ""
    return docs


def default_value(name: str) -> Any:
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()


# --- checking one value -------------------------------------------------------------------------

def describe_type(hint: Any) -> str:
    """The type in words a newcomer reads: "a whole number", "one of 'full', 'lora'"."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if hint is typing.Callable or origin is collections.abc.Callable:
        return "a function"
    words = {bool: "True or False", int: "a whole number", float: "a number", str: "a string in quotes",
             list: "a list [...]", tuple: "a tuple (...)", dict: "a dict {...}"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def check_type(value: Any, hint: Any) -> tuple[bool, Any]:
    """(does `value` fit `hint`, the value normalised): ints pass for floats, lists for tuples; bool is no int."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint)), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, normalised = check_type(value, arg)
            if ok:
                return True, normalised
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is list or origin is list:
        ok = isinstance(value, (list, tuple))
        return ok, list(value) if ok else value
    if hint is tuple or origin is tuple:
        ok = isinstance(value, (list, tuple))
        return ok, tuple(value) if ok else value
    if hint is typing.Callable or origin is collections.abc.Callable:
        return callable(value), value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value


def _did_you_mean(word: str, choices: list[str]) -> str:
    if word in ALIASES and ALIASES[word] in choices:
        return f" Did you mean '{ALIASES[word]}'?"
    by_lower = {c.lower(): c for c in choices}
    close = [by_lower[word.lower()]] if word.lower() in by_lower else []
    close += [c for c in difflib.get_close_matches(word, choices, n=3, cutoff=0.6) if c not in close]
    if not close:
        return ""
    if difflib.SequenceMatcher(None, word.lower(), close[0].lower()).ratio() >= 0.85:
        close = close[:1]  # a plain typo: name the one fix
    return " Did you mean " + " or ".join(f"'{c}'" for c in close[:3]) + "?"


def check_setting(key: str, value: Any, source: str, line: int | None = None) -> tuple[Any, str | None]:
    """(normalised value, error message or None). `source` is the file or "--cfg-options"."""
    hint = field_types()[key]
    at = f"{source}: '{key}'" + (f" (line {line})" if line else "")
    ok, value = check_type(value, hint)
    if not ok:
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        hint_text = _did_you_mean(value, list(choices)) if choices and isinstance(value, str) else ""
        example = f"{key} = {default_value(key)!r}"
        if "a function" in describe_type(hint):
            example = f"def my_map_fn(record): ... in the same file, then {key} = my_map_fn (no quotes)"
        return value, (f"{at} must be {describe_type(hint)}; got {value!r} "
                       f"({type(value).__name__}).{hint_text} For example: {example}")
    if key in RANGES:
        test, requirement = RANGES[key]
        if not test(value):
            extra = ""
            if key == "data_format" and isinstance(value, str):
                extra = _did_you_mean(value, list(DATA_FORMATS))
            return value, f"{at} must be {requirement}; got {value!r}.{extra}"
    if key == "prompt_template":
        known = _known_templates()
        if known and value not in known:
            return value, (f"{at}: unknown template {value!r}.{_did_you_mean(value, sorted(known))} "
                           f"Known templates: {', '.join(sorted(known))}")
    return value, None


def _known_templates() -> set[str]:
    """Template names from the data step (plus 'hf'); empty if it cannot be imported, so we skip the check."""
    try:
        from tunelab.data.templates import TEMPLATES
    except Exception:  # the data step is optional here: never fail config loading because of it
        return set()
    return set(TEMPLATES) | {"hf"}


# --- reading a config file ----------------------------------------------------------------------

def _assignment_lines(tree: ast.Module) -> tuple[dict[str, int], set[str]]:
    """Top-level name -> line of its (last) assignment, and the names bound by import statements."""
    lines: dict[str, int] = {}
    imported: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:  # "*" marks a star import: unassigned names came from it
                    imported.add((alias.asname or alias.name).split(".")[0])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines[node.name] = node.lineno
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            lines[name.id] = node.lineno
            else:  # if / try / with / for at top level still bind top-level names
                for attr in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, attr, []) or [])

    visit(tree.body)
    return lines, imported


def _run_config_file(path: Path) -> tuple[dict[str, Any], dict[str, int], set[str]]:
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TunelabError(f"{path}: not UTF-8 text. A config is a Python file; save it as UTF-8.") from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise TunelabError(f"{path}: syntax error (line {exc.lineno}): {exc.msg}. "
                           f"Fix that line; the file must be valid Python.") from None
    if is_xtuner_config(tree):  # mmengine's dict(type=...) files would fail on their imports: say what it is
        raise not_a_tunelab_config(path)
    lines, imported = _assignment_lines(tree)
    # The config's own folder is importable, so a config can import a helper module next to it.
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        namespace = runpy.run_path(str(path), run_name="__tunelab_config__")
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        line = next((f.lineno for f in reversed(frames) if Path(f.filename) == path), None)
        at = f" (line {line})" if line else ""
        fix = "Fix that line; a config is plain Python run top to bottom."
        if "TEMPLATE" in str(exc):  # XTuner's PROMPT_TEMPLATE.x / SYSTEM_TEMPLATE.x objects
            fix = "Templates are plain strings here, e.g. prompt_template = 'internlm2_chat'."
        raise TunelabError(f"{path}: running the config raised {type(exc).__name__}: {exc}{at}. {fix}") from None
    finally:
        if str(path.parent.resolve()) in sys.path:
            sys.path.remove(str(path.parent.resolve()))
    return namespace, lines, imported


def _settings_from_namespace(namespace: dict, lines: dict[str, int], imported: set[str], path: Path,
                             errors: list[str]) -> dict[str, Any]:
    """Keep the names that are settings; report public names that are neither settings nor helpers."""
    names = set(field_types())
    settings: dict[str, Any] = {}
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if key in names:
            settings[key] = value
            continue
        from_star_import = "*" in imported and key not in lines
        if key in imported or from_star_import or inspect.isfunction(value) or inspect.isclass(value):
            continue  # helpers: a map function, a class, an import
        line = f" (line {lines[key]})" if key in lines else ""
        fix = _did_you_mean(key, sorted(names)) or (
            f" Settings are listed in docs/CONFIG.md; start your own helper names with _ (e.g. _{key}) "
            f"so they are not read as settings.")
        errors.append(f"{path}: unknown setting '{key}'{line}.{fix}")
    return settings


def parse_overrides(overrides: list[str], namespace: dict | None = None) -> dict[str, Any]:
    """`["lr=1e-4", "prompt_template=qwen_chat"]` -> {"lr": 0.0001, "prompt_template": "qwen_chat"}.

    Values are Python literals where they parse (numbers, lists, True/None), plain strings otherwise. A value
    that names a function defined in the config file (`dataset_map_fn=my_other_fn`) becomes that function.
    """
    names = set(field_types())
    parsed: dict[str, Any] = {}
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            errors.append(f"--cfg-options: expected key=value, got {item!r}. Example: --cfg-options lr=1e-4 max_epochs=1")
            continue
        if key not in names:
            errors.append(f"--cfg-options: unknown setting '{key}'.{_did_you_mean(key, sorted(names))}")
            continue
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = text
        if isinstance(value, str) and namespace and callable(namespace.get(value)) and value.isidentifier():
            value = namespace[value]
        parsed[key] = value
    if errors:
        raise TunelabError("\n".join(errors))
    return parsed


def _cross_checks(cfg: TrainConfig, where: dict[str, tuple[str, int | None]]) -> list[str]:
    """Settings that are fine alone but impossible together."""
    errors = []
    if cfg.method == "full" and cfg.quant_bits is not None:
        source, line = where["quant_bits"]
        at = f"{source}: 'quant_bits'" + (f" (line {line})" if line else "")
        errors.append(f"{at}: quant_bits={cfg.quant_bits} with method='full': "
                      f"a quantised base cannot be fully fine-tuned. Use method = 'qlora', or quant_bits = None.")
    return errors


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Run the config file at `path`, apply `--cfg-options` overrides, validate, return the settings."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"config file not found: {path}. List the built-in configs with `tunelab list-cfg`, "
                           f"then copy one with `tunelab copy-cfg NAME ./`.")
    namespace, lines, imported = _run_config_file(path)
    errors: list[str] = []
    settings = _settings_from_namespace(namespace, lines, imported, path, errors)
    where = {k: (str(path), lines.get(k)) for k in field_types()}
    for key, value in parse_overrides(overrides or [], namespace).items():
        settings[key] = value
        where[key] = ("--cfg-options", None)
    checked = {}
    for key, value in settings.items():
        checked[key], error = check_setting(key, value, *where[key])
        if error:
            errors.append(error)
    if errors:
        raise TunelabError("\n".join(errors))
    cfg = TrainConfig(**checked)
    errors = _cross_checks(cfg, where)
    if errors:
        raise TunelabError("\n".join(errors))
    return cfg


# --- writing the resolved settings --------------------------------------------------------------

def save_resolved_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write every setting (defaults included) as a Python config that `load_config` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = field_docs()
    out = ["# The resolved settings of a tunelab run: every setting, defaults included.",
           "# Written by tunelab; `tunelab train THIS_FILE --work-dir DIR` runs the same settings again.", ""]
    for key, value in schema.to_dict(cfg).items():
        if key == "dataset_map_fn" and cfg.dataset_map_fn is not None:
            out += _function_source(cfg.dataset_map_fn)
            continue
        if docs.get(key):
            out.append(f"# {textwrap.shorten(docs[key], 110)}")
        out.append(f"{key} = {pprint.pformat(value, width=110, sort_dicts=False)}")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def _function_source(fn) -> list[str]:
    """The map function's definition, so the written config runs the same code; a note where it cannot."""
    name = getattr(fn, "__name__", "")
    try:
        source = textwrap.dedent(inspect.getsource(fn)).rstrip()
    except (OSError, TypeError):
        source = ""
    if source and name.isidentifier() and source.startswith(("def ", "async def ", "@")):
        return ["", *_globals_used(fn), source, "", f"dataset_map_fn = {name}"]
    return [f"# dataset_map_fn was {fn!r}: its source could not be copied here; define it again to use it.",
            "dataset_map_fn = None"]


def _globals_used(fn) -> list[str]:
    """Lines that re-create what the function reads from its file: `import re`, `_prefix = '...'`."""
    lines = []
    for name in fn.__code__.co_names:
        value = fn.__globals__.get(name, None)
        if isinstance(value, types.ModuleType):
            module = value.__name__
            lines.append(f"import {module}" if module == name else f"import {module} as {name}")
        elif name.startswith("_") and name in fn.__globals__:
            try:
                if ast.literal_eval(repr(value)) == value:
                    lines.append(f"{name} = {value!r}")
            except (ValueError, SyntaxError):
                pass
    return lines + [""] if lines else []
