"""Rows kept as flat arrays on disk, and packing samples into rows of max_length.

`TokenRows` is what the training loop gets: ``len(rows)`` and ``rows[i] -> {"input_ids", "labels",
"position_ids"}`` (lists of int). It stores every row end to end in three int32 arrays plus row offsets, saved as
.npy files and memory-mapped on load, so a cached dataset of millions of tokens opens at once. Preference rows
also list the kind of each of their sequences (``"sequence_kind"``, tunelab.data.encode_preference), kept the same
way with offsets of their own; multimodal rows their images (``"images"``: references in the order of their image
tokens), kept as a JSON list beside them.

Packing concatenates whole samples into rows of at most max_length tokens, each into the row it fills most tightly
(`best_fit_rows`). Position ids restart at 0 at each sample: that is how sample boundaries travel to attention
(docs/DESIGN.md, Rows). A sample is never split.
"""

from __future__ import annotations

import bisect
import itertools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from tunelab.data.encode import IGNORE_INDEX

_KEYS = ("input_ids", "labels", "position_ids")


class TokenRows:
    """A read-only sequence of rows backed by flat arrays (see module docstring)."""

    def __init__(self, arrays: dict[str, np.ndarray], offsets: np.ndarray,
                 kinds: tuple[np.ndarray, np.ndarray] | None = None, images: list[list[str]] | None = None):
        self.arrays, self.offsets = arrays, offsets
        self.kinds = kinds
        """(kind of every sequence end to end, offsets per row), for preference rows; None otherwise."""
        self.images = images
        """Each row's image references, for multimodal rows; None otherwise."""

    @classmethod
    def from_rows(cls, rows: Sequence[dict]) -> "TokenRows":
        lengths = np.fromiter((len(r["input_ids"]) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        arrays = {k: np.fromiter(itertools.chain.from_iterable(r[k] for r in rows), dtype=np.int32, count=total)
                  for k in _KEYS}
        kinds = None
        if rows and "sequence_kind" in rows[0]:
            counts = np.fromiter((len(r["sequence_kind"]) for r in rows), dtype=np.int64, count=len(rows))
            kind_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(counts, out=kind_offsets[1:])
            kinds = (np.fromiter(itertools.chain.from_iterable(r["sequence_kind"] for r in rows), dtype=np.int8,
                                 count=int(kind_offsets[-1])), kind_offsets)
        images = [list(r.get("images", ())) for r in rows] if any("images" in r for r in rows) else None
        return cls(arrays, offsets, kinds, images)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        row = {k: self.arrays[k][a:b].tolist() for k in _KEYS}
        if self.kinds is not None:
            kinds, kind_offsets = self.kinds
            row["sequence_kind"] = kinds[int(kind_offsets[i]):int(kind_offsets[i + 1])].tolist()
        if self.images is not None:
            row["images"] = self.images[i]
        return row

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def row_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_trained_tokens(self) -> int:
        return int((self.arrays["labels"] != IGNORE_INDEX).sum())

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for k in _KEYS:
            np.save(directory / f"{k}.npy", self.arrays[k])
        np.save(directory / "offsets.npy", self.offsets)
        if self.kinds is not None:
            np.save(directory / "sequence_kind.npy", self.kinds[0])
            np.save(directory / "sequence_offsets.npy", self.kinds[1])
        if self.images is not None:
            (directory / "images.json").write_text(json.dumps(self.images))

    @classmethod
    def load(cls, directory: Path) -> "TokenRows":
        arrays = {k: np.load(directory / f"{k}.npy", mmap_mode="r") for k in _KEYS}
        kinds = None
        if (directory / "sequence_kind.npy").exists():
            kinds = (np.load(directory / "sequence_kind.npy"), np.load(directory / "sequence_offsets.npy"))
        images_file = directory / "images.json"
        images = json.loads(images_file.read_text()) if images_file.is_file() else None
        return cls(arrays, np.load(directory / "offsets.npy"), kinds, images)


def pack_rows(samples: Sequence[dict], max_length: int) -> list[dict]:
    """Concatenate whole samples into rows of at most max_length tokens, as `best_fit_rows` groups them."""
    groups = best_fit_rows([len(s["input_ids"]) for s in samples], max_length)
    keys = _KEYS + (("sequence_kind",) if samples and "sequence_kind" in samples[0] else ()) + \
        (("images",) if any("images" in s for s in samples) else ())
    return [{k: list(itertools.chain.from_iterable(samples[i].get(k, ()) for i in group)) for k in keys}
            for group in groups]


def best_fit_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Which samples share a row: each sample, in the given order, goes into the open row it fills most tightly (the
    least room that still holds it), or starts a new row. Returns each row's sample indices.

    Filling one row at a time and closing it when the next sample does not fit leaves about half a sample empty at
    the end of every row: ~10% of a 2048-token row for instruction data of ~350 tokens, ~25% when samples run up to
    max_length. Best fit fills such rows 97-99% (benchmarks/bench_data.py), so a step trains that many more real
    tokens for the same compute. Rows are listed in the order they were opened, and a row's samples keep their order;
    the loop visits rows in a seeded permutation each epoch anyway."""
    if not len(lengths):
        return []
    shortest = min(lengths)
    groups: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row), sorted: bisect finds the tightest row that fits
    for i, n in enumerate(lengths):
        j = bisect.bisect_left(open_rows, (n, -1))
        if j < len(open_rows):
            room, row = open_rows.pop(j)
        else:
            room, row = max_length, len(groups)
            groups.append([])
        groups[row].append(i)
        if room - n >= shortest:  # a row no sample can join any more is closed for good
            bisect.insort(open_rows, (room - n, row))
    return groups
