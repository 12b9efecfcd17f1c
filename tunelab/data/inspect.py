"""Look at data before training on it: `tunelab check-dataset` and `tunelab preview`.

check-dataset reads every record (bad ones are collected, not fatal) and prints, per file, the records read, formats
detected and everything not trained as written (fields not read, unfilled {{placeholders}}, <image> without an
image); with a tokenizer it also encodes them and prints token counts, a histogram of token lengths and how many
samples max_length cuts or drops, numbers that add up: the histogram counts the encoded samples, its buckets past
max_length hold the truncated plus the dropped. It fails (exit 1) on invalid records, and when no sample is left to
train (every one dropped by the cut, without a trained reply, or left out), where `tunelab train` would stop. preview
renders a few samples with the tokens the model is trained on marked: coloured in a terminal, between ⟦ and ⟧
otherwise.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from typing import Callable

import numpy as np

from tunelab.data.dataset import DataStats, build_datasets, encode_samples, row_length
from tunelab.data.encode import IGNORE_INDEX
from tunelab.data.encode_preference import CHOSEN, DESIRABLE, KL, REJECTED, UNDESIRABLE, kl_partner_problem
from tunelab.data.images import describe as describe_image
from tunelab.data.images import image_reading
from tunelab.data.multimodal import IMAGE_TOKEN, image_tokens
from tunelab.data.packing import best_fit_rows
from tunelab.data.reports import counted
from tunelab.data.data_path import resolve_sources
from tunelab.data.sources import collect_samples, read_source
from tunelab.data.templates import get_template, tool_support

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def length_histogram(lengths: np.ndarray, max_length: int, bins: int = 10, width: int = 40,
                     past: str = "cut") -> list[str]:
    """Text bars of sample token lengths (before truncation). max_length is a bucket edge, so the flagged buckets
    hold exactly the samples longer than max_length; `past` says what happened to those (`past_max_length`)."""
    if len(lengths) == 0:
        return ["(no samples)"]
    low, top = int(lengths.min()), int(lengths.max())
    inside = np.unique(np.linspace(min(low, max_length), min(top, max_length) + 1, bins + 1).astype(int))
    edges = [int(e) for e in inside[:-1]] + [min(top, max_length) + 1]
    if top > max_length:  # a few buckets for the samples that get cut
        above = np.unique(np.linspace(max_length + 1, top + 1, max(2, bins // 3) + 1).astype(int))
        edges += [int(e) for e in above[1:]]
    counts, _ = np.histogram(lengths, bins=np.array(edges))
    peak = max(counts.max(), 1)
    lines = []
    for lo, hi, count in zip(edges[:-1], edges[1:], counts):
        flag = f"  > max_length, {past}" if lo > max_length else ""
        lines.append(f"{lo:>7}-{hi - 1:<7} {'#' * round(width * count / peak):<{width}} {count}{flag}")
    return lines


def past_max_length(stats: DataStats) -> str:
    """What happened to the samples longer than max_length: cut there (a trained token left), dropped (none left), or
    some of each (the histogram cannot tell which, bucket by bucket: that depends on where the replies start)."""
    return "cut" if not stats.dropped else "dropped" if not stats.truncated else "cut or dropped"


def _report_files(stats: DataStats, out: Callable[[str], None]) -> None:
    for report in stats.files:
        formats = ", ".join(f"{fmt} ({n})" for fmt, n in report["formats"].items()) or "?"
        out(f"file {report['path']}: records {report['records']}, format {formats}, invalid {report['invalid']}, "
            + (f"dropped by dataset_map_fn {report['filtered']}, " if report.get("filtered") else "")
            + (f"left out {report['left_out']} (see the warnings), " if report.get("left_out") else "")
            + f"samples used {report['samples']}" + (f", {report['filled']} with placeholders filled"
                                                      if report["filled"] else ""))
        if report["truncated"] or report["dropped"] or report["untrained"]:
            out(f"  {report['truncated']} truncated, {report['dropped']} dropped after truncation, "
                f"{report['untrained']} without a trained reply")
    for source in stats.sources:
        if len(stats.sources) > 1:
            out(f"source {source['path']}: records {source['records']}, samples used {source['samples']}")


def check_dataset(cfg, tokenizer=None, *, config_dir: str | None = None, out: Callable[[str], None] = print
                  ) -> DataStats:
    """Validate every record and report; returns the stats (stats.skipped_invalid > 0 means problems).

    Without a tokenizer only the records are checked (formats, fields, counts); with one, the samples are also
    encoded and their token lengths reported.
    """
    checked = replace(cfg, skip_invalid=True, pack_to_max_length=False, eval_split_ratio=0.0)
    if tokenizer is None:
        stats = DataStats()
        tools = None if cfg.prompt_template == "hf" else tool_support(get_template(cfg.prompt_template))
        samples, _ = collect_samples(checked, stats, config_dir=config_dir, allow_empty=True, tools=tools)
        if cfg.objective == "kto":  # refused as training refuses it, as the verdict after the records' problems
            stats.kl_problem = kl_partner_problem(samples)
        stats.samples = 0 if stats.kl_problem else len(samples)
        bundle = None
    else:
        bundle = build_datasets(checked, tokenizer, config_dir=config_dir, log=lambda m: None, use_cache=False,
                                allow_empty=True)
        stats = bundle.stats
    s = stats
    _report_files(s, out)
    out(f"records read:        {s.records_read}")
    out(f"invalid records:     {s.skipped_invalid}")
    for message in s.invalid:
        out(f"  - {message}")
    if s.skipped_invalid > len(s.invalid):
        out(f"  ... and {s.skipped_invalid - len(s.invalid)} more")
    if s.filtered:
        out(f"dropped by dataset_map_fn: {s.filtered} (it returned None)")
    if s.left_out:
        out(f"left out:            {s.left_out} (the same chosen and rejected reply, an empty chosen one, or an "
            f"empty text: see the warnings)")
    warnings = s.warnings(checked)
    out(f"warnings:            {len(warnings)}")
    for line in warnings:
        out(f"  - {line}")
    if bundle is None:
        out(f"samples:             {s.samples} (pass --tokenizer DIR for token lengths and truncation)")
    else:
        _report_tokens(cfg, bundle, out)
    if s.skipped_invalid:
        out(f"{s.skipped_invalid} invalid records: fix them, or set skip_invalid = True to train without them.")
    if not s.samples:
        out(f"Nothing will train: {s.kl_problem}" if s.kl_problem else nothing_to_train(cfg, s, bundle is not None))
    elif not s.skipped_invalid:
        out("OK: every record is valid" + (f"; read the {len(warnings)} warnings above." if warnings else "."))
    return s


def nothing_to_train(cfg, s: DataStats, encoded: bool) -> str:
    """check-dataset's verdict when no sample is left for training (`tunelab train` would stop)."""
    if encoded and s.encoded:
        return (f"Nothing will train: none of the {s.encoded} encoded samples is left (max_length={cfg.max_length}: "
                f"{s.dropped} dropped after the cut, {s.untrained} without a trained reply), so `tunelab train` would "
                f"stop. " + " ".join(fix for n, fix in (
                    (s.dropped, s.system_fills or "Raise max_length (see the token lengths above), or shorten the "
                                                   "prompts."),
                    (s.untrained, "Give the samples replies that are trained on (not empty, not marked as "
                                  "context).")) if n))
    return ("Nothing will train: no record is usable (see the counts and warnings above), so `tunelab train` would "
            "stop. Fix the records.")


def _report_tokens(cfg, bundle, out: Callable[[str], None]) -> None:
    s, lengths = bundle.stats, bundle.sample_lengths
    unit = "" if cfg.objective == "sft" else " (a pair or KTO sample counts once, its longer sequence's length)"
    out(f"samples:             {s.encoded} encoded, {s.samples} kept for training{unit}")
    out(f"longer than max_length={cfg.max_length}: {s.truncated + s.dropped} ({s.truncated} cut there, "
        f"{s.dropped} dropped: nothing left to train on after the cut)")
    if s.split_texts:
        out(f"texts longer than max_length={cfg.max_length}: {s.split_texts}, split into {s.text_pieces} samples "
            f"(nothing cut)")
    out(f"without a trained reply: {s.untrained} (dropped: every reply is context only, or empty)")
    out(f"tokens:              {s.tokens_before_truncation} in the encoded samples, {s.tokens} in the kept samples "
        f"after truncation, {s.trained_tokens} of them trained on")
    if lengths is not None and len(lengths):
        out(f"token lengths before truncation ({len(lengths)} samples): min {lengths.min()}, mean "
            f"{lengths.mean():.0f}, max {lengths.max()}, 95th percentile {np.percentile(lengths, 95):.0f}")
        for line in length_histogram(lengths, cfg.max_length, past=past_max_length(s)):
            out(line)
    if cfg.pack_to_max_length and len(bundle.train_rows):
        # the samples as training packs them (best fit), in file order: training shuffles first, which moves the
        # count by a row or so
        kept, width = bundle.train_rows.row_lengths(), row_length(cfg)  # a preference row holds a pair
        n_rows = len(best_fit_rows(kept.tolist(), width))
        out(f"packing: about {counted(n_rows, 'row')} of {width} tokens, {kept.sum() / (n_rows * width):.1%} full")


SEQUENCE_NAMES = {CHOSEN: "chosen", REJECTED: "rejected", DESIRABLE: "desirable", UNDESIRABLE: "undesirable",
                  KL: "KL estimate: the prompt with another sample's reply, scored without gradient, not trained"}


def sequence_pieces(tokenizer, row: dict) -> list[tuple[str, bool]]:
    """`marked_pieces` of a row; of a pair or KTO unit, each sequence's after a line naming it, a KL sequence's
    reply unmarked: its labels only pick the tokens KTO's KL estimate scores, and no gradient flows from them."""
    if "sequence_kind" not in row:
        return marked_pieces(tokenizer, row)
    pos = row["position_ids"]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    out: list[tuple[str, bool]] = []
    for kind, a, b in zip(row["sequence_kind"], starts, starts[1:]):
        labels = row["labels"][a:b] if kind != KL else [IGNORE_INDEX] * (b - a)
        out += [(f"[{SEQUENCE_NAMES[kind]}]\n", False), *marked_pieces(tokenizer, {"input_ids": row["input_ids"][a:b],
                                                                                "labels": labels}), ("\n", False)]
    return out


def marked_pieces(tokenizer, row: dict) -> list[tuple[str, bool]]:
    """The row's text as runs of (text, trained) following its labels."""
    pieces: list[tuple[str, bool]] = []
    ids, labels = row["input_ids"], row["labels"]
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            # an image's tokens (hundreds of <image>) shown as one mark with their count
            text = re.sub(f"(?:{re.escape(IMAGE_TOKEN)})+", lambda m: f"<image x{len(m.group(0)) // len(IMAGE_TOKEN)}>",
                          text)
            pieces.append((text, labels[start] != IGNORE_INDEX))
            start = i
    return pieces


def preview(cfg, tokenizer, n: int = 3, *, config_dir: str | None = None, color: bool | None = None,
            stream=None) -> list[list[tuple[str, bool]]]:
    """Print the first n samples as the model sees them, trained-on text marked. Returns the marked pieces."""
    stream = stream or sys.stdout
    color = stream.isatty() if color is None else color
    template = get_template(cfg.prompt_template, tokenizer)
    samples: list[dict] = []
    stats = DataStats()
    images = image_reading(cfg, config_dir)  # a LLaVA config: its samples' images are read too
    tokens = image_tokens(cfg, tokenizer)
    tools = tool_support(template)  # a probe rendering: once, not per source
    wanted = n + 1 if cfg.objective == "kto" else n  # one more: the last shown sample's KL partner
    for source in resolve_sources(cfg.data_path, cfg.data_format, config_dir, cfg.objective,
                                  multimodal=images is not None):
        samples += read_source(source, skip_invalid=cfg.skip_invalid, map_fn=cfg.dataset_map_fn, system=cfg.SYSTEM,
                               stats=stats, limit=wanted - len(samples), objective=cfg.objective, images=images,
                               tools=tools)[0]
        if len(samples) >= wanted:
            break
    shown = []
    console = None
    if color:
        from rich.console import Console

        console = Console(file=stream, highlight=False, force_terminal=True)
    encoded_samples = encode_samples(template, tokenizer, samples, cfg.max_length, cfg.train_on, tokens=tokens)
    for k, per_sample in enumerate(encoded_samples[:n]):
        for encoded in per_sample[:2 if cfg.objective == "kto" else 1]:  # a pair read for KTO: both its halves
            header = f"--- sample {k} ({encoded.full_length} tokens" + \
                     (", truncated" if encoded.truncated else "") + ")"
            if encoded.row is not None and encoded.row.get("images"):
                header += " images: " + ", ".join(describe_image(ref) for ref in encoded.row["images"])
            if encoded.row is None:
                stream.write(f"{header}: dropped, nothing to train on within max_length={cfg.max_length}\n")
                continue
            pieces = sequence_pieces(tokenizer, encoded.row)
            shown.append(pieces)
            if console is not None:
                from rich.text import Text

                text = Text(header + " trained-on text in green\n", style="bold")
                for piece, trained in pieces:
                    text.append(piece, style="bold green" if trained else "dim")
                console.print(text)
            else:
                stream.write(header + f", trained-on text between {TRAINED_OPEN} {TRAINED_CLOSE}\n")
                stream.write("".join(f"{TRAINED_OPEN}{p}{TRAINED_CLOSE}" if t else p for p, t in pieces) + "\n")
    return shown
