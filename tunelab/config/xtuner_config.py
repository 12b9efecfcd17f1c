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
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not}
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
    import_lines: dict[str, str] = field(default_factory=dict)
    """Imported name -> an import statement that binds it (`import re`, `from os import path as p`)."""
    lines: dict[str, int] = field(default_factory=dict)
    """Top-level name -> the line of its last assignment."""
    unread: list[str] = field(default_factory=list)
    """Top-level statements not read (a loop, an `if` on something not a literal): one line each, for the report."""


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
    _read_body(tree.body, source, cfg, part2)
    return cfg


def _read_body(body: list[ast.stmt], source: str, cfg: XtunerConfig, part2: int | None) -> None:
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                cfg.imports[name] = getattr(node, "module", None) or alias.name
                cfg.env[name] = Ref(name)
                as_name = f" as {alias.asname}" if alias.asname else ""
                cfg.import_lines[name] = (f"from {'.' * node.level}{node.module or ''} import {alias.name}{as_name}"
                                          if isinstance(node, ast.ImportFrom) else f"import {alias.name}{as_name}")
        elif isinstance(node, ast.FunctionDef):
            cfg.functions[node.name] = ast.get_source_segment(source, node) or ""
            cfg.env[node.name] = Ref(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if not isinstance(target, ast.Name):
                    if not _assign_into(target, node, cfg.env):
                        cfg.unread.append(f"line {node.lineno}: `{_short(ast.unparse(node))}` (not read)")
                    continue
                value = _evaluate(node.value, cfg.env) if node.value is not None else None
                if isinstance(node, ast.AugAssign):
                    value = _binop(node.op, cfg.env.get(target.id, Ref(target.id)), value, node)
                cfg.env[target.id] = value
                cfg.lines[target.id] = node.lineno
                if (part2 is None or node.lineno < part2) and target.id not in cfg.part1:
                    cfg.part1.append(target.id)
        elif isinstance(node, ast.If):
            test = _evaluate(node.test, cfg.env)
            if isinstance(test, Ref):  # which branch XTuner takes is not known here
                cfg.unread.append(f"line {node.lineno}: `if {_short(ast.unparse(node.test))}:` (neither branch read)")
            else:
                _read_body(node.body if test else node.orelse, source, cfg, part2)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        elif not isinstance(node, ast.Pass):
            cfg.unread.append(f"line {node.lineno}: `{_short(ast.unparse(node).splitlines()[0])}` (not read)")


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def _assign_into(target: ast.AST, node: ast.stmt, env: dict) -> bool:
    """`default_hooks.checkpoint = dict(...)`, `train_cfg["max_iters"] = 300`: set the key in the dict read earlier.
    False when the target is not a chain of attributes / constant keys on a dict."""
    keys = []
    while isinstance(target, (ast.Attribute, ast.Subscript)):
        if isinstance(target, ast.Attribute):
            keys.append(target.attr)
        elif isinstance(target.slice, ast.Constant) and isinstance(target.slice.value, str):
            keys.append(target.slice.value)
        else:
            return False
        target = target.value
    if not isinstance(target, ast.Name) or not isinstance(env.get(target.id), dict) or node.value is None:
        return False
    holder = env[target.id]
    for key in reversed(keys[1:]):
        holder = holder.get(key)
        if not isinstance(holder, dict):
            return False
    value = _evaluate(node.value, env)
    if isinstance(node, ast.AugAssign):
        value = _binop(node.op, holder.get(keys[0], Ref(keys[0])), value, node)
    holder[keys[0]] = value
    return True


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
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        value = _evaluate(node.operand, env)
        if not isinstance(value, Ref):
            return not value
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        left, right = _evaluate(node.left, env), _evaluate(node.comparators[0], env)
        if not isinstance(left, (Ref, dict)) and not isinstance(right, (Ref, dict)):
            try:
                return _COMPARE[type(node.ops[0])](left, right)
            except TypeError:
                pass
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
    if type(op) in _OPS and isinstance(left, plain) and isinstance(right, plain) and not isinstance(left, bool) \
            and not _too_big(op, left, right):
        try:
            return _OPS[type(op)](left, right)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            pass
    return Ref(ast.unparse(node))


_MAX_BITS = 4096  # an int past this is no setting: `9 ** 9 ** 9` would take minutes and gigabytes to compute
_MAX_ITEMS = 1_000_000  # nor a text or list longer than this (`"x" * 10 ** 10`)


def _too_big(op: ast.operator, left: Any, right: Any) -> bool:
    """Would computing `left op right` take more than a moment? Then it stays a Ref, as a non-literal does."""
    def bits(x):
        return abs(x).bit_length() if isinstance(x, int) else 64

    if isinstance(op, ast.Pow) and isinstance(right, (int, float)) and not isinstance(left, float):
        return isinstance(left, int) and abs(left) > 1 and right > 0 and bits(left) * right > _MAX_BITS
    if isinstance(op, ast.Mult):
        seq, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
        if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
            return len(seq) * count > _MAX_ITEMS
        if isinstance(left, int) and isinstance(right, int):
            return bits(left) + bits(right) > _MAX_BITS
    if isinstance(op, ast.Add) and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        return len(left) + len(right) > _MAX_ITEMS  # `text += text`, line after line
    return False
