"""Look at data before training on it: `tunelab check-dataset` and `tunelab preview`.

check-dataset reads every record (bad ones are collected, not fatal), encodes them and prints counts, a histogram of
token lengths and how many samples max_length cuts or drops. preview renders a few samples with the tokens the model
is trained on marked: coloured in a terminal, between ⟦ and ⟧ otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Callable

import numpy as np

from tunelab.data.dataset import DataStats, build_datasets, read_samples, resolve_sources
from tunelab.data.encode import IGNORE_INDEX, encode_batch
from tunelab.data.packing import best_fit_rows
from tunelab.data.templates import get_template

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def length_histogram(lengths: np.ndarray, max_length: int, bins: int = 10, width: int = 40) -> list[str]:
    """Text bars of sample token lengths; buckets past max_length are flagged."""
    if len(lengths) == 0:
        return ["(no samples)"]
    top = int(max(lengths.max(), 1))
    edges = np.linspace(0, top, bins + 1).astype(int)
    edges[-1] = top + 1
    counts, _ = np.histogram(lengths, bins=edges)
    peak = max(counts.max(), 1)
    lines = []
    for lo, hi, count in zip(edges[:-1], edges[1:], counts):
        flag = "  > max_length, truncated" if lo >= max_length else ""
        lines.append(f"{lo:>7}-{hi - 1:<7} {'#' * round(width * count / peak):<{width}} {count}{flag}")
    return lines


def check_dataset(cfg, tokenizer, *, config_dir: str | None = None, out: Callable[[str], None] = print) -> DataStats:
    """Validate every record and report; returns the stats (stats.skipped_invalid > 0 means problems)."""
    checked = replace(cfg, skip_invalid=True, pack_to_max_length=False, eval_split_ratio=0.0)
    bundle = build_datasets(checked, tokenizer, config_dir=config_dir, log=lambda m: None, use_cache=False,
                            allow_empty=True)
    s = bundle.stats
    for src in s.sources:
        out(f"source {src['path']}: format {src['format'] or '?'}, {src['records']} records, "
            f"{src['samples']} samples used")
    out(f"records read:        {s.records_read}")
    out(f"invalid records:     {s.skipped_invalid}")
    for message in s.invalid:
        out(f"  - {message}")
    if s.skipped_invalid > len(s.invalid):
        out(f"  ... and {s.skipped_invalid - len(s.invalid)} more")
    out(f"samples:             {s.samples}")
    out(f"truncated:           {s.truncated} (longer than max_length={cfg.max_length})")
    out(f"dropped:             {s.dropped} (nothing left to train on after truncation)")
    out(f"tokens:              {s.tokens} ({s.trained_tokens} trained on)")
    lengths = bundle.sample_lengths
    if lengths is not None and len(lengths):
        out(f"token lengths: min {lengths.min()}, mean {lengths.mean():.0f}, max {lengths.max()}, "
            f"95th percentile {np.percentile(lengths, 95):.0f}")
        for line in length_histogram(lengths, cfg.max_length):
            out(line)
    if cfg.pack_to_max_length and len(bundle.train_rows):
        # the samples as training packs them (best fit), in file order: training shuffles first, which moves the
        # count by a row or so
        kept = bundle.train_rows.row_lengths()
        n_rows = len(best_fit_rows(kept.tolist(), cfg.max_length))
        out(f"packing: about {n_rows} rows of {cfg.max_length} tokens, {kept.sum() / (n_rows * cfg.max_length):.1%} "
            f"full")
    out("OK: every record is valid." if not s.skipped_invalid else
        f"{s.skipped_invalid} invalid records: fix them, or set skip_invalid = True to train without them.")
    return s


def marked_pieces(tokenizer, row: dict) -> list[tuple[str, bool]]:
    """The row's text as runs of (text, trained) following its labels."""
    pieces: list[tuple[str, bool]] = []
    ids, labels = row["input_ids"], row["labels"]
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            pieces.append((tokenizer.decode(ids[start:i], skip_special_tokens=False),
                           labels[start] != IGNORE_INDEX))
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
    for source in resolve_sources(cfg.data_path, cfg.data_format, config_dir):
        samples += read_samples(source, skip_invalid=cfg.skip_invalid, map_fn=cfg.dataset_map_fn, system=cfg.SYSTEM,
                                stats=stats, limit=n - len(samples))
        if len(samples) >= n:
            break
    shown = []
    console = None
    if color:
        from rich.console import Console

        console = Console(file=stream, highlight=False, force_terminal=True)
    for k, per_sample in enumerate(encode_batch(template, tokenizer, samples, cfg.max_length, cfg.train_on)):
        for encoded in per_sample[:1]:
            header = f"--- sample {k} ({encoded.full_length} tokens" + \
                     (", truncated" if encoded.truncated else "") + ")"
            if encoded.row is None:
                stream.write(f"{header}: dropped, nothing to train on within max_length={cfg.max_length}\n")
                continue
            pieces = marked_pieces(tokenizer, encoded.row)
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
