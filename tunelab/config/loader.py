"""Read a Python config file into a validated `TrainConfig`.

A config is a plain Python file: its top-level names are the settings (see `tunelab copy-cfg`). We run it with
`runpy` in its own namespace, keep the names that are settings and hand each value to the schema's checks
(`tunelab.config.checks.check_setting`: its type, its rule), naming the file and the line of every mistake.
`--cfg-options key=value ...` override settings without editing the file; their values go through the same checks.
The settings of a run are written back as a config file by `save_resolved_config`.
"""

from __future__ import annotations

import ast
import inspect
import logging
import pprint
import runpy
import sys
import textwrap
import traceback
import types
from pathlib import Path
from typing import Any

from tunelab.config import checks, schema
from tunelab.config.checks import check_setting, suggest_setting
from tunelab.config.schema import TrainConfig, field_docs, field_types
from tunelab.config.xtuner_config import is_xtuner_config, not_a_tunelab_config
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

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


def _syntax_error_line(exc: SyntaxError, source: str) -> int | str:
    """The line a SyntaxError is on. Python gives none for a NUL byte (a file saved as UTF-16, or damaged): the
    first NUL's line then."""
    if exc.lineno is not None:
        return exc.lineno
    if "\x00" in source:
        return source.count("\n", 0, source.index("\x00")) + 1
    return "unknown"


def _run_config_file(path: Path) -> tuple[dict[str, Any], dict[str, int], set[str]]:
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TunelabError(f"{path}: not UTF-8 text. A config is a Python file; save it as UTF-8.") from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise TunelabError(f"{path}: syntax error (line {_syntax_error_line(exc, source)}): {exc.msg}. "
                           f"Fix that line; the file must be valid Python.") from None
    if is_xtuner_config(tree):  # mmengine's dict(type=...) files would fail on their imports: say what it is
        raise not_a_tunelab_config(path)
    lines, imported = _assignment_lines(tree)
    # The config's own folder is importable, so a config can import a helper module next to it.
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        namespace = runpy.run_path(str(path), run_name="__tunelab_config__")
    except SystemExit as exc:  # sys.exit() / exit() in the file would end tunelab with no word of why
        frames = traceback.extract_tb(exc.__traceback__)
        line = next((f.lineno for f in reversed(frames) if Path(f.filename) == path), None)
        raise TunelabError(f"{path}: the config called sys.exit({exc.code!r}){f' (line {line})' if line else ''} "
                           f"while tunelab ran it. A config is Python that runs top to bottom: remove the exit "
                           f"call.") from None
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
        if key in checks.RETIRED_SETTINGS:
            _retired(key, value, str(path), lines.get(key), errors)
            continue
        from_star_import = "*" in imported and key not in lines
        if key in imported or from_star_import or inspect.isfunction(value) or inspect.isclass(value):
            continue  # helpers: a map function, a class, an import
        line = f" (line {lines[key]})" if key in lines else ""
        fix = suggest_setting(key) or (
            f" Settings are listed in docs/CONFIG.md; start your own helper names with _ (e.g. _{key}) "
            f"so they are not read as settings.")
        errors.append(f"{path}: unknown setting '{key}'{line}.{fix}")
    return settings


def _retired(key: str, value: Any, source: str, line: int | None, errors: list[str]) -> None:
    """A former fast-path switch: a note when it asks for what is always on, an error otherwise."""
    note, error = checks.check_retired(key, value, source, line)
    if note:
        log.warning("%s", note)
    if error:
        errors.append(error)


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
        if key not in names and key not in checks.RETIRED_SETTINGS:
            errors.append(f"--cfg-options: unknown setting '{key}'.{suggest_setting(key)}")
            continue
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            opened = text.strip()[:1]
            if opened in ("[", "{") and text.count(opened) != text.count("]" if opened == "[" else "}"):
                # an unclosed list or dict (the shell split it, or a bracket is missing), not a text like "[INST] hi"
                errors.append(f"--cfg-options: {key}={text!r} is not a valid Python literal (an unclosed bracket or "
                              f"a missing quote?). Quote the whole option for the shell, e.g. "
                              f"--cfg-options \"data_path=['a.jsonl', 'b.jsonl']\"")
                continue
            value = text
        if key in checks.RETIRED_SETTINGS:
            _retired(key, value, "--cfg-options", None, errors)
            continue
        if isinstance(value, str) and namespace and callable(namespace.get(value)) and value.isidentifier():
            value = namespace[value]
        parsed[key] = value
    if errors:
        raise TunelabError("\n".join(errors))
    return parsed


def _check_config_path(path: Path) -> None:
    """A config is an existing .py file. Anything else would be run as Python: a JSONL data file's lines are dict
    expressions, so it "loads" as all defaults and trains the default model on the default data."""
    if path.is_dir():
        raise TunelabError(f"{path} is a directory, not a config file (.py). Give the config file inside it, or "
                           f"list the built-in configs with `tunelab list-cfg` and copy one with "
                           f"`tunelab copy-cfg NAME ./`.")
    if not path.is_file():
        raise TunelabError(f"config file not found: {path}. List the built-in configs with `tunelab list-cfg`, "
                           f"then copy one with `tunelab copy-cfg NAME ./`.")
    if path.suffix in (".yaml", ".yml"):
        raise TunelabError(f"{path} is not a config file (.py). {yaml_config_fix(_yaml_keys(path))}")
    if path.suffix != ".py":
        raise TunelabError(f"{path} is not a config file (.py); a config is a Python file of settings "
                           f"(`tunelab copy-cfg NAME ./` makes one). A data file goes in the config's data_path; "
                           f"`tunelab check-dataset CONFIG` checks it.")


def _yaml_keys(path: Path) -> dict:
    """The top-level mapping of a YAML file; {} when it is not one (unreadable, not YAML, a list)."""
    import yaml

    try:
        keys = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        keys = None
    return keys if isinstance(keys, dict) else {}


# Keys every LLaMA-Factory training YAML (`llamafactory-cli train x.yaml`) has, which no data file has at its top
LLAMAFACTORY_TRAIN_KEYS = ("stage", "model_name_or_path", "finetuning_type")


def llamafactory_config_keys(path: Path) -> dict | None:
    """The top-level keys of a YAML file that is a LLaMA-Factory training config, given where a data file goes
    (`check-dataset x.yaml`); None for any other file. Read once: `yaml_config_fix` takes them."""
    if path.suffix not in (".yaml", ".yml"):
        return None
    keys = _yaml_keys(path)
    return keys if any(key in keys for key in LLAMAFACTORY_TRAIN_KEYS) else None


def yaml_config_fix(keys: dict) -> str:
    """How to carry a LLaMA-Factory YAML (`llamafactory-cli train x.yaml`, its top-level `keys`) over: tunelab's
    setting for each of its keys that has one, so the user edits a copied config rather than guessing the names."""
    from tunelab.data.dataset_info import REGISTRY_NAME
    from tunelab.data.templates import LLAMAFACTORY_NAMES

    moves = [f"{k} → {checks.ALIASES[k]}" for k in keys if k in checks.ALIASES and k not in ("dataset", "template")]
    if keys.get("template"):
        ours = LLAMAFACTORY_NAMES.get(keys["template"], keys["template"])
        moves.append(f"template: {keys['template']} → prompt_template = {ours!r}")
    if keys.get("dataset"):
        registry = Path(str(keys.get("dataset_dir", "data"))) / REGISTRY_NAME
        moves.append(f"dataset → data_path = [{{'path': {registry.as_posix()!r}, 'dataset': {keys['dataset']!r}}}]")
    if keys.get("output_dir"):
        moves.append("output_dir → --work-dir")
    return ("A LLaMA-Factory YAML is not read: copy a built-in config (`tunelab list-cfg`, then `tunelab copy-cfg "
            "NAME ./`) and set its settings" + (": " + "; ".join(moves) if moves else "") +
            " (docs/CONFIG.md lists every setting).")


def load_config(path: str | Path, overrides: list[str] | None = None,
                flags: dict[str, tuple[str, Any]] | None = None) -> TrainConfig:
    """Run the config file at `path`, apply `--cfg-options` overrides, validate, return the settings.

    flags: settings given by a command-line flag of their own, key -> (flag, value), e.g. {"seed": ("--seed", 42)};
    applied last and checked as the others are, so an error names the flag the user typed."""
    path = Path(path)
    _check_config_path(path)
    namespace, lines, imported = _run_config_file(path)
    errors: list[str] = []
    settings = _settings_from_namespace(namespace, lines, imported, path, errors)
    where = {k: (str(path), lines.get(k)) for k in field_types()}
    for key, value in parse_overrides(overrides or [], namespace).items():
        settings[key] = value
        where[key] = ("--cfg-options", None)
    for key, (flag, value) in (flags or {}).items():
        settings[key] = value
        where[key] = (flag, None)
    checked = {}
    for key, value in settings.items():
        checked[key], error = check_setting(key, value, *where[key])
        if error:
            errors.append(error)
    if errors:
        raise TunelabError("\n".join(errors))
    cfg = TrainConfig(**checked)
    errors = checks.combination_errors(cfg, where)
    if errors:
        raise TunelabError("\n".join(errors))
    return cfg


# --- writing the resolved settings --------------------------------------------------------------

def save_resolved_config(cfg: TrainConfig, path: str | Path, config_dir: str | None = None) -> Path:
    """Write every setting (defaults included) as a Python config that `load_config` reads back. config_dir: the
    folder of the config the run read, recorded with the current one as where its relative paths were read from."""
    from tunelab.data.data_path import resolved_in_line

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = field_docs()
    out = ["# The resolved settings of a tunelab run: every setting, defaults included.",
           "# Written by tunelab; `tunelab train THIS_FILE --work-dir DIR` runs the same settings again.",
           resolved_in_line(config_dir), ""]
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
