"""What reading the data found, and the warnings it turns into: one report per file (records read, formats
detected, invalid records, fields the format does not read, records dataset_map_fn dropped, samples with unfilled
``{{placeholders}}``, ``<image>`` placeholders without images or empty replies, preference pairs whose replies are
the same, and after encoding samples truncated and dropped) and one per source (records read, samples kept after its
ratio, files of its folder not read), and a SYSTEM that leaves no room for a reply within max_length (`system_fills`).
`tunelab.data.sources` fills them while reading; `file_warnings` and `source_warnings` give the lines `check-dataset`
and training print, so nothing a record carries is dropped without a word. Reports are plain data: they are cached
with the rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from tunelab.data.encode import token_ids
from tunelab.data.files import SUFFIXES_READ
from tunelab.data.messages import IMAGE_PLACEHOLDER, MULTIMODAL_FIX
from tunelab.data.preference import IMAGES_FIX
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.data.data_path import Source

MAX_FIELDS_SHOWN = 10
MAX_RECORDS_SHOWN = 5


def new_file_report(path: str, source: "Source") -> dict:
    """What reading one file found (plain data: it is cached with the rows)."""
    registry = source.path.rsplit(":", 1)[0] if source.entry is not None else source.path
    return {"path": path, "source": registry, "dataset": source.entry.name if source.entry else None, "records": 0,
            "formats": {}, "samples": 0, "invalid": 0, "unused": {}, "placeholders": [0, "", []], "filled": 0,
            "image_tags": [0, ""], "special_text": [0, "", []], "empty_replies": [0, []], "filtered": 0,
            "tied_pairs": [0, []], "empty_chosen": [0, []], "empty_rejected": [0, []], "empty_texts": [0, []], "left_out": 0,
            "truncated": 0, "dropped": 0, "untrained": 0}


def note(report: dict, key: str, where: str, names: Iterable[str] = ()) -> None:
    entry = report[key]
    entry[0] += 1
    entry[1] = entry[1] or where
    if len(entry) > 2:
        entry[2] = sorted(set(entry[2]) | set(names))


def note_record(report: dict, key: str, where: str) -> None:
    """Count one more sample under `key` and keep the first few records' places, for the warning to list."""
    entry = report[key]
    entry[0] += 1
    if len(entry[1]) < MAX_RECORDS_SHOWN:
        entry[1].append(where)


def count_unused(report: dict, name: str, where: str, hint: str) -> None:
    entry = report["unused"].setdefault(name, [0, where, hint])
    entry[0] += 1


def counted(count: int, word: str) -> str:
    """"1 step", "2 steps": a count and its noun, singular for one (the log and messages of every command)."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def filled_name(path: str) -> str:
    """Where the suggested `--from` command writes: beside the file, NAME_filled with its suffix (-o is required)."""
    stem, dot, suffix = path.rpartition(".")
    return f"{stem}_filled.{suffix}" if dot and "/" not in suffix else f"{path}_filled"


def file_warnings(report: dict) -> list[str]:
    """One line per thing in this file that is not trained as written, with what to do about it."""
    path, lines = report["path"], []
    unused = sorted(report["unused"].items(), key=lambda item: (-item[1][0], item[0]))
    for name, (count, where, hint) in unused[:MAX_FIELDS_SHOWN]:
        lines.append(f"{path}: field {name!r} not used ({counted(count, 'record')}, first at {where}): {hint}.")
    if len(unused) > MAX_FIELDS_SHOWN:
        rest = unused[MAX_FIELDS_SHOWN:]
        lines.append(f"{path}: {len(rest)} more fields not used ({', '.join(repr(n) for n, _ in rest[:5])}, ...; "
                     f"{sum(c for _, (c, _, _) in rest)} times in all).")
    count, where, names = report["placeholders"]
    if count:
        shown = ", ".join("{{" + n + "}}" for n in names)
        fill = ", ".join(f"'{n}': '...'" for n in names)
        lines.append(f"{path}: {counted(count, 'sample')} with {shown} (first at {where}), trained as written. "
                     f"Fill them: data_path = [{{'path': '{report['source']}', "
                     + (f"'dataset': '{report['dataset']}', " if report.get("dataset") else "")
                     + f"'placeholders': {{{fill}}}}}], or write "
                     f"filled data with `tunelab data self-cognition --name NAME --author AUTHOR --from {path} "
                     f"-o {filled_name(path)}`.")
    count, where = report["image_tags"]
    if count:  # (preference data cannot go to a multimodal run: it trains supervised data only)
        fix = IMAGES_FIX + "." if report.get("preference") else MULTIMODAL_FIX
        lines.append(f"{path}: {counted(count, 'sample')} with {IMAGE_PLACEHOLDER} but no image (first at {where}): "
                     f"the placeholder is trained as plain text. {fix}")
    count, where, names = report.get("special_text", [0, "", []])
    if count:
        shown = ", ".join(map(repr, names[:MAX_FIELDS_SHOWN]))
        verb = "holds" if count == 1 else "hold"
        lines.append(f"{path}: {counted(count, 'sample')} {verb} the text of the tokenizer's special tokens ({shown}; "
                     f"first at {where}): it becomes those tokens, so it can end a turn inside a reply or start a "
                     f"forged one. Rewrite it (e.g. '<|im_end |>') where it is quoted, not meant as markup.")
    for key, noun, what, why in NOTED_RECORDS:
        count, wheres = report.get(key, [0, []])
        if count:
            lines.append(f"{path}: {counted(count, noun)} {what} ({_shown(count, wheres)}): {why}")
    return lines


def _shown(count: int, wheres: list) -> str:
    return ", ".join(wheres) + (", ..." if count > len(wheres) else "")


NOTED_RECORDS = [
    # (the report's key, what it counts, what they are, what happens to them and the fix), as `note_record` counts
    ("empty_replies", "sample", "with an empty reply",
     "an empty reply is kept as context, not trained (it would teach the model to stop at once); a sample with no "
     "other reply is dropped (counted as without a trained reply). Write the reply, or delete it."),
    ("empty_texts", "record", "with an empty text",
     "left out, as training it (BOS then EOS) would teach the model to end a document at once. Write the text, or "
     "delete the record."),
    ("tied_pairs", "pair", "whose chosen and rejected reply are the same",
     "left out, as they teach nothing (the loss cannot prefer one reply to itself: DPO stays at ln 2, a reward model "
     "counts the tie as wrong). Give each pair a better and a worse reply, or delete them."),
    ("empty_chosen", "record", "with an empty chosen (desirable) reply",
     "left out, as training it would teach the model to stop at once (an empty supervised reply is not trained "
     "either). Write the reply, or delete the record."),
    ("empty_rejected", "record", "with an empty rejected (undesirable) reply",
     "trained as written, teaching the model not to stop at once. If the reply is missing rather than meant to be "
     "empty, write it or delete the record."),
]


def source_warnings(source: dict) -> list[str]:
    """What a data_path source leaves out as a whole: its folder's files of other types, a ratio that keeps none."""
    lines, path = [], source["path"]
    unread = source.get("unread", [])
    if unread:
        shown = ", ".join(unread[:MAX_FIELDS_SHOWN]) + (", ..." if len(unread) > MAX_FIELDS_SHOWN else "")
        lines.append(f"{path}: {counted(len(unread), 'file')} in the folder not read ({shown}): tunelab reads "
                     f"{SUFFIXES_READ}. Decompress or convert those that hold "
                     f"data (e.g. `gunzip x.jsonl.gz`), or move them out of the folder.")
    if source.get("read") and not source["samples"]:
        ratio = source["ratio"]
        lines.append(f"{path}: ratio {ratio:g} of its {counted(source['read'], 'sample')} rounds to no sample: it "
                     f"contributes nothing. Raise the ratio (at least {1 / source['read']:.3g} keeps one sample), "
                     f"or remove the source.")
    return lines


def system_fills(cfg, tokenizer, template, samples: list[dict]) -> str:
    """Where SYSTEM alone leaves no room for a reply within max_length (every sample that gets it is dropped): a
    sentence naming it and its tokens; "" otherwise (no SYSTEM, no sample starting with it, room left, or the
    template's markup fills max_length without it: max_length is the cause)."""
    if not cfg.SYSTEM or cfg.train_on == "all":  # (with train_on = 'all' the system prompt is trained: cut, kept)
        return ""
    asked = [{"role": "user", "content": ""}]
    try:
        texts = [template.render([{"role": "system", "content": cfg.SYSTEM}] + asked, add_generation_prompt=True),
                 template.render(asked, add_generation_prompt=True), cfg.SYSTEM]
    except TunelabError:  # a template that refuses a system prompt: the data trains without one
        return ""
    with_system, without, alone = (len(ids) for ids in token_ids(tokenizer, texts))
    if with_system < cfg.max_length or (without >= cfg.max_length and alone < cfg.max_length):
        return ""
    firsts = [(s.get("messages") or s.get("prompt") or [{}])[0] for s in samples]
    n = sum(1 for m in firsts if m.get("role") == "system" and m.get("content") == cfg.SYSTEM)
    if not n:
        return ""
    return (f"SYSTEM (the config's system prompt, given to the {n} sample{'s' if n != 1 else ''} that start"
            f"{'' if n != 1 else 's'} with it) is {alone} tokens, {with_system} with the template's markup and an "
            f"empty question, and max_length = {cfg.max_length}: no reply fits after it, so "
            f"{'they are' if n != 1 else 'it is'} dropped. Shorten SYSTEM, or raise max_length well above "
            f"{with_system}.")
