"""XTuner (mmengine) configs: recognise one, and read its settings without running it.

    is_xtuner_config(ast.parse(text))      # the loader's check: `tunelab train` on one says what it is
    read_xtuner_config(path).env           # {"lr": 0.0002, "prompt_template": Ref("PROMPT_TEMPLATE.internlm2_chat")}

The file is parsed with `ast`, never imported or executed, so neither mmengine nor XTuner is needed. Top-level
assignments are evaluated as far as plain Python literals go (numbers, strings, lists, ``dict(...)``, arithmetic,
names assigned earlier); anything else (``PROMPT_TEMPLATE.internlm2_chat``, ``AdamW``, ``alpaca_map_fn``) stays a
`Ref` holding its source text. `tunelab.config.xtuner_convert` maps what was read to tunelab settings.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

XTUNER_MODULES = ("mmengine", "xtuner")
_MMENGINE_NAMES = {"train_dataloader", "optim_wrapper", "param_scheduler", "custom_hooks", "default_hooks",
                   "train_cfg", "env_cfg"}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_BUILTINS = {"int": int, "float": float, "round": round, "min": min, "max": max, "str": str, "bool": bool}


@dataclass(frozen=True)
class Ref:
    """Something the config names but we do not run: an import, an attribute, a call. `text` is its source."""
    text: str

    @property
    def last(self) -> str:
        return self.text.split("(")[0].split(".")[-1]


@dataclass
class XtunerConfig:
    path: Path
    env: dict[str, Any]
    part1: list[str]
    """Names assigned in PART 1 (the settings block), in order."""
    functions: dict[str, str] = field(default_factory=dict)
    """Functions defined in the file: name -> source."""
    imports: dict[str, str] = field(default_factory=dict)
    """Imported name -> the module it comes from."""


# --- recognising ----------------------------------------------------------------------------------

def is_xtuner_config(tree: ast.Module) -> bool:
    """Imports from mmengine / xtuner, or mmengine's runner names (train_dataloader, optim_wrapper, ...)."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in XTUNER_MODULES:
            return True
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in XTUNER_MODULES for a in node.names):
            return True
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    return len(assigned & _MMENGINE_NAMES) >= 2


def not_a_tunelab_config(path: Path) -> TunelabError:
    return TunelabError(f"{path} is an XTuner (mmengine) config; tunelab does not run those. Convert it: "
                        f"tunelab convert xtuner-config {path} {path.stem}_tunelab.py")


# --- reading without running ----------------------------------------------------------------------

def read_xtuner_config(path: str | Path) -> XtunerConfig:
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError) as exc:
        raise TunelabError(f"{path}: cannot read it as a Python file ({exc}).") from None
    if not is_xtuner_config(tree):
        raise TunelabError(f"{path}: not an XTuner config (no mmengine / xtuner imports, no train_dataloader).")
    part2 = next((i + 1 for i, line in enumerate(source.splitlines()) if re.search(r"PART\s*2", line)), None)
    cfg = XtunerConfig(path, {}, [])
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                cfg.imports[name] = getattr(node, "module", None) or alias.name
                cfg.env[name] = Ref(name)
        elif isinstance(node, ast.FunctionDef):
            cfg.functions[node.name] = ast.get_source_segment(source, node) or ""
            cfg.env[node.name] = Ref(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if not isinstance(target, ast.Name):
                    continue
                value = _evaluate(node.value, cfg.env) if node.value is not None else None
                if isinstance(node, ast.AugAssign):
                    value = _binop(node.op, cfg.env.get(target.id, Ref(target.id)), value, node)
                cfg.env[target.id] = value
                if (part2 is None or node.lineno < part2) and target.id not in cfg.part1:
                    cfg.part1.append(target.id)
    return cfg


def _evaluate(node: ast.AST, env: dict) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_evaluate(e, env) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        return {_evaluate(k, env): _evaluate(v, env) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Name):
        return env.get(node.id, Ref(node.id))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, env)
        if isinstance(value, (int, float)):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _evaluate(node.left, env), _evaluate(node.right, env), node)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = [_evaluate(a, env) for a in node.args]
        kwargs = {k.arg: _evaluate(k.value, env) for k in node.keywords if k.arg}
        if node.func.id == "dict" and not args:
            return kwargs
        if node.func.id in _BUILTINS and not kwargs and not any(isinstance(a, Ref) for a in args):
            try:
                return _BUILTINS[node.func.id](*args)
            except (TypeError, ValueError):
                pass
    return Ref(ast.unparse(node))


def _binop(op: ast.operator, left: Any, right: Any, node: ast.AST) -> Any:
    plain = (int, float, str, list, tuple)
    if type(op) in _OPS and isinstance(left, plain) and isinstance(right, plain) and not isinstance(left, bool):
        try:
            return _OPS[type(op)](left, right)
        except (TypeError, ZeroDivisionError):
            pass
    return Ref(ast.unparse(node))
