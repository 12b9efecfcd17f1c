"""`tunelab` command line: one sub-command per step of the pipeline.

Each group of verbs lives in its own module with a ``register(subparsers)`` function that adds its
parsers and sets ``func`` (called with the parsed args; returns an exit code or None).
Modules are imported lazily inside their ``func`` so `tunelab --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from tunelab import __version__
from tunelab.errors import TunelabError
from tunelab.train.launch import report_to_launcher  # stdlib only: --help stays fast

# Order = order in `tunelab --help`, which follows the user's path.
VERB_MODULES = [
    "tunelab.cli.config_cmds",  # list-cfg, copy-cfg
    "tunelab.cli.data_cmds",  # data, check-dataset, preview, preprocess
    "tunelab.cli.train_cmds",  # train, plan
    "tunelab.cli.board_cmd",  # board
    "tunelab.cli.export_cmds",  # convert
    "tunelab.cli.chat_cmds",  # chat, web, serve
    "tunelab.cli.predict_cmd",  # predict
    "tunelab.cli.eval_cmd",  # eval
    "tunelab.cli.reward_cmds",  # reward
    "tunelab.cli.demo_cmd",  # demo
]

EPILOG = """\
the path, step by step:
  tunelab list-cfg -p internlm2_1_8b
  tunelab copy-cfg internlm2_1_8b_qlora_alpaca_e3 ./
  tunelab train internlm2_1_8b_qlora_alpaca_e3_copy.py --work-dir work_dirs/run1
  tunelab convert pth_to_hf internlm2_1_8b_qlora_alpaca_e3_copy.py work_dirs/run1/iter_500 hf_adapter
  tunelab convert merge internlm/internlm2-chat-1_8b hf_adapter merged
  tunelab chat merged
try it on CPU in minutes:  tunelab demo
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Fine-tune open LLMs: full, LoRA and QLoRA; convert, merge and chat.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = sub.add_parser(
        "version", help="print the versions of tunelab and its main dependencies",
        description="Print the versions of tunelab and its main dependencies.\n\nexample:\n  tunelab version",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    version.set_defaults(func=_print_version)
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _print_version(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    print(f"tunelab {__version__}")
    for dep in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "deepspeed"):
        try:
            print(f"  {dep} {version(dep)}")
        except PackageNotFoundError:
            print(f"  {dep} (not installed)")
    return 0


def _quiet_library_noise() -> None:
    """Hide warnings from our dependencies that a tunelab user cannot act on (TUNELAB_VERBOSE=1 shows them)."""
    import logging
    import warnings

    if os.environ.get("TUNELAB_VERBOSE"):
        return
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers / peft
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # bitsandbytes on CPU looks for an optional kernel on the hub, which we never fetch
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)  # and, offline, says it skipped that kernel's trust check


def main(argv: list[str] | None = None) -> int:
    _quiet_library_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a reader that stopped early fails here, not at interpreter exit
    except TunelabError as exc:
        if not report_to_launcher(f"error: {exc}"):  # under torchrun the launcher prints it, once for all ranks
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # training says what survives (tunelab.train.loop)
        print("interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `tunelab ... | head`: the reader has what it wanted. Stop quietly, as other command-line tools do; the
        # output left in Python's buffer goes nowhere instead of raising again when Python exits.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe
    except Exception:
        # a crash under torchrun: its traceback once for all the ranks that met it, not N interleaved copies
        if report_to_launcher(traceback.format_exc().rstrip()):
            return 1  # Python's own exit code for an exception nobody caught
        raise
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
