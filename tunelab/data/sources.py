"""Reading the sources of `data_path` (`tunelab.data.data_path`) into canonical samples, with a report per file.

    samples, origins = collect_samples(cfg, stats, config_dir=...)   # origins[i]: index of samples[i]'s file report

Reading fills a report per file and one per source (`tunelab.data.reports`), which `check-dataset` and training
turn into warnings, so nothing a record carries is dropped without a word.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional

from tunelab.data import dataset_info
from tunelab.data.data_path import Source, resolve_sources
from tunelab.data.files import InvalidRecord, Record, data_files, read_records
from tunelab.data.formats import FORMATS, UNUSED_HINTS, detect_format, normalise, unused_fields
from tunelab.data.images import ImageReading, image_reading, is_image_file, read_images, unreadable_samples
from tunelab.data.messages import IMAGE_PLACEHOLDER, LONE_SURROGATE, refuse_lone_surrogates, with_default_system
from tunelab.data.template_fit import check_tools
from tunelab.data.templates import ToolSupport
from tunelab.data.reports import count_unused, new_file_report, note, note_record
from tunelab.data.preference import not_supervised_error, read_for_objective, record_kind, sample_messages
from tunelab.data.preference_fields import SWITCH_HINTS, fields_read, unused_preference_fields
from tunelab.errors import TunelabError

MAX_REPORTED_INVALID = 20
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class LeftOut(Exception):
    """A record read and not trained, counted in its file's report with the reason (a preference pair whose replies
    are the same, or whose chosen reply is empty; an empty pretraining text): `read_source` counts it and goes on."""


def _raw_records(source: Source) -> tuple[list[tuple[str, object]], list[Path]]:
    """[(name, records)] per file (files) or one entry (a `datasets` dataset), and the files of a data folder that
    are not read."""
    if source.kind == "files":
        files, others = data_files(source.resolved)
        return [(str(f), f) for f in files], others
    import datasets

    entry = source.entry
    try:
        if source.kind == "disk":
            ds = datasets.load_from_disk(str(source.resolved))
        elif entry is not None:
            ds = datasets.load_dataset(entry.location, name=entry.subset, data_dir=entry.folder, split=entry.split)
        else:
            ds = datasets.load_dataset(source.path)
    except Exception as exc:  # offline, missing dataset, damaged folder: all are the user's to fix
        raise TunelabError(f"data_path {source.path!r}: the `datasets` library could not load it ({exc}). "
                           f"Check the name, or download it first and point data_path at the folder.")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return [(source.path, ds)], []


def _iter_records(name: str, origin, skip_invalid: bool, on_skip, on_unused) -> Iterable[Record]:
    if isinstance(origin, Path):
        yield from read_records(origin, skip_invalid=skip_invalid, on_skip=on_skip, on_unused=on_unused)
    else:
        for i, rec in enumerate(origin):
            yield Record(rec, f"{name} row {i}")


# --- reading and reporting ------------------------------------------------------------------------

def source_records(source: Source) -> Iterable[tuple[dict, Iterable[Record]]]:
    """(a new report, its records) per file of a source, a bad record stopping the reading: for a reader of its own
    (`eval_data.read_samples`: `tunelab reward`, `tunelab predict`), which maps each record with `registered` as
    `read_source` (training's) does."""
    for name, origin in _raw_records(source)[0]:
        report = new_file_report(name, source)
        yield report, _iter_records(name, origin, False, None, partial(count_unused, report))


def registered(rec: Record, source: Source, fmt: str, report: dict) -> tuple[object, str]:
    """A raw record in the fields its source reads, and its format: a dataset_info.json entry's columns and tags
    mapped to tunelab's field names and the entry's format (the fields the entry does not map counted as not used,
    as LLaMA-Factory does not read them either); any other source's record and `fmt` as they are. Every reader of
    records (training, check-dataset, preview, `tunelab reward`, `tunelab predict`) goes through it."""
    if source.entry is None:
        return rec.data, fmt
    data, fmt, unmapped = dataset_info.map_record(rec.data, source.entry, rec.where)
    for name in unmapped:
        count_unused(report, name, rec.where, f"not mapped by dataset {source.entry.name!r} of its "
                      f"dataset_info.json (LLaMA-Factory does not read it either): add it to 'columns' or drop it")
    return data, fmt


def read_record(rec: Record, source: Source, fmt: str, map_fn: Optional[Callable], report: dict,
                objective: str = "sft", images: Optional[ImageReading] = None, base_dir: Optional[Path] = None,
                special: Optional[re.Pattern] = None, tools: Optional[ToolSupport] = None
                ) -> tuple[Optional[dict], str]:
    """One raw record -> (its canonical sample or None when the map function drops it, the format read).

    objective 'sft' reads supervised samples and refuses preference data; the preference objectives read pairs or
    KTO samples (tunelab.data.preference.read_for_objective). images: how a multimodal run reads images (the sample
    then has "images", resolved references, and "where"); None in a text-only run, which refuses them.
    base_dir: the data file's folder. special: the tokenizer's special tokens as text (`special_text_pattern`),
    noted where a sample holds them. tools: what the run's template does with tools (`templates.tool_support`): a
    tool call it cannot write is an invalid record, tool definitions it has no place for a field not used."""
    data, fmt = registered(rec, source, fmt, report)
    if map_fn is not None:
        try:
            data = map_fn(dict(data) if isinstance(data, dict) else data)
        except Exception as exc:
            raise InvalidRecord(f"{rec.where}: dataset_map_fn raised {type(exc).__name__}: {exc}. "
                                f"Fix the function in your config, or the record.")
        if data is None:  # the map function filtered the record out (counted by the caller)
            return None, fmt
        if not isinstance(data, dict):
            raise InvalidRecord(f"{rec.where}: dataset_map_fn must return a dict (a record) or None, got "
                                f"{type(data).__name__}. Fix the function in your config.")
    kind = record_kind(data)
    if objective != "sft":
        sample = read_for_objective(data, objective, rec.where)
        report["preference"] = True  # its warnings' fixes are for a preference run
        if source.entry is None:
            read = fields_read(data)  # (for a KTO record, a format detected: once)
            shape = ", ".join(map(repr, sorted(read)))
            for name in unused_preference_fields(data, read):
                last = name.split(".")[-1]
                count_unused(report, name, rec.where, UNUSED_HINTS.get(last) or SWITCH_HINTS.get(last, (
                    f"a record of this shape is read from {shape}: drop it, or map it in with dataset_map_fn if it "
                    f"should be trained")))
        _after_reading(sample, source, report, rec.where, images is not None, special, tools)
        _check_replies(sample, report, rec.where)
        return sample, "kto" if "completion" in sample or sample.get("unpaired") else "preference"
    if kind:
        raise not_supervised_error(kind, rec.where, data, multimodal=images is not None)
    if fmt == "auto":
        fmt = detect_format(data)
        if fmt is None:
            keys = ", ".join(map(repr, data)) if isinstance(data, dict) else type(data).__name__
            raise InvalidRecord(
                f"{rec.where}: cannot tell the data format from this record (fields: {keys}). Set data_format to "
                f"one of {', '.join(FORMATS)}, rename the fields, or convert records with dataset_map_fn. See "
                f"docs/DATA.md for an example of each format.")
    sample = normalise(data, fmt, rec.where) if images is None else read_images(data, fmt, rec.where, images, base_dir)
    if source.entry is None:
        for name in unused_fields(data, fmt):
            hint = UNUSED_HINTS.get(name.split(".")[-1], f"the {fmt!r} format does not read it: drop it, or map it "
                                    f"into the record with dataset_map_fn if it should be trained")
            count_unused(report, name, rec.where, hint)
    if "text" in sample and not sample["text"].strip():  # BOS -> EOS would teach a document that ends at once
        note_record(report, "empty_texts", rec.where)
        raise LeftOut
    _untrain_empty_replies(sample, report, rec.where)
    _after_reading(sample, source, report, rec.where, images is not None, special, tools)
    return sample, fmt


def _after_reading(sample: dict, source: Source, report: dict, where: str, multimodal: bool = False,
                   special: Optional[re.Pattern] = None, tools: Optional[ToolSupport] = None) -> None:
    """Fill {{placeholders}}, note <image> tags without images (a text run's) and special tokens' text, refuse tool
    calls the template cannot write."""
    if tools is not None:
        check_tools(sample, tools, report, where)
    texts = "\n".join(_texts(sample))  # one look for every kind of placeholder
    if LONE_SURROGATE.search(texts):
        refuse_lone_surrogates(sample, where)
    if "{{" in texts:
        _fill_placeholders(sample, source.placeholders, report, where)
        texts = "\n".join(_texts(sample))
    if IMAGE_PLACEHOLDER in texts and not multimodal:
        note(report, "image_tags", where)
    if special is not None:
        found = set(special.findall(texts))
        if found:
            note(report, "special_text", where, found)


def special_text_pattern(tokenizer) -> Optional[re.Pattern]:
    """The tokenizer's special tokens (<|im_start|>, </s>, ...) as one pattern. The tokenizer turns their text in
    the data into those control tokens, so a reply quoting '<|im_end|>' ends its turn there. <image> is left out:
    in a multimodal run it is the placeholder the data is meant to hold."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if getattr(t, "special", False)}
    names = sorted((n for n in names if n and n != IMAGE_PLACEHOLDER), key=len, reverse=True)  # longest first
    return re.compile("|".join(map(re.escape, names))) if names else None


def _untrain_empty_replies(sample: dict, report: dict, where: str) -> None:
    """An empty reply (no text, no tool call, no reasoning) would train the model to stop at once: it stays in the
    conversation as context, not trained, and is reported. A sample with no other reply then has nothing to train
    and is dropped, counted as 'without a trained reply'."""
    empty = [m for m in sample.get("messages", []) if m["role"] == "assistant" and m.get("train", True) and _empty(m)]
    for m in empty:
        m["train"] = False
    if empty:
        note_record(report, "empty_replies", where)


def _empty(message: dict) -> bool:
    """A reply with no text, no tool call and no reasoning."""
    return not (message.get("content") or "").strip() and not message.get("tool_calls") \
        and not message.get("reasoning_content")


def _check_replies(sample: dict, report: dict, where: str) -> None:
    """A pair whose chosen and rejected reply are the same teaches nothing, and an empty chosen (or desirable KTO)
    reply would teach the model to stop at once: both are left out (`LeftOut`) and reported. An empty rejected (or
    undesirable) reply can be a deliberate negative: it is trained, and reported."""
    if "chosen" in sample:
        good, bad = (_strip_train(sample[k]) for k in ("chosen", "rejected"))
        if good == bad:
            note_record(report, "tied_pairs", where)
            raise LeftOut
    else:
        good, bad = (sample["completion"], None) if sample["label"] else (None, sample["completion"])
    if good is not None and _empty(good):
        note_record(report, "empty_chosen", where)
        raise LeftOut
    if bad is not None and _empty(bad):
        note_record(report, "empty_rejected", where)


def _strip_train(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "train"}


def _messages(sample: dict) -> list[dict]:
    return sample["messages"] if "messages" in sample else sample_messages(sample)


def _texts(sample: dict) -> list[str]:
    if "text" in sample:
        return [sample["text"]]
    return [m[k] for m in _messages(sample) for k in ("content", "reasoning_content") if k in m]


def _fill_placeholders(sample: dict, values: dict, report: dict, where: str) -> None:
    """{{name}} -> values['name'] in every text of the sample; placeholders left over are counted."""
    def fill(text: str) -> str:
        return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)

    if values and any(PLACEHOLDER.search(t) for t in _texts(sample)):
        report["filled"] += 1
        if "text" in sample:
            sample["text"] = fill(sample["text"])
        for m in [] if "text" in sample else _messages(sample):
            for key in ("content", "reasoning_content"):
                if key in m:
                    m[key] = fill(m[key])
    left = {name for text in _texts(sample) for name in PLACEHOLDER.findall(text)}
    if left:
        note(report, "placeholders", where, left)


def read_source(source: Source, *, skip_invalid: bool, map_fn: Optional[Callable], system: str, stats,
                limit: Optional[int] = None, objective: str = "sft", images: Optional[ImageReading] = None,
                special: Optional[re.Pattern] = None, tools: Optional[ToolSupport] = None
                ) -> tuple[list[dict], list[int]]:
    """All samples of one source and, for each, the index of its file's report in stats.files."""
    samples: list[dict] = []
    origins: list[int] = []
    read_before = stats.records_read
    formats_seen: Counter = Counter()
    raw, unread = _raw_records(source)
    for name, origin in raw:
        report = new_file_report(name, source)
        stats.files.append(report)
        file_id = len(stats.files) - 1
        fmt = source.format

        def skip(message: str) -> None:
            stats.skipped_invalid += 1
            report["invalid"] += 1
            if len(stats.invalid) < MAX_REPORTED_INVALID:
                stats.invalid.append(message)

        def unreadable(message: str) -> None:  # a line that is not even JSON still counts as a record read
            stats.records_read += 1
            report["records"] += 1
            skip(message)

        def beside(key: str, where: str, hint: str) -> None:  # a wrapper object's keys beside its records
            count_unused(report, key, where, hint)

        for rec in _iter_records(name, origin, skip_invalid, unreadable, beside):
            stats.records_read += 1
            report["records"] += 1
            try:
                sample, read_as = read_record(rec, source, fmt, map_fn, report, objective, images,
                                              origin.parent if isinstance(origin, Path) else None, special, tools)
            except InvalidRecord as exc:
                if not skip_invalid:
                    raise
                skip(str(exc))
                continue
            except LeftOut:  # reported in the file's warnings
                stats.left_out += 1
                report["left_out"] += 1
                continue
            if sample is None:  # dataset_map_fn returned None: counted, so the numbers add up
                stats.filtered += 1
                report["filtered"] += 1
                continue
            if fmt == "auto" and source.entry is None:
                fmt = read_as  # 'auto' decides per file from its first record; the rest must agree
            label = read_as + (" (pretraining text)" if "text" in sample and read_as != "text" else "")
            report["formats"][label] = report["formats"].get(label, 0) + 1
            formats_seen[read_as] += 1
            with_default_system(sample.get("messages", sample.get("prompt")), system)
            samples.append(sample)
            origins.append(file_id)
            if limit is not None and len(samples) >= limit:
                break
        if limit is not None and len(samples) >= limit:
            break
    if images is not None:
        samples, origins = _drop_unreadable_images(samples, origins, stats, skip_invalid)
    if source.entry is not None:  # its dataset_info.json names its files
        unread = []
    elif images is not None:  # a multimodal run reads the images its records name
        unread = [p for p in unread if not is_image_file(p)]
    stats.sources.append({"path": source.path, "format": ",".join(sorted(formats_seen)),
                          "records": stats.records_read - read_before, "samples": len(samples),
                          "ratio": source.ratio, "read": len(samples),
                          "unread": [str(p.relative_to(source.resolved)) for p in unread]})
    return samples, origins


def _drop_unreadable_images(samples: list[dict], origins: list[int], stats, skip_invalid: bool
                            ) -> tuple[list[dict], list[int]]:
    """Samples with an image that cannot be read stop the run naming their record, or are skipped and counted."""
    bad = unreadable_samples(samples)
    for i, message in bad.items():
        if not skip_invalid:
            raise TunelabError(message)
        stats.skipped_invalid += 1
        stats.files[origins[i]]["invalid"] += 1
        if len(stats.invalid) < MAX_REPORTED_INVALID:
            stats.invalid.append(message)
    keep = [i for i in range(len(samples)) if i not in bad]
    return [samples[i] for i in keep], [origins[i] for i in keep]


def apply_ratio(items: list, ratio: float, rng: random.Random) -> list:
    """ratio 1 keeps every item once; 0.5 a random half; 2.5 every item twice plus a random half."""
    whole, part = int(ratio), ratio - int(ratio)
    return items * whole + rng.sample(items, round(part * len(items)))


def pick_samples(source: Source, count: int, seed: int) -> list[int]:
    """Which of a source's `count` samples are used (an index may repeat), drawn with `seed`: its data_path ratio,
    times LLaMA-Factory's num_samples of a dataset_info.json entry (that many samples of the dataset). Training and
    `tunelab reward` / `tunelab predict` pick alike."""
    ratio = source.ratio
    asked, lower = f"ratio {source.ratio:g}", "the ratio (2 trains each sample twice an epoch)"
    if source.entry is not None and source.entry.num_samples and count:
        ratio *= source.entry.num_samples / count
        asked += f" with num_samples {source.entry.num_samples} of dataset {source.entry.name!r}"
        lower = "num_samples or the ratio"
    if ratio > MAX_REPEATS:  # each copy is a list entry: a huge ratio would fill memory (or overflow) before an error
        raise TunelabError(f"{source.path}: {asked} repeats each of its {count} samples {ratio:.3g} times; a source "
                           f"repeats its samples at most {MAX_REPEATS} times. Lower {lower}.")
    return apply_ratio(list(range(count)), ratio, random.Random(seed))


MAX_REPEATS = 10_000
"""The most times a data_path ratio (times num_samples) may repeat a source's samples: far past any real mix."""


def collect_samples(cfg, stats, *, config_dir: str | None = None, allow_empty: bool = False,
                    special: Optional[re.Pattern] = None, tools: Optional[ToolSupport] = None
                    ) -> tuple[list[dict], list[int]]:
    """Every source of cfg.data_path read, checked and mixed by its ratio: (samples, file index of each).
    special, tools: see `read_record`."""
    samples: list[dict] = []
    origins: list[int] = []
    images = image_reading(cfg, config_dir)
    for i, source in enumerate(resolve_sources(cfg.data_path, cfg.data_format, config_dir, cfg.objective,
                                               multimodal=images is not None)):
        before = (stats.skipped_invalid, stats.filtered, stats.left_out)
        found, where_from = read_source(source, skip_invalid=cfg.skip_invalid, map_fn=cfg.dataset_map_fn,
                                        system=cfg.SYSTEM, stats=stats, objective=cfg.objective, images=images,
                                        special=special, tools=tools)
        if not found and not allow_empty:
            invalid, filtered, left_out = (n - b for n, b in zip((stats.skipped_invalid, stats.filtered,
                                                                   stats.left_out), before))
            why = ", ".join(f"{n} {what}" for n, what in ((invalid, "invalid"), (filtered, "dropped by "
                            "dataset_map_fn"), (left_out, "left out (the same chosen and "
                            "rejected reply, or an empty chosen one)" if cfg.objective != "sft" else "left out (an "
                            "empty text)")) if n)
            raise TunelabError(f"data_path {source.path!r}: no usable record (of its {stats.sources[-1]['records']}: "
                               f"{why or 'none'}). Run `tunelab check-dataset` to see why.")
        chosen = pick_samples(source, len(found), cfg.seed + i)
        stats.sources[-1]["samples"] = len(chosen)
        for j in chosen:
            samples.append(found[j])
            origins.append(where_from[j])
            stats.files[where_from[j]]["samples"] += 1
    return samples, origins

