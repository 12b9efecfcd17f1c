"""Read data files into raw records: .json, .jsonl (.ndjson), .parquet, .csv, .tsv, .txt. No format checks here.

Each record comes with where it was found ('file.jsonl line 7', 'file.json record 3'), so every later error can
point at it. JSON Lines are split at '\\n' only: a JSON string may hold U+2028, U+0085 and other characters that
`str.splitlines()` would also break at, which would cut a valid record in two.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tunelab.errors import TunelabError

FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv", ".tsv", ".txt")
JSONL_SUFFIXES = (".jsonl", ".ndjson")  # newline-delimited JSON is JSON Lines by another name
_SAID = [" / ".join(JSONL_SUFFIXES) if s == JSONL_SUFFIXES[0] else s
         for s in FILE_SUFFIXES if s not in JSONL_SUFFIXES[1:]]
SUFFIXES_READ = ", ".join(_SAID[:-1]) + " and " + _SAID[-1]
""".json, .jsonl / .ndjson, .parquet, .csv, .tsv and .txt: FILE_SUFFIXES as a message says them."""
TABLE_SEPARATORS = {".csv": ",", ".tsv": "\t"}
# Top-level keys that make a .json object one record rather than a wrapper such as {"data": [...]}: every field a
# format reads at the top level (a record's own lists, e.g. alpaca's 'history', are not a wrapper's list of records).
RECORD_KEYS = ("messages", "conversations", "conversation", "instruction", "prompt", "input", "output", "text",
               "system", "history", "tools", "functions", "chosen", "rejected", "completion")


class InvalidRecord(TunelabError):
    """One bad record: with skip_invalid=True it is counted and skipped instead of stopping the run."""


@dataclass
class Record:
    data: Any
    where: str
    """'file.jsonl line 7' or 'file.json record 3': what an error message points at."""


def _folder_files(path: Path) -> list[Path]:
    """Every file under a folder, hidden files and folders (.git, .cache) left out."""
    return sorted(p for p in path.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def data_files(path: Path) -> tuple[list[Path], list[Path]]:
    """The files a data_path names (itself, or a folder's files of the types read) and, for a folder, its files of
    other types, which are reported so that none is left out without a word. One walk of the folder."""
    if path.is_file():
        return [path], []
    if not path.is_dir():  # /dev/null, a pipe: it exists, but was reported as an empty folder
        raise TunelabError(f"{path}: {_kind(path)}, not a regular file or a folder. Save the data to a file "
                           f"({SUFFIXES_READ}) and point data_path at it, or at a folder of such files.")
    found = _folder_files(path)
    files = [p for p in found if p.suffix.lower() in FILE_SUFFIXES]
    others = [p for p in found if p.suffix.lower() not in FILE_SUFFIXES]
    if not files:
        listed = f"; it holds only {_names(others, path)}, of types not read" if others else ""
        raise TunelabError(f"{path}: the directory holds no data file ({', '.join(FILE_SUFFIXES)}){listed}. "
                           f"Point data_path at a file, or a folder of such files (decompress .gz files first).")
    return files, others


def _kind(path: Path) -> str:
    """What a path that is neither a regular file nor a folder is, in words."""
    for test, kind in ((Path.is_char_device, "a character device"), (Path.is_block_device, "a block device"),
                       (Path.is_fifo, "a named pipe"), (Path.is_socket, "a socket")):
        if test(path):
            return kind
    return "a special file"


def _names(files: list[Path], folder: Path, shown: int = 10) -> str:
    names = [str(f.relative_to(folder)) for f in files]
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    encoding = _encoding(raw)
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise TunelabError(_not_text(path, raw, exc, encoding)) from None


def _encoding(raw: bytes) -> str:
    # UTF-16 with its byte-order mark: what Windows editors save as "Unicode"; the mark says how to read it
    return "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def _not_text(path: Path, raw: bytes, exc: UnicodeDecodeError, encoding: str, line: int | None = None) -> str:
    """The message for bytes that are not the file's encoding: file, line, the bytes, and how to convert."""
    line = line or raw[: exc.start].count(b"\n") + 1
    name = "UTF-16" if encoding == "utf-16" else "UTF-8"
    return (f"{path} line {line}: bytes that are not {name} ({exc.object[exc.start:exc.start + 4]!r}). Re-save the "
            f"file as UTF-8, e.g. from GBK: `iconv -f GBK -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`.")


def _jsonl_lines(path: Path) -> list[str | InvalidRecord]:
    """The lines of a .jsonl file, a line whose bytes are not UTF-8 given as its error. Each line is its own record,
    so one pasted from a Latin-1 or GBK file is an invalid record (skip_invalid skips it, check-dataset lists it
    beside the others), not the end of the file. A UTF-16 file is decoded whole: its lines are not split at b"\n"."""
    raw = path.read_bytes()
    encoding = _encoding(raw)
    try:
        return raw.decode(encoding).split("\n")
    except UnicodeDecodeError as exc:
        if encoding == "utf-16":
            raise TunelabError(_not_text(path, raw, exc, encoding)) from None
    lines: list[str | InvalidRecord] = []
    # b"\n" is never inside a UTF-8 character
    for n, chunk in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as exc:
            lines.append(InvalidRecord(_not_text(path, raw, exc, "utf-8", n)))
    return lines


NUMBER_FIX = "Write it as text in quotes, or delete it."


def number_too_long(exc: ValueError) -> str | None:
    """What json's plain ValueError for an integer longer than Python converts from text says, in words (None for
    any other ValueError). Python refuses more than sys.get_int_max_str_digits() digits (4300 by default; a guard
    against slow conversions), and json.loads lets that ValueError out as it is, not as a JSONDecodeError."""
    found = re.search(r"value has (\d+) digits", str(exc))
    if isinstance(exc, json.JSONDecodeError) or not found:
        return None
    return f"a number of {found.group(1)} digits, more than Python reads from JSON ({sys.get_int_max_str_digits()})"


def parse_json(text: str, where: str, twice: list | None = None) -> Any:
    """json.loads with the errors a user can fix turned into one line (raises json.JSONDecodeError as is).

    twice: where given, the keys an object of the text holds twice are added to it (JSON keeps only the last value,
    so the first would be lost without a word)."""
    try:
        return json.loads(text, object_pairs_hook=None if twice is None else _keeping_track(twice))
    except RecursionError:  # the C parser recurses once per nesting level
        raise InvalidRecord(f"{where}: the JSON is nested too deeply to read (hundreds of levels of lists or "
                            f"objects inside each other). A training record is a few levels deep: fix the "
                            f"record, or delete it.") from None
    except ValueError as exc:
        too_long = number_too_long(exc)
        if too_long is None:
            raise
        raise InvalidRecord(f"{where}: {too_long}. {NUMBER_FIX}") from None


def _keeping_track(twice: list) -> Callable[[list], dict]:
    def make_object(pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set = set()
            twice.extend(key for key, _ in pairs if key in seen or seen.add(key))
        return obj
    return make_object


def _report_twice(twice: list, where: str, on_unused: Callable[[str, str, str], None]) -> None:
    for key in dict.fromkeys(twice):
        on_unused(f"{key} (the first of two)", where, f"an object gives the key {key!r} twice and JSON keeps only the "
                  f"last value: delete the other, or rename it if both should be read")


def read_records(path: Path, *, skip_invalid: bool = False, on_skip: Callable[[str], None] = lambda m: None,
                 on_unused: Callable[[str, str, str], None] = lambda name, where, hint: None) -> Iterator[Record]:
    """Yield the raw records of one data file (no format checks yet).

    on_unused(name, where, hint): called for what the file holds beside its records (a wrapper object's other keys),
    so the caller reports it as a field not used."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_records(path, skip_invalid, on_skip, on_unused)
    elif suffix == ".json":
        yield from _json_records(path, on_unused)
    elif suffix == ".parquet" or suffix in TABLE_SEPARATORS:
        import pandas as pd

        try:
            # A CSV cell is text: pandas' guess would make an all-numeric column int ('007' -> 7), which no format
            # reads. keep_default_na=False keeps 'NA' / 'null' as written and an empty cell as "".
            frame = pd.read_parquet(path) if suffix == ".parquet" else \
                pd.read_csv(path, sep=TABLE_SEPARATORS[suffix], dtype=str, keep_default_na=False)
        except Exception as exc:  # pandas/pyarrow raise many types for a damaged file
            raise TunelabError(f"{path}: cannot read it as {suffix[1:]}: {exc}")
        if frame.empty and suffix in TABLE_SEPARATORS:  # one line, often a row written without a header line
            header = TABLE_SEPARATORS[suffix].join(map(str, frame.columns))
            raise TunelabError(f"{path}: no rows: its first line ({header!r}) is read as the column names, and no "
                               f"line follows it. Put a line naming the columns first (instruction, input, output for "
                               f"alpaca; text for plain text; prompt, chosen, rejected for preference pairs: "
                               f"docs/DATA.md, Formats), then one record per line.")
        if frame.empty:
            raise TunelabError(f"{path}: the file holds no rows.")
        first_row = 2 if suffix in TABLE_SEPARATORS else 0  # a table's line number: its header is line 1
        for i, rec in enumerate(frame.to_dict("records")):
            yield Record({k: plain(v) for k, v in rec.items()}, f"{path} row {i + first_row}")
    elif suffix == ".txt":
        text = read_text(path)
        if not text.strip():
            raise TunelabError(f"{path}: the file is empty.")
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                yield Record({"text": line.rstrip("\r")}, f"{path} line {n}")
    else:
        raise TunelabError(f"{path}: unknown file type {suffix!r}. Use one of {', '.join(FILE_SUFFIXES)}.")


def _jsonl_records(path: Path, skip_invalid: bool, on_skip, on_unused) -> Iterator[Record]:
    lines = _jsonl_lines(path)
    first = next((n for n, line in enumerate(lines, 1) if not _blank(line)), None)
    if first is None:
        raise TunelabError(f"{path}: the file is empty. Put one JSON object per line in it.")
    for n, line in enumerate(lines, 1):
        if _blank(line):
            continue
        where = f"{path} line {n}"
        try:
            if isinstance(line, InvalidRecord):
                raise line
            twice: list = []
            obj = parse_json(line, where, twice)
            _report_twice(twice, where, on_unused)
            _refuse_a_list_of_records(obj, where)
        except json.JSONDecodeError as exc:
            if n == first and _is_one_json_document("\n".join(t for t in lines if isinstance(t, str))):
                raise TunelabError(f"{path}: the file is one JSON document spread over several lines, where a .jsonl "
                                   f"file holds one JSON object per line: rename it to .json.") from None
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


def _blank(line: str | InvalidRecord) -> bool:
    """A .jsonl line that holds nothing (a line that is not UTF-8 is a record, its error)."""
    return isinstance(line, str) and not line.strip()


def _refuse_a_list_of_records(obj: Any, where: str) -> None:
    """A line may be a bare list of chat messages (XTuner's openai files), not a list of records."""
    if isinstance(obj, list) and obj and all(isinstance(item, dict) and not {"role", "from"} & item.keys()
                                             for item in obj):
        raise InvalidRecord(f"{where}: the line holds a list of {len(obj)} records, where a .jsonl line holds one: "
                            f"write one JSON object per line, or, if the file is one JSON list, rename it to .json.")


def _is_one_json_document(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:  # JSONDecodeError, or a number too long to read (number_too_long)
        return False
    return True


def _json_records(path: Path, on_unused: Callable[[str, str, str], None]) -> Iterator[Record]:
    text = read_text(path)
    if not text.strip():
        raise TunelabError(f"{path}: the file is empty. Put a JSON list of records in it.")
    try:
        twice: list = []
        obj = parse_json(text, str(path), twice)
        _report_twice(twice, str(path), on_unused)
    except json.JSONDecodeError as exc:
        hint = " (it looks like JSON Lines: rename it to .jsonl)" if exc.msg == "Extra data" else ""
        raise TunelabError(f"{path} line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}{hint}. "
                           f"Fix the file (e.g. a missing comma or quote near there).") from None
    if isinstance(obj, dict):  # {"data": [...]} / {"train": [...]} wrappers, or one record
        obj = _unwrap(obj, path, on_unused)
    if not isinstance(obj, list):
        raise TunelabError(f"{path}: expected a JSON list of records, found {type(obj).__name__}.")
    if not obj:
        raise TunelabError(f"{path}: the list of records is empty.")
    for i, rec in enumerate(obj):
        yield Record(rec, f"{path} record {i}")


def _unwrap(obj: dict, path: Path, on_unused: Callable[[str, str, str], None]) -> Any:
    """A .json object: the list of records it wraps, or [obj] when it is one record (it has a field a format reads,
    whatever lists it holds). A wrapper's keys beside its list are not read: each is reported."""
    lists = [k for k, v in obj.items() if isinstance(v, list) and v and isinstance(v[0], (dict, list))]
    if len(lists) != 1 or any(k in obj for k in RECORD_KEYS):
        return [obj]
    for key in obj:
        if key != lists[0]:
            on_unused(str(key), f"{path} (top level, beside the list {lists[0]!r})",
                      f"the file wraps its records in {{{lists[0]!r}: [...]}} and only that list is read: "
                      f"drop the key, or move what should be trained into the records")
    return obj[lists[0]]


def plain(value):
    """numpy arrays / scalars from parquet into plain Python lists / numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
