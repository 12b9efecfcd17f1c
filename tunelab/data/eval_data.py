"""The data a trained model is run on after training: `tunelab reward` scores its replies, `tunelab predict`
answers its prompts. One data file, a folder of them, or the datasets of a LLaMA-Factory dataset_info.json, read
record by record as training reads them, each record turned into the command's sample by the command's own function:

    samples = read_samples("test.jsonl", to_sample, limit=100, warn=print)

One place decides how these commands read data: a registry entry's columns and tags map a record to tunelab's fields
(`sources.registered`, the function training calls), num_samples picks the samples training picks with the default
seed (`sources.pick_samples`), and the fields a record carries that nothing reads are told to `warn` as training
tells them, as are its unfilled {{placeholders}}. A bad record stops the reading at once, naming its file and line.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable

from tunelab.errors import TunelabError

ToSample = Callable[[object, str, str, dict], object]
"""to_sample(record's fields as its source reads them, its format ('auto' unless the source says), where it is
('data.jsonl line 3'), its file's report (for `reports.count_unused`)) -> the command's sample."""


def check_data_file(path: str | Path, dataset: str | None = None, verb: str = "read") -> Path:
    """The data to read (a file, a folder of data files, or a LLaMA-Factory dataset_info.json (or its folder) with
    the datasets named), or an error naming it; `verb`: what the command does with them, for its messages."""
    from tunelab.data.dataset_info import REGISTRY_NAME, is_registry

    path = Path(path)
    if not path.exists():
        raise TunelabError(f"--data {path}: no such file.")
    if is_registry(path):  # read as training reads it: its entries' files through their columns and tags
        if not dataset:
            raise TunelabError(f"--data {path}: a LLaMA-Factory dataset registry ({REGISTRY_NAME}); name the "
                               f"datasets to {verb} with --dataset NAME (its datasets: {registered_names(path)}).")
        return path
    if dataset:
        raise TunelabError(f"--dataset {dataset!r} names datasets of a LLaMA-Factory {REGISTRY_NAME}, but --data "
                           f"{path} is not one.")
    if path.is_dir():  # a folder: its data files, as training reads it
        from tunelab.data.files import SUFFIXES_READ, data_files

        try:
            data_files(path)
        except TunelabError:
            raise TunelabError(f"--data {path}: a folder with no data file ({SUFFIXES_READ}) and no {REGISTRY_NAME}: "
                               f"give a data file, a folder of them, or a {REGISTRY_NAME} with --dataset.") from None
    return path


def registered_names(path: Path) -> str:
    """The dataset names of a dataset_info.json (or its folder), for a message."""
    from tunelab.data.dataset_info import REGISTRY_NAME

    try:
        table = json.loads((path / REGISTRY_NAME if path.is_dir() else path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        table = {}
    names = [str(name) for name in table] if isinstance(table, dict) else []
    return ", ".join(names) or "none"


def read_samples(path: str | Path, to_sample: ToSample, *, limit: int | None = None, dataset: str | None = None,
                 warn: Callable[[str], None] | None = None, verb: str = "read", multimodal: bool = False) -> list:
    """The samples of the data at `path` (of the datasets `dataset` names in a dataset_info.json; the first `limit`),
    each made by `to_sample` from a record as training reads it. A folder's files that are not data (a README) are
    told to `warn`, so none is passed over without a word. `multimodal`: the command reads images (`tunelab
    predict`), so a dataset_info.json entry with an images column is read as a LLaVA run reads it, not refused."""
    from tunelab.config.schema import TrainConfig
    from tunelab.data.data_path import resolve_sources
    from tunelab.data.files import SUFFIXES_READ, data_files
    from tunelab.data.reports import file_warnings, note
    from tunelab.data.sources import pick_samples, registered, source_records

    path = check_data_file(path, dataset, verb)
    data_path = [{"path": str(path), "dataset": dataset}] if dataset else str(path)
    seed = TrainConfig().seed
    samples: list = []
    # a registry's entries may hold pairs, KTO samples or conversations: what a reward run's data may be
    for i, source in enumerate(resolve_sources(data_path, "auto", objective="reward", multimodal=multimodal)):
        if warn is not None and source.entry is None and source.resolved is not None and source.resolved.is_dir():
            for other in data_files(source.resolved)[1]:
                warn(f"{other}: not read (data files are {SUFFIXES_READ}).")
        # num_samples picks among all of a dataset's samples, so its source is read whole before `limit` applies
        whole = limit is None or (source.entry is not None and bool(source.entry.num_samples))
        found: list = []
        for report, records in source_records(source):
            report["unfilled"] = [0, "", []]  # the records with {{placeholders}}: how many, the first, their names
            for rec in itertools.islice(records, None if whole else limit - len(samples) - len(found)):
                data, fmt = registered(rec, source, source.format, report)
                names = _placeholders(data)
                if names:
                    note(report, "unfilled", rec.where, names)
                found.append(to_sample(data, fmt, rec.where, report))
            for line in file_warnings(report) + _placeholder_warning(report) if warn else []:
                warn(line)
            if not whole and len(samples) + len(found) >= limit:
                break
        samples += [found[j] for j in pick_samples(source, len(found), seed + i)]
        if limit is not None and len(samples) >= limit:
            return samples[:limit]
    return samples


def _placeholders(value) -> set[str]:
    """The {{name}} placeholders in a record's texts (LLaMA-Factory's identity.json holds {{name}} and {{author}})."""
    from tunelab.data.sources import PLACEHOLDER

    if isinstance(value, str):
        return set(PLACEHOLDER.findall(value))
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return set().union(*map(_placeholders, items))


def _placeholder_warning(report: dict) -> list[str]:
    """The warning for a file's records read with their placeholders unfilled (training fills them from data_path's
    'placeholders'; these commands have none), with the command that writes the filled file."""
    from tunelab.data.reports import filled_name

    path, (count, where, names) = report["path"], report["unfilled"]
    if not count:
        return []
    shown = ", ".join("{{" + name + "}}" for name in names)
    return [f"{path}: {count} record(s) with {shown} (first at {where}), read as written: the model sees and is "
            f"compared with the placeholders. Fill them first: `tunelab data self-cognition --name NAME --author "
            f"AUTHOR --from {path} -o {filled_name(path)}`, and pass that file."]
