"""Where the data is: `data_path` entries checked and resolved into sources (files, a `datasets` folder or hub name,
the datasets of a LLaMA-Factory dataset_info.json); `tunelab.data.sources` reads them.

    sources = resolve_sources(cfg.data_path, cfg.data_format, config_dir)

A `data_path` entry is a path (a file, a folder of files, a `datasets` folder or hub name), or a dict:
``{"path", "format"?, "ratio"?, "dataset"? (names in a LLaMA-Factory dataset_info.json), "placeholders"?
({"name": ..., "author": ...} filling ``{{name}}`` / ``{{author}}`` in the text)}``. `data_path_problem` checks one
as written; the config step calls it when a config loads, so its message can name the config's line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tunelab.config.typecheck import did_you_mean
from tunelab.data import dataset_info
from tunelab.data.formats import FORMATS
from tunelab.data.messages import MULTIMODAL_FIX
from tunelab.data.preference import IMAGES_FIX, not_supervised_error
from tunelab.errors import TunelabError

ENTRY_KEYS = ("path", "format", "ratio", "dataset", "placeholders")
RELATIVE_PATHS = "Relative paths are read from the config file's folder, then the current directory."
# A resolved_config.py records the folders its relative paths were read from (a JSON list after this prefix): rerun
# from another folder, a data_path not found names where the run found it.
RESOLVED_IN = "# Relative paths were read from these folders, in order, when this config was resolved: "


def _relative_path_folders(config_dir: str | None) -> list[Path]:
    """The folders a relative path a config names is read from, in order (`RELATIVE_PATHS`)."""
    return ([Path(config_dir)] if config_dir else []) + [Path()]


def find_config_path(path, config_dir: str | None,
                     test: Callable[[Path], bool] = Path.exists) -> tuple[Optional[Path], str]:
    """A path a config names: a relative one is read from the config file's folder first, then the current
    directory (`RELATIVE_PATHS`). Returns the first place that passes `test` (None: none does) and the places looked
    at ("A and B"), for the caller's message."""
    path = Path(path).expanduser()
    candidates = list(dict.fromkeys(folder / path for folder in _relative_path_folders(config_dir)))
    # The message names each place once, as a full path: a config in the current folder makes both the same place,
    # and "looked at data/x and data/x" would not say where that is.
    looked = dict.fromkeys(str(c.absolute()) for c in candidates)
    return next((c for c in candidates if test(c)), None), " and ".join(looked)


def resolved_in_line(config_dir: str | None) -> str:
    """The RESOLVED_IN line of a resolved config: the folders `find_config_path` reads relative paths from."""
    return RESOLVED_IN + json.dumps(list(dict.fromkeys(str(f.absolute()) for f in _relative_path_folders(config_dir))))


def _where_it_was(path: str, config_dir: str | None) -> str:
    """For a relative path not found from a work dir's resolved_config.py (rerun from another folder): where the run
    that wrote it read the path from, or "" (another config, or no such line)."""
    from tunelab.train.layout import RESOLVED_CONFIG

    if not config_dir or Path(path).expanduser().is_absolute():
        return ""
    try:
        lines = (Path(config_dir) / RESOLVED_CONFIG).read_text(encoding="utf-8").splitlines()
        folders = json.loads(next(line for line in lines if line.startswith(RESOLVED_IN))[len(RESOLVED_IN):])
    except (OSError, StopIteration, ValueError):  # unreadable (undecodable text is a ValueError), no line, not JSON
        return ""
    there = next(((Path(f) / path).resolve() for f in folders if (Path(f) / path).exists()), None)
    if there is None:
        return (f" When this config was resolved, relative paths were read from {', then '.join(folders)}: it is not "
                f"there either.")
    return f" It was read from {there} when this config was resolved: write that full path in data_path."


@dataclass
class Source:
    path: str
    format: str
    ratio: float
    kind: str
    """'files', 'disk' (a datasets.save_to_disk folder) or 'hub' (a `datasets` name)."""
    resolved: Optional[Path] = None
    entry: Optional[dataset_info.RegistryEntry] = None
    """The LLaMA-Factory dataset_info.json entry this source comes from, if any."""
    placeholders: dict = field(default_factory=dict)


def resolve_sources(data_path, data_format: str = "auto", config_dir: str | None = None,
                    objective: str = "sft", *, multimodal: bool = False) -> list[Source]:
    """objective: what the run trains ('sft' refuses a dataset_info.json entry of preference or KTO data);
    multimodal: a run with a vision tower, which reads datasets with images."""
    if data_path in (None, "", []):
        raise TunelabError("data_path is not set: point it at a data file, a folder, or a `datasets` name.")
    problem = data_path_problem(data_path, data_format)
    if problem:
        raise TunelabError(problem)
    entries = data_path if isinstance(data_path, list) else [data_path]
    sources = []
    for i, entry in enumerate(entries):
        where = f"data_path[{i}]" if isinstance(data_path, list) else "data_path"
        spec = entry if isinstance(entry, dict) else {"path": entry}
        fmt, ratio = spec.get("format", data_format), spec.get("ratio", 1.0)
        placeholders = spec.get("placeholders") or {}
        source = _locate(str(spec["path"]), fmt, float(ratio), config_dir)
        source.placeholders = placeholders
        if source.kind == "files" and dataset_info.is_registry(source.resolved):
            if "format" in spec:
                raise TunelabError(f"{where}: a dataset_info.json says each dataset's format; remove 'format'.")
            sources += [_registry_source(e, source, where, objective, multimodal) for e in
                        dataset_info.registry_entries(source.resolved, spec.get("dataset"), where)]
        elif "dataset" in spec:
            raise TunelabError(f"{where}: 'dataset' names datasets of a LLaMA-Factory dataset_info.json, but "
                               f"{spec['path']!r} is not one.")
        else:
            _check_preference_format(fmt, objective, f"{where}: 'format'" if "format" in spec else "data_format")
            sources.append(source)
    return sources


def _check_preference_format(fmt: str, objective: str, named: str) -> None:
    """A preference run reads each record's own shape (`tunelab.data.preference`): a supervised format named for it
    would be ignored, so it is refused."""
    if objective != "sft" and fmt != "auto":
        raise TunelabError(f"{named} = {fmt!r} with objective = '{objective}': the supervised formats are not read "
                           f"by a preference run, which reads each record's own shape (TRL, LLaMA-Factory, OpenAI, "
                           f"KTO: docs/DATA.md, \"Preference and KTO data\"). Set data_format = 'auto' (and remove "
                           f"'format' from data_path's entries); a dataset_map_fn maps other layouts.")


def data_path_problem(data_path, data_format: str = "auto") -> str | None:
    """What is wrong with a data_path value as written (its entries' keys, formats, ratios, placeholders), or None:
    checked when the config loads, so the message can name the config's line, and again before reading."""
    entries = data_path if isinstance(data_path, list) else [data_path]
    for i, entry in enumerate(entries):
        where = f"data_path[{i}]" if isinstance(data_path, list) else "data_path"
        if not isinstance(entry, (str, dict)):
            return f"{where}: an entry is a path or a dict, found {type(entry).__name__} ({entry!r})."
        spec = entry if isinstance(entry, dict) else {"path": entry}
        unknown = [k for k in spec if k not in ENTRY_KEYS]
        if "path" not in spec or unknown:
            close = "".join(did_you_mean(str(k), ENTRY_KEYS) for k in unknown)
            return (f"{where}: " + (f"unknown key(s) {', '.join(map(repr, unknown))};{close} " if unknown else
                                    "no 'path' key; ") +
                    "an entry is {'path': 'file.json', 'format': ..., 'ratio': 1.0, 'dataset': ..., "
                    "'placeholders': {'name': ..., 'author': ...}} (all but 'path' optional).")
        fmt, ratio = spec.get("format", data_format), spec.get("ratio", 1.0)
        if fmt != "auto" and fmt not in FORMATS:
            return (f"{where}: unknown format {fmt!r};{did_you_mean(str(fmt), FORMATS)} use 'auto' or one of "
                    f"{', '.join(FORMATS)}.")
        # inf and NaN pass "above 0" (NaN fails nothing), then break int(ratio) when the ratio is applied
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio) or ratio <= 0:
            return f"{where}: ratio must be a finite number above 0 (1.0 = every record once), got {ratio!r}."
        names = spec.get("dataset")
        if not _dataset_names_ok(names):
            return (f"{where}: 'dataset' names datasets of a dataset_info.json: a text ('a,b') or a list of texts; "
                    f"found {type(names).__name__} ({names!r}).")
        placeholders = spec.get("placeholders") or {}
        if not isinstance(placeholders, dict) or not all(isinstance(v, str) for v in placeholders.values()):
            return f"{where}: 'placeholders' should be a dict of texts, e.g. {{'name': 'TuneBot', 'author': 'Alice'}}."
    return None


def _dataset_names_ok(names) -> bool:
    """None (not given), 'a,b', or a list of names: what dataset_info.registry_entries reads."""
    return names is None or isinstance(names, str) or (isinstance(names, list) and
                                                       all(isinstance(n, str) for n in names))


def _registry_source(entry: dataset_info.RegistryEntry, registry: Source, where: str, objective: str,
                     multimodal: bool) -> Source:
    path = f"{registry.path}:{entry.name}"
    at = f"{where}: dataset {entry.name!r} of {registry.resolved}"
    if objective == "sft" and (entry.ranking or entry.columns.get("kto_tag")):  # said by the entry: no need to read
        raise not_supervised_error("preference" if entry.ranking else "kto", at, multimodal=multimodal)
    media = [c for c in ("images", "videos", "audios") if entry.columns.get(c)]
    if media and not multimodal:
        raise TunelabError(f"{at} has {' and '.join(media)} (multimodal data). "
                           f"{MULTIMODAL_FIX if objective == 'sft' else IMAGES_FIX + '.'}")
    if set(media) - {"images"}:
        raise TunelabError(f"{at} has {' and '.join(m for m in media if m != 'images')}: multimodal training "
                           "reads images only. Remove those columns from its entry in dataset_info.json.")
    if entry.kind == "files" and not Path(entry.location).exists():
        raise TunelabError(f"{at} names the file {entry.location}, which does not exist.")
    return Source(path, "auto", registry.ratio, entry.kind, Path(entry.location) if entry.kind == "files" else None,
                  entry, registry.placeholders)


def _locate(path: str, fmt: str, ratio: float, config_dir: str | None) -> Source:
    found, looked = find_config_path(path, config_dir)
    if found is not None:
        found = found.resolve()
        is_saved = found.is_dir() and ((found / "state.json").exists() or (found / "dataset_dict.json").exists())
        return Source(path, fmt, ratio, "disk" if is_saved else "files", found)
    if "/" in path and not path.startswith((".", "/", "~")) and not Path(path).suffix:
        return Source(path, fmt, ratio, "hub")
    raise TunelabError(f"data_path {path!r} not found (looked at {looked}). {RELATIVE_PATHS}"
                       + _where_it_was(path, config_dir))
