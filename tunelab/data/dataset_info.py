"""LLaMA-Factory's ``dataset_info.json`` as a data registry: a dataset name -> its file, format and column names.

    data_path = [{"path": "data/dataset_info.json", "dataset": "alpaca_en_demo,identity"}]

Each named dataset is read as LLaMA-Factory reads it: ``file_name`` relative to the registry's folder (or
``hf_hub_url`` from the Hugging Face hub, with ``subset`` / ``split`` / ``folder``), ``formatting`` alpaca (default),
sharegpt or openai, ``columns`` saying which field holds what, ``tags`` naming the roles, ``num_samples`` how many
samples to use. Fields the entry does not map are not read (LLaMA-Factory ignores them too) and are reported.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tunelab.config.typecheck import did_you_mean
from tunelab.data.messages import fail
from tunelab.errors import TunelabError

REGISTRY_NAME = "dataset_info.json"
_WHERE_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_KNOWN_KEYS = {*_WHERE_KEYS, "formatting", "ranking", "subset", "split", "folder", "num_samples", "columns", "tags"}
_COLUMN_DEFAULTS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
# LLaMA-Factory's column names: the fields of a record each one can map (a misspelt one would map nothing)
_COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios",
            "chosen", "rejected", "kto_tag")
_TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# LLaMA-Factory's role tag -> the sharegpt speaker tunelab reads
_SPEAKERS = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
             "function_tag": "function_call", "system_tag": "system"}


@dataclass
class RegistryEntry:
    name: str
    location: str
    """A local file or folder (resolved against the registry's folder) or a hub dataset id."""
    kind: str
    """'files' or 'hub'."""
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    subset: Optional[str] = None
    split: str = "train"
    folder: Optional[str] = None
    num_samples: Optional[int] = None

    def column(self, name: str) -> Optional[str]:
        return self.columns.get(name, _COLUMN_DEFAULTS.get(name))


def is_registry(path: Path) -> bool:
    """A dataset_info.json file, or a folder holding one."""
    return (path.is_file() and path.name == REGISTRY_NAME) or (path.is_dir() and (path / REGISTRY_NAME).is_file())


def registry_entries(path: Path, names: Any, where: str) -> list[RegistryEntry]:
    """The entries `names` ('a,b' or a list) of the registry at `path` (the file or its folder)."""
    file = path / REGISTRY_NAME if path.is_dir() else path
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TunelabError(f"{file}: not a readable dataset_info.json ({exc}).") from None
    if not isinstance(table, dict):
        raise TunelabError(f"{file}: a dataset_info.json maps dataset names to their descriptions; found "
                           f"{type(table).__name__}.")
    local = [n for n, e in table.items() if isinstance(e, dict) and "file_name" in e]
    if names in (None, "", []):
        raise TunelabError(f"{where}: {file} is a LLaMA-Factory dataset registry: name the datasets to use, e.g. "
                           f"data_path = [{{'path': '{path}', 'dataset': '{','.join(local[:2]) or 'NAME'}'}}]. "
                           f"Datasets with a local file: {', '.join(local) or 'none'}.")
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    entries = []
    for name in names:
        if name not in table:
            close = difflib.get_close_matches(str(name), list(table), n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise TunelabError(f"{where}: {file} has no dataset {name!r}.{hint}")
        entries.append(_entry(name, table[name], file, where))
    return entries


def _entry(name: str, spec: Any, file: Path, where: str) -> RegistryEntry:
    at = f"{file} dataset {name!r}"
    if not isinstance(spec, dict):
        raise TunelabError(f"{at}: the description should be an object with 'file_name' or 'hf_hub_url'.")
    unknown = sorted(set(spec) - _KNOWN_KEYS)
    if unknown:
        raise TunelabError(f"{at}: unknown key(s) {', '.join(map(repr, unknown))} (known: "
                           f"{', '.join(sorted(_KNOWN_KEYS))}).")
    problem = _value_problem(spec)
    if problem:
        raise TunelabError(f"{at}: {problem}")
    if "file_name" in spec and not any(k in spec for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")):
        location, kind = str(file.parent / spec["file_name"]), "files"
    elif "hf_hub_url" in spec:
        location, kind = spec["hf_hub_url"], "hub"
    else:
        found = next((k for k in _WHERE_KEYS if k in spec), None)
        raise TunelabError(f"{at}: {found or 'no location'} is not something tunelab reads (local files and Hugging "
                           f"Face hub datasets only). Download the data and give its file as 'file_name'.")
    for block, known in (("columns", _COLUMNS), ("tags", tuple(_TAG_DEFAULTS))):
        value = spec.get(block) or {}
        if not isinstance(value, dict):
            raise TunelabError(f"{at}: '{block}' should be an object, found {type(value).__name__}.")
        for key, named in value.items():
            if key not in known:
                raise TunelabError(f"{at}: unknown {block} key {key!r}.{did_you_mean(str(key), known)} "
                                   f"LLaMA-Factory's {block}: {', '.join(known)}.")
            # a field name is looked up in each record (a list or dict cannot be); null maps nothing, as in LLaMA-Factory
            if named is not None and not isinstance(named, str):
                raise TunelabError(f"{at}: {block} {key!r} should name a field (text), found {_kind(named)} "
                                   f"({named!r}). Write the record's field name in quotes, e.g. "
                                   f"\"{key}\": \"{_COLUMN_DEFAULTS.get(key, _TAG_DEFAULTS.get(key, key))}\".")
    formatting = spec.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise TunelabError(f"{at}: formatting {formatting!r}; LLaMA-Factory's are 'alpaca', 'sharegpt', 'openai'.")
    return RegistryEntry(name, location, kind, formatting, bool(spec.get("ranking", False)),
                         dict(spec.get("columns") or {}), {**_TAG_DEFAULTS, **(spec.get("tags") or {})},
                         spec.get("subset"), spec.get("split", "train"), spec.get("folder"), spec.get("num_samples"))


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _value_problem(spec: dict) -> str | None:
    """A location or num_samples of the wrong kind, said before it is used (a path joined with a number, a
    sample size of -1 or NaN failed with Python's own words)."""
    for key in _WHERE_KEYS:
        if key in spec and not (isinstance(spec[key], str) and spec[key].strip()):
            return (f"'{key}' should be a file name (text), found {_kind(spec[key])} ({spec[key]!r}). Write the data "
                    f"file's path, relative to the dataset_info.json's folder, in quotes.")
    count = spec.get("num_samples")
    # 0 is refused too: it was read as "not set" and used every record
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        return (f"num_samples should be a whole number, 1 or more; found {count!r}. It is how many samples of the "
                f"dataset to use; remove it to use every record once.")
    return None


# --- reading one record through an entry ----------------------------------------------------------

def map_record(record: Any, entry: RegistryEntry, where: str) -> tuple[dict, str, list[str]]:
    """A raw record -> (the record in tunelab's field names, its format, the fields the entry does not map)."""
    if not isinstance(record, dict):
        raise fail(where, f"a record should be a JSON object, found {type(record).__name__}", "Fix the record.")
    mapped = {key: entry.column(key) for key in ("system", "tools", "images", "videos", "audios", "chosen",
                                                  "rejected", "kto_tag")}
    out: dict = {}
    for key, column in mapped.items():
        if column and column in record:
            out["label" if key == "kto_tag" else key] = record[column]
    if entry.formatting == "alpaca":
        prompt, query, response, history = (entry.column(k) for k in ("prompt", "query", "response", "history"))
        used = {prompt, query, response, history, *mapped.values()}
        if not entry.ranking and "label" not in out and response not in record and prompt in record:
            fmt, out = "text", {"text": record[prompt]}  # LLaMA-Factory pretraining data: the prompt column only
        else:
            fmt = "alpaca"
            out.update({"instruction": record.get(prompt) or "", "input": record.get(query) or ""})
            if response in record:
                out["output"] = record[response]
            if history and record.get(history):
                out["history"] = record[history]
    else:
        turns_column = entry.column("messages")
        used = {turns_column, *mapped.values()}
        turns = record.get(turns_column)
        if not isinstance(turns, list):
            raise fail(where, f"no list of messages in {turns_column!r}",
                       f"Check 'columns.messages' of dataset {entry.name!r} in its dataset_info.json.")
        fmt = "sharegpt"
        out["conversations"] = [_turn(t, entry, where, f"{turns_column}[{i}]") for i, t in enumerate(turns)]
        for key in ("chosen", "rejected"):
            if isinstance(out.get(key), dict):
                out[key] = _turn(out[key], entry, where, key)
    return out, fmt, [k for k in record if k not in used]


def _turn(turn: Any, entry: RegistryEntry, where: str, at: str) -> dict:
    role_tag, content_tag = entry.tags["role_tag"], entry.tags["content_tag"]
    if not isinstance(turn, dict) or role_tag not in turn:
        raise fail(where, f"{at} has no {role_tag!r}", f"Check 'tags.role_tag' of dataset {entry.name!r}.")
    speakers = {entry.tags[tag]: speaker for tag, speaker in _SPEAKERS.items() if entry.tags.get(tag)}
    speaker = speakers.get(turn[role_tag])
    if speaker is None:
        raise fail(where, f"{at}.{role_tag} is {turn[role_tag]!r}, which dataset {entry.name!r} does not name",
                   f"Its tags name {', '.join(map(repr, speakers))}; fix the record or the entry's 'tags'.")
    rest = {k: v for k, v in turn.items() if k not in (role_tag, content_tag)}
    return {**rest, "from": speaker, "value": turn.get(content_tag)}
