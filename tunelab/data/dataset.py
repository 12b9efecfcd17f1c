"""From `data_path` to the rows the training loop consumes: read, normalise, mix, encode, split, pack, cache.

    bundle = build_datasets(cfg, tokenizer, config_dir="configs/")
    bundle.train_rows[0]  # {"input_ids": [...], "labels": [...], "position_ids": [...]}

The result is cached under ``$TUNELAB_CACHE`` (default ~/.cache/tunelab) keyed by everything that changes it (data
files, tokenizer, template, max_length, format, train_on, packing, seed...), so a second run starts at once.
`tunelab preprocess CFG` fills the cache ahead of time with several processes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tunelab.data.encode import encode_batch
from tunelab.data.formats import FORMATS, InvalidRecord, Record, detect_format, list_data_files, normalise, \
    read_records
from tunelab.data.packing import TokenRows, pack_rows
from tunelab.data.templates import get_template
from tunelab.errors import TunelabError

CACHE_VERSION = 3  # bump when the encoding or packing changes, so old caches are not reused (3: ids of the whole text)
CHUNK = 1000  # samples per tokenizer call / per worker task
MAX_REPORTED_INVALID = 20


@dataclass
class DataStats:
    records_read: int = 0
    skipped_invalid: int = 0
    dropped: int = 0
    """Samples with no trained-on token left after truncation to max_length."""
    truncated: int = 0
    samples: int = 0
    """Training samples (after mixing ratios, drops and the eval split)."""
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    eval_samples: int = 0
    eval_rows: int = 0
    sources: list = field(default_factory=list)
    """Per data source: path, format, records, samples used (after its ratio)."""
    invalid: list = field(default_factory=list)
    """The first few skipped records' error messages."""
    from_cache: bool = False
    cache_dir: str = ""

    def summary(self) -> str:
        return (f"{self.records_read} records read, {self.skipped_invalid} skipped as invalid, "
                f"{self.truncated} truncated, {self.dropped} dropped (nothing to train on after truncation); "
                f"{self.samples} train samples in {self.rows} rows, {self.tokens} tokens "
                f"({self.trained_tokens} trained); {self.eval_samples} eval samples")


@dataclass
class DataBundle:
    train_rows: TokenRows
    eval_rows: Optional[TokenRows]
    stats: DataStats
    sample_lengths: Optional[np.ndarray] = None
    """Token length of every encoded sample before truncation (for check-dataset's histogram)."""


@dataclass
class Source:
    path: str
    format: str
    ratio: float
    kind: str  # 'files', 'disk' (datasets.save_to_disk folder) or 'hub' (a `datasets` name)
    resolved: Optional[Path] = None


# --- where the data is --------------------------------------------------------------------------

def resolve_sources(data_path, data_format: str = "auto", config_dir: str | None = None) -> list[Source]:
    if data_path in (None, "", []):
        raise TunelabError("data_path is not set: point it at a data file, a folder, or a `datasets` name.")
    entries = data_path if isinstance(data_path, list) else [data_path]
    sources = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            if "path" not in entry:
                raise TunelabError(f"data_path[{i}] has no 'path' key: write {{'path': 'file.json', 'ratio': 1.0}}.")
            path, fmt, ratio = entry["path"], entry.get("format", data_format), entry.get("ratio", 1.0)
        else:
            path, fmt, ratio = entry, data_format, 1.0
        if fmt != "auto" and fmt not in FORMATS:
            raise TunelabError(f"data_path[{i}]: unknown format {fmt!r}; use 'auto' or one of {', '.join(FORMATS)}.")
        if not isinstance(ratio, (int, float)) or ratio <= 0:
            raise TunelabError(f"data_path[{i}]: ratio must be a number above 0 (1.0 = every record once), "
                               f"got {ratio!r}.")
        sources.append(_locate(str(path), fmt, float(ratio), config_dir))
    return sources


def _locate(path: str, fmt: str, ratio: float, config_dir: str | None) -> Source:
    candidates = [Path(path).expanduser()]
    if not Path(path).is_absolute() and config_dir:
        candidates.insert(0, Path(config_dir) / path)
    for candidate in candidates:
        if candidate.exists():
            candidate = candidate.resolve()
            is_saved = candidate.is_dir() and ((candidate / "state.json").exists()
                                               or (candidate / "dataset_dict.json").exists())
            return Source(path, fmt, ratio, "disk" if is_saved else "files", candidate)
    if "/" in path and not path.startswith((".", "/", "~")) and not Path(path).suffix:
        return Source(path, fmt, ratio, "hub")
    looked = " and ".join(str(c) for c in candidates)
    raise TunelabError(f"data_path {path!r} not found (looked at {looked}). Relative paths are read from the "
                       f"config file's folder, then the current directory.")


def _raw_records(source: Source) -> list[tuple[str, list]]:
    """[(name, records)] per file (files) or one entry (a `datasets` dataset)."""
    if source.kind == "files":
        return [(str(f), f) for f in list_data_files(source.resolved)]
    import datasets

    try:
        if source.kind == "disk":
            ds = datasets.load_from_disk(str(source.resolved))
        else:
            ds = datasets.load_dataset(source.path)
    except Exception as exc:  # offline, missing dataset, damaged folder: all are the user's to fix
        raise TunelabError(f"data_path {source.path!r}: the `datasets` library could not load it ({exc}). "
                           f"Check the name, or download it first and point data_path at the folder.")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return [(source.path, ds)]


def _iter_records(name: str, origin, skip_invalid: bool, on_skip):
    if isinstance(origin, Path):
        yield from read_records(origin, skip_invalid=skip_invalid, on_skip=on_skip)
    else:
        for i, rec in enumerate(origin):
            yield Record(rec, f"{name} row {i}")


# --- reading and normalising --------------------------------------------------------------------

def read_samples(source: Source, *, skip_invalid: bool, map_fn: Optional[Callable], system: str,
                 stats: DataStats, limit: Optional[int] = None) -> list[dict]:
    """All samples of one source, normalised; bad records raise, or are counted when skip_invalid."""
    samples: list[dict] = []

    def skip(message: str) -> None:
        stats.skipped_invalid += 1
        if len(stats.invalid) < MAX_REPORTED_INVALID:
            stats.invalid.append(message)

    read_before = stats.records_read
    formats_seen = set()
    for name, origin in _raw_records(source):
        fmt = source.format
        def unreadable(message: str) -> None:  # a line that is not even JSON still counts as a record read
            stats.records_read += 1
            skip(message)

        for rec in _iter_records(name, origin, skip_invalid, unreadable):
            stats.records_read += 1
            try:
                data = rec.data
                if map_fn is not None:
                    try:
                        data = map_fn(dict(data) if isinstance(data, dict) else data)
                    except Exception as exc:
                        raise InvalidRecord(f"{rec.where}: dataset_map_fn raised {type(exc).__name__}: {exc}. "
                                            f"Fix the function in your config, or the record.")
                    if data is None:  # the map function filtered the record out
                        continue
                if fmt == "auto":
                    detected = detect_format(data)
                    if detected is None:  # with skip_invalid: skipped, and the next record is asked instead
                        keys = ", ".join(map(repr, data)) if isinstance(data, dict) else type(data).__name__
                        raise InvalidRecord(
                            f"{rec.where}: cannot tell the data format from this record (fields: {keys}). Set "
                            f"data_format to one of {', '.join(FORMATS)}, rename the fields, or convert records "
                            f"with dataset_map_fn. See docs/DATA.md for an example of each format.")
                    fmt = detected
                sample = normalise(data, fmt, rec.where)
            except InvalidRecord as exc:
                if not skip_invalid:
                    raise
                skip(str(exc))
                continue
            if system and "messages" in sample and sample["messages"][0]["role"] != "system":
                sample["messages"].insert(0, {"role": "system", "content": system})
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                break
        formats_seen.add(fmt)
        if limit is not None and len(samples) >= limit:
            break
    stats.sources.append({"path": source.path, "format": ",".join(sorted(f for f in formats_seen if f != "auto")),
                          "records": stats.records_read - read_before, "samples": len(samples)})
    return samples


def apply_ratio(samples: list, ratio: float, rng: random.Random) -> list:
    """ratio 1 keeps every sample once; 0.5 a random half; 2.5 every sample twice plus a random half."""
    whole, part = int(ratio), ratio - int(ratio)
    return samples * whole + rng.sample(samples, round(part * len(samples)))


# --- encoding -------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(template, tokenizer, max_length, train_on):
    """Runs once per worker process: the tokenizer is sent once, not with every chunk."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism: no oversubscribed threads
    _WORKER.update(template=template, tokenizer=tokenizer, max_length=max_length, train_on=train_on)


def _encode_chunk(samples):
    w = _WORKER
    return encode_batch(w["template"], w["tokenizer"], samples, w["max_length"], w["train_on"])


def encode_all(template, tokenizer, samples: list[dict], max_length: int, train_on: str, num_proc: int = 1):
    chunks = [samples[i:i + CHUNK] for i in range(0, len(samples), CHUNK)]
    if num_proc > 1 and len(chunks) > 1:
        # spawn, not fork: a forked Rust tokenizer that already ran threads can deadlock
        with ProcessPoolExecutor(num_proc, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(template, tokenizer, max_length, train_on)) as pool:
            results = list(pool.map(_encode_chunk, chunks))
    else:
        results = [encode_batch(template, tokenizer, c, max_length, train_on) for c in chunks]
    return [encoded for chunk in results for per_sample in chunk for encoded in per_sample]


# --- the cache ------------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


def _file_fingerprint(path: Path) -> list:
    st = path.stat()
    digest = ""
    if st.st_size <= 32 * 2**20:  # small files: hash the contents too (cheap, survives `cp -p`)
        digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return [str(path), st.st_size, st.st_mtime_ns, digest]


def _function_fingerprint(fn) -> str:
    if fn is None:
        return ""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return repr((getattr(fn, "__qualname__", fn), code.co_code if code else None))


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.blake2b(f"{type(tokenizer).__name__}|{len(tokenizer)}|{body}".encode(), digest_size=16).hexdigest()


PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]


def cache_key(cfg, tokenizer, template, sources: list[Source]) -> str:
    files = []
    for s in sources:
        if s.kind == "files":
            files.append([_file_fingerprint(f) for f in list_data_files(s.resolved)])
        elif s.kind == "disk":
            files.append([_file_fingerprint(f) for f in sorted(s.resolved.rglob("*")) if f.is_file()])
        else:
            files.append(s.path)
    parts = {
        "version": CACHE_VERSION, "files": files, "sources": [(s.path, s.format, s.ratio) for s in sources],
        "tokenizer": _tokenizer_fingerprint(tokenizer), "template": [template.name, template.render(PROBE), template.to_jinja()],
        "map_fn": _function_fingerprint(cfg.dataset_map_fn),
        **{k: getattr(cfg, k) for k in ("data_format", "SYSTEM", "max_length", "pack_to_max_length",
                                       "shuffle_before_pack", "train_on", "skip_invalid", "eval_split_ratio",
                                       "seed")},
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def _load_cached(directory: Path) -> DataBundle:
    stats = DataStats(**json.loads((directory / "stats.json").read_text()))
    stats.from_cache, stats.cache_dir = True, str(directory)
    eval_rows = TokenRows.load(directory / "eval") if (directory / "eval").exists() else None
    return DataBundle(TokenRows.load(directory / "train"), eval_rows, stats, np.load(directory / "lengths.npy"))


def _save_cache(bundle: DataBundle, directory: Path) -> None:
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bundle.train_rows.save(tmp / "train")
    if bundle.eval_rows is not None:
        bundle.eval_rows.save(tmp / "eval")
    np.save(tmp / "lengths.npy", bundle.sample_lengths)
    (tmp / "stats.json").write_text(json.dumps(asdict(bundle.stats), indent=1, ensure_ascii=False))
    if not (directory / "stats.json").exists():
        shutil.rmtree(directory, ignore_errors=True)  # an incomplete leftover
        try:
            os.replace(tmp, directory)  # atomic: a half-written cache is never read
            return
        except OSError:  # another process (e.g. another rank) finished first: its copy is the same
            pass
    shutil.rmtree(tmp, ignore_errors=True)


# --- the entry point ------------------------------------------------------------------------------

def build_datasets(cfg, tokenizer, *, config_dir: str | None = None, log=print, use_cache: bool = True,
                   num_proc: int | None = None, allow_empty: bool = False) -> DataBundle:
    """Everything between `cfg.data_path` and the rows: see the module docstring.

    allow_empty: return empty rows instead of raising when nothing is usable (check-dataset reports instead).
    """
    template = get_template(cfg.prompt_template, tokenizer)
    sources = resolve_sources(cfg.data_path, cfg.data_format, config_dir)
    directory = cache_root() / "datasets" / cache_key(cfg, tokenizer, template, sources)
    if use_cache and (directory / "stats.json").exists():
        bundle = _load_cached(directory)
        log(f"data: loaded from cache {directory}: {bundle.stats.summary()}")
        return bundle

    start = time.time()
    stats = DataStats()
    samples: list[dict] = []
    for i, source in enumerate(sources):
        found = read_samples(source, skip_invalid=cfg.skip_invalid, map_fn=cfg.dataset_map_fn, system=cfg.SYSTEM,
                             stats=stats)
        if not found and not allow_empty:
            raise TunelabError(f"data_path {source.path!r}: no usable record (all {stats.sources[-1]['records']} "
                               f"were invalid). Run `tunelab check-dataset` to see why.")
        used = apply_ratio(found, source.ratio, random.Random(cfg.seed + i))
        stats.sources[-1]["samples"] = len(used)
        samples += used
    if stats.skipped_invalid:
        log(f"data: skipped {stats.skipped_invalid} invalid records, e.g. {stats.invalid[0]}")

    encoded = encode_all(template, tokenizer, samples, cfg.max_length, cfg.train_on, num_proc or cfg.num_proc)
    lengths = np.array([e.full_length for e in encoded], dtype=np.int64)
    stats.truncated = sum(e.truncated for e in encoded)
    stats.dropped = sum(e.row is None for e in encoded)
    rows = [e.row for e in encoded if e.row is not None]
    if not rows and not allow_empty:
        raise TunelabError(f"no sample has a token to train on after truncation to max_length={cfg.max_length}. "
                           f"Raise max_length, or check that samples have assistant replies.")

    rng = random.Random(cfg.seed)
    eval_samples: list[dict] = []
    if cfg.eval_split_ratio > 0 and len(rows) > 1:
        order = list(range(len(rows)))
        rng.shuffle(order)
        n_eval = min(len(rows) - 1, max(1, round(cfg.eval_split_ratio * len(rows))))
        held = set(order[:n_eval])
        eval_samples = [r for j, r in enumerate(rows) if j in held]
        rows = [r for j, r in enumerate(rows) if j not in held]
    stats.samples, stats.eval_samples = len(rows), len(eval_samples)

    if cfg.pack_to_max_length:
        if cfg.shuffle_before_pack:
            rng.shuffle(rows)
        rows = pack_rows(rows, cfg.max_length)
        eval_samples = pack_rows(eval_samples, cfg.max_length)
    train_rows = TokenRows.from_rows(rows)
    eval_rows = TokenRows.from_rows(eval_samples) if eval_samples else None
    stats.rows, stats.eval_rows = len(train_rows), len(eval_rows) if eval_rows else 0
    stats.tokens, stats.trained_tokens = train_rows.num_tokens, train_rows.num_trained_tokens
    bundle = DataBundle(train_rows, eval_rows, stats, lengths)
    if use_cache:
        try:
            _save_cache(bundle, directory)
            stats.cache_dir = str(directory)
        except OSError as exc:  # a read-only home must not stop training
            log(f"data: could not write the cache to {directory} ({exc}); set $TUNELAB_CACHE to a writable folder")
    log(f"data: prepared in {time.time() - start:.1f}s: {stats.summary()}")
    return bundle
