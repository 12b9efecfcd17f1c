"""Read data files into raw records: .json, .jsonl, .parquet, .csv, .txt. No format checks here.

Each record comes with where it was found ('file.jsonl line 7', 'file.json record 3'), so every later error can
point at it. JSON Lines are split at '\\n' only: a JSON string may hold U+2028, U+0085 and other characters that
`str.splitlines()` would also break at, which would cut a valid record in two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tunelab.errors import TunelabError

FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")
# Top-level keys that make a .json object one record rather than a wrapper such as {"data": [...]}.
RECORD_KEYS = ("messages", "conversations", "conversation", "instruction", "text", "chosen", "prompt")


class InvalidRecord(TunelabError):
    """One bad record: with skip_invalid=True it is counted and skipped instead of stopping the run."""


@dataclass
class Record:
    data: Any
    where: str
    """'file.jsonl line 7' or 'file.json record 3': what an error message points at."""


def list_data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise TunelabError(f"{path}: the directory holds no data file ({', '.join(FILE_SUFFIXES)}). "
                           f"Point data_path at a file, or a folder of such files.")
    return files


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TunelabError(f"{path} line {line}: bytes that are not UTF-8 ({raw[exc.start:exc.start + 4]!r}). "
                           f"Re-save the file as UTF-8, e.g. `iconv -f GBK -t UTF-8 {path.name} > fixed.json`.")


def parse_json(text: str, where: str) -> Any:
    """json.loads with the errors a user can fix turned into one line (raises json.JSONDecodeError as is)."""
    try:
        return json.loads(text)
    except RecursionError:  # the C parser recurses once per nesting level
        raise InvalidRecord(f"{where}: the JSON is nested too deeply to read (hundreds of levels of lists or "
                            f"objects inside each other). A training record is a few levels deep: fix the "
                            f"record, or delete it.") from None


def read_records(path: Path, *, skip_invalid: bool = False, on_skip: Callable[[str], None] = lambda m: None
                 ) -> Iterator[Record]:
    """Yield the raw records of one data file (no format checks yet)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_records(path, skip_invalid, on_skip)
    elif suffix == ".json":
        yield from _json_records(path)
    elif suffix in (".parquet", ".csv"):
        import pandas as pd

        try:
            frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)
        except Exception as exc:  # pandas/pyarrow raise many types for a damaged file
            raise TunelabError(f"{path}: cannot read it as {suffix[1:]}: {exc}")
        if frame.empty:
            raise TunelabError(f"{path}: the file holds no rows.")
        for i, rec in enumerate(frame.to_dict("records")):
            yield Record({k: plain(v) for k, v in rec.items()}, f"{path} row {i + (2 if suffix == '.csv' else 0)}")
    elif suffix == ".txt":
        text = read_text(path)
        if not text.strip():
            raise TunelabError(f"{path}: the file is empty.")
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                yield Record({"text": line.rstrip("\r")}, f"{path} line {n}")
    else:
        raise TunelabError(f"{path}: unknown file type {suffix!r}. Use one of {', '.join(FILE_SUFFIXES)}.")


def _jsonl_records(path: Path, skip_invalid: bool, on_skip) -> Iterator[Record]:
    text = read_text(path)
    if not text.strip():
        raise TunelabError(f"{path}: the file is empty. Put one JSON object per line in it.")
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = parse_json(line, where)
        except json.JSONDecodeError as exc:
            message = (f"{where}: not valid JSON ({exc.msg} at column {exc.colno}). Each line of a .jsonl file must "
                       f"be one complete JSON object; fix or delete that line.")
            if skip_invalid:
                on_skip(message)
                continue
            raise InvalidRecord(message) from None
        except InvalidRecord as exc:
            if skip_invalid:
                on_skip(str(exc))
                continue
            raise
        yield Record(obj, where)


def _json_records(path: Path) -> Iterator[Record]:
    text = read_text(path)
    if not text.strip():
        raise TunelabError(f"{path}: the file is empty. Put a JSON list of records in it.")
    try:
        obj = parse_json(text, str(path))
    except json.JSONDecodeError as exc:
        hint = " (it looks like JSON Lines: rename it to .jsonl)" if exc.msg == "Extra data" else ""
        raise TunelabError(f"{path} line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}{hint}. "
                           f"Fix the file (e.g. a missing comma or quote near there).") from None
    if isinstance(obj, dict):  # {"data": [...]} / {"train": [...]} wrappers, or one record
        lists = [v for v in obj.values() if isinstance(v, list) and v and isinstance(v[0], (dict, list))]
        obj = lists[0] if len(lists) == 1 and not any(k in obj for k in RECORD_KEYS) else [obj]
    if not isinstance(obj, list):
        raise TunelabError(f"{path}: expected a JSON list of records, found {type(obj).__name__}.")
    if not obj:
        raise TunelabError(f"{path}: the list of records is empty.")
    for i, rec in enumerate(obj):
        yield Record(rec, f"{path} record {i}")


def plain(value):
    """numpy arrays / scalars from parquet into plain Python lists / numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
