"""From `data_path` to the rows the training loop consumes: read, normalise, mix, encode, split, pack, cache.

    bundle = build_datasets(cfg, tokenizer, config_dir="configs/")
    bundle.train_rows[0]  # {"input_ids": [...], "labels": [...], "position_ids": [...]}

Where the data is: `tunelab.data.data_path`; reading it (formats, the report per file): `tunelab.data.sources`.
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
from typing import Optional

import numpy as np

from tunelab.data.encode import encode_batch
from tunelab.data.encode_preference import kl_partner_problem, row_capacity, with_kl_completions
from tunelab.data.files import data_files
from tunelab.data.multimodal import ImageTokens, expand_image_tokens, image_tokens
from tunelab.data.packing import TokenRows, pack_rows
from tunelab.data.reports import counted, file_warnings, source_warnings, system_fills
from tunelab.data.data_path import Source, resolve_sources
from tunelab.data.sources import collect_samples, special_text_pattern
from tunelab.data.templates import get_template, tool_support
from tunelab.errors import TunelabError

# The cache's format: a new number whenever reading, encoding or packing changes, so a cache that other code wrote is
# not reused
CACHE_VERSION = 11
CHUNK = 1000  # samples per tokenizer call / per worker task


@dataclass
class DataStats:
    records_read: int = 0
    skipped_invalid: int = 0
    filtered: int = 0
    """Records the config's dataset_map_fn returned None for (dropped on purpose)."""
    left_out: int = 0
    """Records read and left out, each reported in its file's warnings (a preference pair's same chosen and rejected
    reply, an empty chosen reply; an empty pretraining text)."""
    encoded: int = 0
    """Samples encoded (a pretraining text longer than max_length counts once per max_length piece)."""
    split_texts: int = 0
    """Pretraining texts longer than max_length, split into pieces (nothing cut, so not `truncated`)."""
    text_pieces: int = 0
    """The samples those texts became."""
    truncated: int = 0
    """Encoded samples longer than max_length, cut there, still with a token to train on."""
    dropped: int = 0
    """Encoded samples longer than max_length with no trained-on token left after the cut."""
    untrained: int = 0
    """Encoded samples with no trained-on token at all (e.g. every reply marked as context only)."""
    samples: int = 0
    """Training samples (after mixing ratios, drops and the eval split)."""
    rows: int = 0
    tokens_before_truncation: int = 0
    """Tokens of every encoded sample, whole."""
    tokens: int = 0
    """Tokens in the training rows (after truncation, drops and the eval split)."""
    trained_tokens: int = 0
    images: int = 0
    """Images in the training rows (a multimodal run)."""
    eval_samples: int = 0
    eval_rows: int = 0
    sources: list = field(default_factory=list)
    """Per data source: path, format, records, samples used (after its ratio)."""
    files: list = field(default_factory=list)
    """Per data file: what reading it found (tunelab.data.reports.new_file_report)."""
    invalid: list = field(default_factory=list)
    """The first few skipped records' error messages."""
    system_fills: str = ""
    """Why samples were dropped when SYSTEM alone leaves no room for a reply within max_length (`system_fills`)."""
    kl_problem: str = ""
    """Why KTO cannot estimate its KL term from these samples (a single reply), where check-dataset reports it."""
    pictured: int = 0
    """Samples with an image (a multimodal run; train and eval)."""
    from_cache: bool = False
    cache_dir: str = ""

    def summary(self) -> str:
        return (f"{counted(self.records_read, 'record')} read, {self.skipped_invalid} skipped as invalid, "
                + (f"{self.filtered} dropped by dataset_map_fn, " if self.filtered else "")
                + (f"{self.left_out} left out (see the warnings), " if self.left_out else "") +
                f"{self.truncated} truncated, {self.dropped} dropped (nothing to train on after truncation), "
                f"{self.untrained} without a trained reply; {counted(self.samples, 'train sample')} in "
                f"{counted(self.rows, 'row')}, {counted(self.tokens, 'token')} ({self.trained_tokens} trained"
                f"{', ' + counted(self.images, 'image') if self.images else ''}); "
                f"{counted(self.eval_samples, 'eval sample')}")

    def warnings(self, cfg) -> list[str]:
        """Every warning about the data for the run `cfg`: a fresh build, a cached one and check-dataset say the
        same."""
        return self.reading_warnings() + self.row_warnings(cfg)

    def reading_warnings(self) -> list[str]:
        """What reading the files and sources found."""
        return ([line for report in self.files for line in file_warnings(report)]
                + [line for source in self.sources for line in source_warnings(source)])

    def row_warnings(self, cfg) -> list[str]:
        """What the run's settings make of the rows (set once the rows are built)."""
        if not self.rows:
            return []
        lines = [self.system_fills,
                 projector_data_warning(cfg, self.pictured, self.samples + self.eval_samples) if self.pictured else None,
                 unsplit_warning(cfg, self)]
        return [line for line in lines if line]


@dataclass
class DataBundle:
    train_rows: TokenRows
    eval_rows: Optional[TokenRows]
    stats: DataStats
    sample_lengths: Optional[np.ndarray] = None
    """Token length of every encoded sample before truncation (check-dataset's histogram): stats.encoded of them."""


def row_length(cfg) -> int:
    """The longest row: max_length, or for preference objectives a unit of two max_length sequences
    (tunelab.data.encode_preference)."""
    return cfg.max_length if cfg.objective == "sft" else row_capacity(cfg.max_length)


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
    """Per sample, its list of Encoded (one for a conversation, one per max_length piece of a long text)."""
    chunks = [samples[i:i + CHUNK] for i in range(0, len(samples), CHUNK)]
    if num_proc > 1 and len(chunks) > 1:
        # spawn, not fork: a forked Rust tokenizer that already ran threads can deadlock
        with ProcessPoolExecutor(num_proc, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(template, tokenizer, max_length, train_on)) as pool:
            results = list(pool.map(_encode_chunk, chunks))
    else:
        results = [encode_batch(template, tokenizer, c, max_length, train_on) for c in chunks]
    return [per_sample for chunk in results for per_sample in chunk]


def encode_samples(template, tokenizer, samples: list[dict], max_length: int, train_on: str, num_proc: int = 1,
                   tokens: Optional[ImageTokens] = None):
    """`encode_all`, and in a multimodal run each sample with images turned into its row with image tokens
    (`tunelab.data.multimodal.expand_image_tokens`): it is encoded whole first, since its length counts the image
    tokens, and cut at max_length after."""
    if tokens is None:
        return encode_all(template, tokenizer, samples, max_length, train_on, num_proc)
    pictured = [i for i, s in enumerate(samples) if s.get("images")]
    whole = encode_all(template, tokenizer, [samples[i] for i in pictured], 2**62, train_on, num_proc)
    out = encode_all(template, tokenizer, samples, max_length, train_on, num_proc) if len(pictured) < len(samples) \
        else [None] * len(samples)  # (the text-only samples; the others are replaced just below)
    for i, (encoded,) in zip(pictured, whole):
        sample = samples[i]
        out[i] = [expand_image_tokens(encoded, sample["images"], tokens.token_id, tokens.per_image, max_length,
                                      sample.get("where", f"sample {i}"))]
    return out


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


def _probe(template) -> str:
    """The probe conversation rendered (so a template's code change makes a new cache); without its system prompt for
    a template that refuses one (Gemma-2's own), which the data's system prompts then meet in encoding."""
    try:
        return template.render(PROBE)
    except TunelabError:
        return template.render(PROBE[1:])


def cache_key(cfg, tokenizer, template, sources: list[Source], tokens: Optional[ImageTokens] = None) -> str:
    files = []
    for s in sources:
        if s.kind == "files":
            files.append([_file_fingerprint(f) for f in data_files(s.resolved)[0]])
        elif s.kind == "disk":
            files.append([_file_fingerprint(f) for f in sorted(s.resolved.rglob("*")) if f.is_file()])
        else:
            files.append(s.path)
    parts = {
        "version": CACHE_VERSION, "files": files,
        "sources": [(s.path, s.format, s.ratio, s.placeholders, s.entry) for s in sources],
        "tokenizer": _tokenizer_fingerprint(tokenizer), "template": [template.name, _probe(template), template.to_jinja()],
        "map_fn": _function_fingerprint(cfg.dataset_map_fn),
        **{k: getattr(cfg, k) for k in ("data_format", "SYSTEM", "max_length", "pack_to_max_length",
                                       "shuffle_before_pack", "train_on", "skip_invalid", "eval_split_ratio",
                                       "seed", "objective")},
    }
    if tokens is not None:  # a multimodal run: the image tokens, and where relative image paths start
        parts["images"] = [tokens.token_id, tokens.per_image, str(getattr(cfg, "image_folder", None))]
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


def count_cuts(stats: DataStats, encoded: list, origins: list[int], max_length: int) -> None:
    """Count, overall and per file, samples cut at max_length, dropped by the cut, or with nothing to train."""
    for pieces, origin in zip(encoded, origins):
        report = stats.files[origin]
        for e in pieces:
            stats.encoded += 1
            stats.tokens_before_truncation += e.all_tokens or e.full_length
            if e.row is not None:
                kind = "truncated" if e.full_length > max_length else None
            else:
                kind = "dropped" if e.full_length > max_length else "untrained"
            if kind:
                setattr(stats, kind, getattr(stats, kind) + 1)
                report[kind] += 1


def count_split_texts(stats: DataStats, samples: list[dict], encoded: list) -> None:
    """Count the pretraining texts split at max_length: check-dataset says so, where otherwise one long line would
    show as "longer than max_length: 0" beside many more samples than records."""
    for sample, pieces in zip(samples, encoded):
        if "text" in sample and len(pieces) > 1:
            stats.split_texts += 1
            stats.text_pieces += len(pieces)


def check_projector_data(cfg, pictured: int) -> None:
    """Stage 1 (freeze_llm) trains the projector alone, and the projector learns from images only: data without
    any would train nothing (and save the projector it started with)."""
    if getattr(cfg, "freeze_llm", False) and not pictured:
        raise TunelabError("freeze_llm = True trains the projector alone, which learns from images, but no sample of "
                           f"data_path = {cfg.data_path!r} has an image: nothing would train. Give stage 1 "
                           "image-caption records ('<image>' in the text, the picture in 'image' / 'images'), or set "
                           "freeze_llm = False to train the language model on this data.")


def projector_data_warning(cfg, pictured: int, samples: int) -> str | None:
    """Stage-1 samples without an image train nothing (only the projector trains): they dilute the loss."""
    if getattr(cfg, "freeze_llm", False) and pictured < samples:
        return (f"{samples - pictured} of {samples} samples have no image: with freeze_llm = True only the projector "
                f"trains, so nothing learns from them (they only dilute the loss). Leave them out of stage 1.")
    return None


def unsplit_warning(cfg, stats: DataStats) -> str | None:
    """eval_split_ratio asked for a held-out set that the split could not make (one sample stays for training)."""
    if cfg.eval_split_ratio > 0 and not stats.eval_samples:
        return (f"eval_split_ratio = {cfg.eval_split_ratio} holds out nothing: {stats.samples} training "
                f"sample{'s' if stats.samples != 1 else ''} cannot be split (at least one stays for training), so no "
                f"held-out loss is computed. Add samples, or set eval_split_ratio = 0.")
    return None


# --- the entry point ------------------------------------------------------------------------------

def build_datasets(cfg, tokenizer, *, config_dir: str | None = None, log=print, use_cache: bool = True,
                   num_proc: int | None = None, allow_empty: bool = False) -> DataBundle:
    """Everything between `cfg.data_path` and the rows: see the module docstring.

    allow_empty: return empty rows instead of raising when nothing is usable (check-dataset reports instead).
    """
    template = get_template(cfg.prompt_template, tokenizer)
    tokens = image_tokens(cfg, tokenizer)  # None for a text-only run; else <image> is added to the tokenizer
    sources = resolve_sources(cfg.data_path, cfg.data_format, config_dir, cfg.objective,
                              multimodal=tokens is not None)
    directory = cache_root() / "datasets" / cache_key(cfg, tokenizer, template, sources, tokens)
    if use_cache and (directory / "stats.json").exists():
        bundle = _load_cached(directory)
        log(f"data: loaded from cache {directory}: {bundle.stats.summary()}")
        if tokens is not None:
            check_projector_data(cfg, bundle.stats.pictured)
        for line in bundle.stats.warnings(cfg):
            log(f"data: warning: {line}")
        return bundle

    start = time.time()
    stats = DataStats()
    samples, origins = collect_samples(cfg, stats, config_dir=config_dir, allow_empty=allow_empty,
                                       special=special_text_pattern(tokenizer), tools=tool_support(template))
    if stats.skipped_invalid:
        log(f"data: skipped {stats.skipped_invalid} invalid records, e.g. {stats.invalid[0]}")
    for line in stats.reading_warnings():  # now, not after minutes of encoding
        log(f"data: warning: {line}")
    if cfg.objective == "kto":  # each reply's KL partner chosen over the whole data set, whatever the chunks
        stats.kl_problem = kl_partner_problem(samples)
        if stats.kl_problem and not allow_empty:
            raise TunelabError(stats.kl_problem)
        samples = [] if stats.kl_problem else with_kl_completions(samples)  # check-dataset: its verdict

    encoded = encode_samples(template, tokenizer, samples, cfg.max_length, cfg.train_on, num_proc or cfg.num_proc,
                             tokens)
    lengths = np.array([e.full_length for pieces in encoded for e in pieces], dtype=np.int64)
    count_cuts(stats, encoded, origins, cfg.max_length)
    count_split_texts(stats, samples, encoded)
    rows = [e.row for pieces in encoded for e in pieces if e.row is not None]
    if tokens is not None and rows:
        stats.pictured = sum(1 for r in rows if r.get("images"))
        check_projector_data(cfg, stats.pictured)
    stats.system_fills = system_fills(cfg, tokenizer, template, samples) if stats.dropped else ""
    if not rows and not allow_empty:
        raise TunelabError(f"no sample has a token to train on (max_length={cfg.max_length}: {stats.dropped} "
                           f"dropped after truncation, {stats.untrained} without a trained reply). "
                           + (stats.system_fills or "Raise max_length, or check that samples have assistant replies "
                                                    "that are trained on."))

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
        rows = pack_rows(rows, row_length(cfg))
        eval_samples = pack_rows(eval_samples, row_length(cfg))
    train_rows = TokenRows.from_rows(rows)
    eval_rows = TokenRows.from_rows(eval_samples) if eval_samples else None
    stats.rows, stats.eval_rows = len(train_rows), len(eval_rows) if eval_rows else 0
    stats.tokens, stats.trained_tokens = train_rows.num_tokens, train_rows.num_trained_tokens
    stats.images = sum(map(len, train_rows.images)) if train_rows.images is not None else 0
    bundle = DataBundle(train_rows, eval_rows, stats, lengths)
    if use_cache:
        try:
            _save_cache(bundle, directory)
            stats.cache_dir = str(directory)
        except OSError as exc:  # a read-only home must not stop training
            log(f"data: could not write the cache to {directory} ({exc}); set $TUNELAB_CACHE to a writable folder")
    log(f"data: prepared in {time.time() - start:.1f}s: {stats.summary()}")
    for line in stats.row_warnings(cfg):  # (the files' were said as they were read)
        log(f"data: warning: {line}")
    return bundle
