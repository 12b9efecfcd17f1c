"""Read data files and turn every record into one normalised sample.

A sample is either ``{"messages": [{"role", "content"}, ...]}`` (OpenAI style, roles system/user/assistant/tool)
or ``{"text": "..."}`` (plain text for incremental pretraining). Everything after this module sees only these two.

Formats (``data_format``; 'auto' detects per file from its first record):

* ``alpaca``        {"instruction", "input"?, "output", "system"?, "history"?}
* ``messages``      {"messages": [{"role", "content"}, ...]} (OpenAI)
* ``sharegpt``      {"conversations": [{"from", "value"}, ...], "system"?}
* ``conversation``  {"conversation": [{"system"?, "input", "output"}, ...]} (XTuner)
* ``text``          {"text"} or .txt files (one sample per non-empty line)
* ``agent``         tool-use dialogues: ``messages`` with ``tool_calls`` / ``tool`` turns, or MS-Agent
                    ``conversations`` whose assistant turns hold ``<|startofexec|>...<|endofexec|>`` tool results

Every mistake raises `InvalidRecord` (a `TunelabError`) naming the file, the line or record, and the field.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from tunelab.errors import TunelabError

FORMATS = ("alpaca", "messages", "sharegpt", "conversation", "text", "agent")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")

# The field that gives each format away, in the order we test them.
_SIGNATURE_FIELDS = [("messages", "messages"), ("conversations", "sharegpt"), ("conversation", "conversation"),
                     ("instruction", "alpaca"), ("text", "text")]
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool",
                   "function": "tool", "ipython": "tool"}
_EXEC = re.compile(r"<\|startofexec\|>(.*?)<\|endofexec\|>", re.S)


class InvalidRecord(TunelabError):
    """One bad record: with skip_invalid=True it is counted and skipped instead of stopping the run."""


@dataclass
class Record:
    data: dict
    where: str
    """'file.jsonl line 7' or 'file.json record 3': what an error message points at."""


# --- reading files ------------------------------------------------------------------------------

def list_data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise TunelabError(f"{path}: the directory holds no data file ({', '.join(FILE_SUFFIXES)}). "
                           f"Point data_path at a file, or a folder of such files.")
    return files


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TunelabError(f"{path} line {line}: bytes that are not UTF-8 ({raw[exc.start:exc.start + 4]!r}). "
                           f"Re-save the file as UTF-8, e.g. `iconv -f GBK -t UTF-8 {path.name} > fixed.json`.")


def read_records(path: Path, *, skip_invalid: bool = False, on_skip: Callable[[str], None] = lambda m: None
                 ) -> Iterator[Record]:
    """Yield the raw records of one data file (no format checks yet)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = _read_text(path)
        if not text.strip():
            raise TunelabError(f"{path}: the file is empty. Put one JSON object per line in it.")
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                msg = (f"{path} line {n}: not valid JSON ({exc.msg} at column {exc.colno}). Each line of a .jsonl "
                       f"file must be one complete JSON object; fix or delete that line.")
                if skip_invalid:
                    on_skip(msg)
                    continue
                raise InvalidRecord(msg)
            yield Record(obj, f"{path} line {n}")
    elif suffix == ".json":
        text = _read_text(path)
        if not text.strip():
            raise TunelabError(f"{path}: the file is empty. Put a JSON list of records in it.")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = " (it looks like JSON Lines: rename it to .jsonl)" if exc.msg == "Extra data" else ""
            raise TunelabError(f"{path} line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}{hint}. "
                               f"Fix the file (e.g. a missing comma or quote near there).")
        if isinstance(obj, dict):  # {"data": [...]} / {"train": [...]} wrappers, or one record
            lists = [v for v in obj.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
            obj = lists[0] if len(lists) == 1 and not any(k in obj for k, _ in _SIGNATURE_FIELDS) else [obj]
        if not isinstance(obj, list):
            raise TunelabError(f"{path}: expected a JSON list of records, found {type(obj).__name__}.")
        if not obj:
            raise TunelabError(f"{path}: the list of records is empty.")
        for i, rec in enumerate(obj):
            yield Record(rec, f"{path} record {i}")
    elif suffix in (".parquet", ".csv"):
        import pandas as pd

        try:
            frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)
        except Exception as exc:  # pandas/pyarrow raise many types for a damaged file
            raise TunelabError(f"{path}: cannot read it as {suffix[1:]}: {exc}")
        if frame.empty:
            raise TunelabError(f"{path}: the file holds no rows.")
        for i, rec in enumerate(frame.to_dict("records")):
            yield Record({k: _plain(v) for k, v in rec.items()}, f"{path} row {i + (2 if suffix == '.csv' else 0)}")
    elif suffix == ".txt":
        text = _read_text(path)
        if not text.strip():
            raise TunelabError(f"{path}: the file is empty.")
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield Record({"text": line}, f"{path} line {n}")
    else:
        raise TunelabError(f"{path}: unknown file type {suffix!r}. Use one of {', '.join(FILE_SUFFIXES)}.")


def _plain(value):
    """numpy arrays / scalars from parquet into plain Python lists / numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --- detecting and normalising --------------------------------------------------------------------

def detect_format(record: dict) -> Optional[str]:
    if not isinstance(record, dict):
        return None
    for key, fmt in _SIGNATURE_FIELDS:
        if key in record:
            if fmt in ("messages", "sharegpt") and _looks_like_agent(record[key]):
                return "agent"
            return fmt
    if "output" in record and ("input" in record or "prompt" in record):
        return "alpaca"
    return None


def _looks_like_agent(turns) -> bool:
    if not isinstance(turns, list):
        return False
    for t in turns:
        if isinstance(t, dict):
            role = t.get("role", t.get("from"))
            if role in ("tool", "function", "observation", "ipython") or t.get("tool_calls"):
                return True
            if isinstance(t.get("value"), str) and "<|startofexec|>" in t["value"]:
                return True
    return False


def _fail(where: str, problem: str, fix: str) -> InvalidRecord:
    return InvalidRecord(f"{where}: {problem}. {fix}")


def _need(record: dict, key: str, where: str, fmt: str, kind=str):
    if key not in record:
        close = difflib.get_close_matches(key, [str(k) for k in record], n=1, cutoff=0.6)
        hint = f" Did you mean to call {close[0]!r} {key!r}?" if close else ""
        other = detect_format(record)
        if other and other != fmt:
            hint += f" This record looks like the {other!r} format: set data_format={other!r} (or 'auto')."
        raise _fail(where, f"missing field {key!r} for the {fmt!r} format (found: {', '.join(map(repr, record))})",
                    hint.strip() or f"Add {key!r} to the record.")
    value = record[key]
    if not isinstance(value, kind):
        raise _fail(where, f"field {key!r} should be {'text' if kind is str else 'a list'}, "
                           f"found {type(value).__name__}", f"Fix the value of {key!r}.")
    return value


def _content(value, where: str, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # OpenAI content parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in value)
    if not isinstance(value, str):
        raise _fail(where, f"{field} should be text, found {type(value).__name__}", f"Make {field} a string.")
    return value


def _tool_calls_text(calls) -> str:
    out = []
    for call in calls or []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append("<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)
                   + "\n</tool_call>")
    return "\n".join(out)


def _from_alpaca(r: dict, where: str) -> list[dict]:
    instruction = _need(r, "instruction", where, "alpaca") if "prompt" not in r else _need(r, "prompt", where, "alpaca")
    output = _need(r, "output", where, "alpaca")
    extra = r.get("input") or ""
    messages = [{"role": "system", "content": r["system"]}] if r.get("system") else []
    for pair in r.get("history") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _fail(where, "'history' should be a list of [question, answer] pairs", "Fix 'history'.")
        messages += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
    user = f"{instruction}\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_messages(r: dict, where: str, fmt: str) -> list[dict]:
    turns = _need(r, "messages", where, fmt, list)
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "role" not in t:
            raise _fail(where, f"messages[{i}] needs 'role' and 'content'", "Write it as {\"role\": ..., \"content\": ...}.")
        role = {"function": "tool", "ipython": "tool", "observation": "tool", "human": "user"}.get(t["role"], t["role"])
        content = _content(t.get("content"), where, f"messages[{i}].content")
        if t.get("tool_calls"):
            content = (content + "\n" if content else "") + _tool_calls_text(t["tool_calls"])
        messages.append({"role": role, "content": content})
    return messages


def _from_sharegpt(r: dict, where: str, fmt: str) -> list[dict]:
    turns = _need(r, "conversations", where, fmt, list)
    messages = [{"role": "system", "content": r["system"]}] if r.get("system") else []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise _fail(where, f"conversations[{i}] needs 'from' and 'value'",
                        "Write each turn as {\"from\": \"human\"|\"gpt\", \"value\": ...}.")
        role = _SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise _fail(where, f"conversations[{i}].from is {t['from']!r}",
                        f"Use one of {', '.join(sorted(_SHAREGPT_ROLES))}.")
        value = _content(t["value"], where, f"conversations[{i}].value")
        if role == "assistant" and "<|startofexec|>" in value:
            messages += _split_ms_agent(value)
        else:
            messages.append({"role": role, "content": value})
    return messages


def _split_ms_agent(value: str) -> list[dict]:
    """MS-Agent replies embed tool results: the call is trained on, the result (tool output) is not."""
    out, pos = [], 0
    for m in _EXEC.finditer(value):
        out.append({"role": "assistant", "content": value[pos:m.start()]})
        out.append({"role": "tool", "content": m.group(1).strip()})
        pos = m.end()
    out.append({"role": "assistant", "content": value[pos:].strip()})
    return out


def _from_conversation(r: dict, where: str) -> list[dict]:
    turns = _need(r, "conversation", where, "conversation", list)
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise _fail(where, f"conversation[{i}] is not an object", "Write turns as {\"input\": ..., \"output\": ...}.")
        if t.get("system"):
            if i > 0:
                raise _fail(where, f"conversation[{i}] has a 'system' after the first turn",
                            "Put the system prompt in the first turn only.")
            messages.append({"role": "system", "content": _content(t["system"], where, "system")})
        messages.append({"role": "user", "content": _content(_need(t, "input", f"{where} turn {i}", "conversation"),
                                                              where, "input")})
        messages.append({"role": "assistant", "content": _content(_need(t, "output", f"{where} turn {i}",
                                                                        "conversation"), where, "output")})
    return messages


def check_role_order(messages: list[dict], where: str) -> None:
    """system? then user, assistant, (tool+, assistant)*, user, ... ending with an assistant reply."""
    allowed_after = {None: {"system", "user"}, "system": {"user"}, "user": {"assistant"},
                     "assistant": {"user", "tool"}, "tool": {"tool", "assistant"}}
    previous = None
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise _fail(where, f"message {i} has role {m['role']!r}", "Use system, user, assistant or tool.")
        if m["role"] not in allowed_after[previous]:
            expected = " or ".join(sorted(allowed_after[previous]))
            raise _fail(where, f"message {i} is {m['role']!r} but {expected} should come "
                               f"{'first' if previous is None else 'after ' + repr(previous)}",
                        "Order turns as system?, user, assistant, user, assistant, ... (tool results follow an "
                        "assistant tool call and precede the next assistant reply).")
        previous = m["role"]
    if previous != "assistant":
        raise _fail(where, "the conversation does not end with an assistant reply" if previous else "no messages",
                    "Each sample needs at least one user question and an assistant answer after it.")


def normalise(record: dict, fmt: str, where: str) -> dict:
    """One raw record in format `fmt` -> {"messages": [...]} or {"text": ...}. Raises InvalidRecord."""
    if not isinstance(record, dict):
        raise _fail(where, f"a record should be a JSON object, found {type(record).__name__}", "Fix the record.")
    if fmt == "text":
        return {"text": _need(record, "text", where, "text")}
    if fmt == "alpaca":
        messages = _from_alpaca(record, where)
    elif fmt == "messages":
        messages = _from_messages(record, where, fmt)
    elif fmt == "sharegpt":
        messages = _from_sharegpt(record, where, fmt)
    elif fmt == "conversation":
        messages = _from_conversation(record, where)
    elif fmt == "agent":
        messages = _from_messages(record, where, fmt) if "messages" in record else _from_sharegpt(record, where, fmt)
    else:
        raise TunelabError(f"unknown data_format {fmt!r}; use 'auto' or one of {', '.join(FORMATS)}")
    check_role_order(messages, where)
    return {"messages": messages}
