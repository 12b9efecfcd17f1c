"""Data verbs: `tunelab data self-cognition`, `check-dataset`, `preview`, `preprocess`."""

from __future__ import annotations

import argparse
import typing
import sys
from pathlib import Path

FMT = argparse.RawDescriptionHelpFormatter

SELF_COGNITION = """\
Write personal-assistant data: varied Chinese and English questions about who the model is, answered with
NAME and AUTHOR. The output is a JSON list in the `conversation` format, usable directly as data_path.
Mix it with general data (about 2,000 of these among 10,000 others) so the model keeps its other skills.

example:
  tunelab data self-cognition --name 小助手 --author 张三 --n 2000 -o data/self.json

With --from FILE, FILE's {{name}} and {{author}} placeholders are filled instead (e.g. LLaMA-Factory's
identity.json) and the result written in FILE's own format:
  tunelab data self-cognition --name 小助手 --author 张三 --from data/identity.json -o data/identity_filled.json
"""
CHECK = """\
Validate every record of a config's data (or of a data file, a folder, or a LLaMA-Factory dataset_info.json)
and report, per file, the formats read and everything not trained as written (fields not read, unfilled
{{placeholders}}, <image> without an image). With a tokenizer (a config's model, or --tokenizer) it also
reports token counts, a histogram of token lengths, and how many samples max_length truncates or drops.
Exits 1 when some records are invalid, or when no sample is left to train (where `tunelab train` would stop).

example:
  tunelab check-dataset my_config.py
  tunelab check-dataset data.jsonl
  tunelab check-dataset data.jsonl --format alpaca --tokenizer ./model --template qwen_chat --max-length 1024
  tunelab check-dataset data/dataset_info.json --dataset identity,alpaca_en_demo
"""
PREVIEW = """\
Show samples as the model sees them after the chat template, with the trained-on text marked (green in a
terminal, between ⟦ and ⟧ otherwise).

example:
  tunelab preview my_config.py -n 3
  tunelab preview data.json --tokenizer ./model --template internlm2_chat
"""
PREPROCESS = """\
Tokenise and pack a config's data ahead of time into the cache ($TUNELAB_CACHE, default ~/.cache/tunelab),
with several processes, so `tunelab train` starts at once.

example:
  tunelab preprocess my_config.py --num-proc 8
"""


def whole_number(minimum: int):
    """argparse type for counts: a whole number of `minimum` or more (`-n`, `--num-proc`: 1; `--n-shot`: 0), else
    argparse's error."""
    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            wanted = "a positive whole number (1 or more)" if minimum == 1 else f"{minimum} or more"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value
    return read


_positive_int = whole_number(1)


def _warn(line: str) -> None:
    """A warning about the data read, on stderr (`tunelab predict` and `tunelab reward` pass it as `warn`)."""
    print(f"warning: {line}", file=sys.stderr)


def _data_args(p: argparse.ArgumentParser) -> None:
    from tunelab.config.schema import Objective

    p.add_argument("source", metavar="CFG_OR_FILE", help="a config file (.py), or a data file / folder")
    p.add_argument("--format", default=None, help="data format for a data file (default: auto-detect)")
    p.add_argument("--template", default=None, help="chat template (default: the config's, or internlm2_chat)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the config's model)")
    p.add_argument("--max-length", type=int, default=None, help="token limit per sample (default: the config's)")
    p.add_argument("--train-on", choices=("assistant", "all"), default=None,
                   help="assistant: replies only; all: every token (default: the config's, or assistant)")
    p.add_argument("--objective", choices=typing.get_args(Objective), default=None,
                   help="what the data is for (default: the config's, or sft): preference objectives read pairs, "
                        "kto reads labelled replies (docs/PREFERENCE.md)")
    p.add_argument("--dataset", default=None, help="dataset names, when the source is a LLaMA-Factory "
                                                   "dataset_info.json (e.g. identity,alpaca_en_demo)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config settings")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="make data (self-cognition)", formatter_class=FMT,
                                 description="Make training data.\n\nexample:\n  tunelab data self-cognition "
                                             "--name NAME --author AUTHOR -o self.json")
    data_sub = data.add_subparsers(dest="data_command", metavar="WHAT", required=True)
    p = data_sub.add_parser("self-cognition", help="personal-assistant data naming your model and its author",
                            description=SELF_COGNITION, formatter_class=FMT)
    p.add_argument("--name", required=True, help="the assistant's name")
    p.add_argument("--author", required=True, help="who made it")
    p.add_argument("--n", type=int, default=2000, help="number of conversations (default 2000)")
    p.add_argument("--from", dest="from_file", metavar="FILE", default=None,
                   help="fill the {{name}} / {{author}} placeholders of this JSON / JSONL file instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="JSON file to write")
    p.set_defaults(func=self_cognition)

    p = subparsers.add_parser("check-dataset", help="validate data and show token-length statistics",
                              description=CHECK, formatter_class=FMT)
    _data_args(p)
    p.set_defaults(func=check_dataset)

    p = subparsers.add_parser("preview", help="show samples with the trained-on tokens marked",
                              description=PREVIEW, formatter_class=FMT)
    _data_args(p)
    p.add_argument("-n", type=_positive_int, default=3, help="how many samples (default 3)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="trained-on text in green (auto: when the output is a terminal), else between ⟦ and ⟧")
    p.set_defaults(func=preview)

    p = subparsers.add_parser("preprocess", help="tokenise and pack a config's data into the cache ahead of time",
                              description=PREPROCESS, formatter_class=FMT)
    p.add_argument("config", metavar="CFG", help="config file")
    p.add_argument("--num-proc", type=_positive_int, default=None, help="processes (default: the config's num_proc)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=preprocess)


def self_cognition(args) -> int:
    from tunelab.data.self_cognition import fill_file, write
    from tunelab.errors import TunelabError

    if args.from_file:
        path, count = fill_file(args.from_file, args.output, {"name": args.name, "author": args.author})
        print(f"wrote {path}: {count} records with their placeholders filled")
        return 0
    if args.n < 1:
        raise TunelabError("--n must be at least 1")
    path = write(args.output, args.name, args.author, args.n, args.seed)
    print(f"wrote {args.n} conversations to {path} (format: conversation). Use it as data_path, mixed with "
          f"general data, e.g. data_path = [{{'path': '{path}'}}, {{'path': 'general.json'}}]")
    return 0


def _checked_overrides(overrides: list[str]) -> dict:
    """--cfg-options for a data file (no config to apply them to), checked as a config's are."""
    from tunelab.config.checks import check_setting
    from tunelab.config.loader import parse_overrides
    from tunelab.errors import TunelabError

    settings = {}
    for key, value in parse_overrides(overrides).items():
        settings[key], error = check_setting(key, value, "--cfg-options")
        if error:
            raise TunelabError(error)
    return settings


def _load(args, *, need_tokenizer: bool = True):
    """(cfg, tokenizer, config_dir) from a config file or a data file plus flags. The tokenizer is None when
    need_tokenizer is False and a data file is given without --tokenizer."""
    from dataclasses import replace

    from tunelab.config.loader import llamafactory_config_keys, load_config, yaml_config_fix
    from tunelab.config.schema import TrainConfig
    from tunelab.errors import TunelabError
    from tunelab.model.tokenizer import load_tokenizer

    source = Path(args.source)
    llamafactory = llamafactory_config_keys(source)
    if llamafactory is not None:  # in a data file's place: the settings it holds, as `tunelab train` gives them
        raise TunelabError(f"{source} is a LLaMA-Factory training config, not a data file. "
                           f"{yaml_config_fix(llamafactory)}")
    if source.suffix == ".py":
        cfg, config_dir = load_config(source, args.cfg_options), str(source.parent)
        if args.format:
            cfg = replace(cfg, data_format=args.format)
        if args.dataset:
            raise TunelabError("--dataset goes with a dataset_info.json source; in a config, name the datasets in "
                               "data_path = [{'path': '.../dataset_info.json', 'dataset': '...'}].")
    else:
        if args.tokenizer is None and need_tokenizer:
            raise TunelabError(f"{source}: pass --tokenizer DIR (a model or tokenizer folder) to see the samples "
                               f"as tokens, or give a config file instead.")
        data_path = [{"path": str(source), "dataset": args.dataset}] if args.dataset else str(source)
        cfg, config_dir = TrainConfig(**{**_checked_overrides(args.cfg_options), "data_path": data_path}), None
        if args.format:
            cfg = replace(cfg, data_format=args.format)
    updates = {k: v for k, v in (("prompt_template", args.template), ("max_length", args.max_length),
                                 ("train_on", args.train_on), ("objective", args.objective)) if v is not None}
    cfg = replace(cfg, **updates)
    if cfg.max_length < 1:
        raise TunelabError("--max-length must be a positive number")
    if source.suffix != ".py" and args.tokenizer is None:
        return cfg, None, config_dir
    try:
        tokenizer = load_tokenizer(args.tokenizer or cfg.pretrained_model_name_or_path,
                                   trust_remote_code=cfg.trust_remote_code)
    except TunelabError as exc:
        if need_tokenizer or args.tokenizer:
            raise
        # check-dataset on a config whose model is not here (offline): the records can still be checked
        print(f"note: no tokenizer ({exc}); checking the records without token statistics", file=sys.stderr)
        tokenizer = None
    return cfg, tokenizer, config_dir


def check_dataset(args) -> int:
    from tunelab.data.inspect import check_dataset as check

    cfg, tokenizer, config_dir = _load(args, need_tokenizer=False)
    stats = check(cfg, tokenizer, config_dir=config_dir)
    return 1 if stats.skipped_invalid or not stats.samples else 0  # invalid records, or nothing left to train


def preview(args) -> int:
    from tunelab.data.inspect import preview as show

    cfg, tokenizer, config_dir = _load(args)
    color = None if args.color == "auto" else args.color == "always"
    show(cfg, tokenizer, args.n, config_dir=config_dir, color=color)
    return 0


def preprocess(args) -> int:
    from tunelab.config.loader import load_config
    from tunelab.data.dataset import build_datasets
    from tunelab.model.tokenizer import load_tokenizer

    cfg = load_config(args.config, args.cfg_options)
    tokenizer = load_tokenizer(cfg.pretrained_model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    bundle = build_datasets(cfg, tokenizer, config_dir=str(Path(args.config).parent),
                            num_proc=args.num_proc or cfg.num_proc)
    print(f"cached at {bundle.stats.cache_dir}")
    return 0
