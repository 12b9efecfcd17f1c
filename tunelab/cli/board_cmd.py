"""`tunelab board [WORK_DIR ...]`: watch training runs in the browser (tunelab/board/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunelab.board import DEFAULT_PORT

DESCRIPTION = f"""\
A local web page of your training runs: each run's model, method, data, settings and state (running, finished,
stopped, failed, crashed), its curves (loss, eval loss, learning rate, grad norm, tokens/s, memory) updating live,
the evaluation answers before training next to those of any later step, and several runs on one chart.

It reads the work dirs' own files (train_log.jsonl, run.json, eval_outputs_iter_N.json), so it shows finished
runs, running ones and crashed ones alike, and runs started after the board. Each WORK_DIR is a work dir or a folder
of them (default: ./work_dirs). Needs the web extra: pip install 'tunelab[web]'.

example:
  tunelab board
  tunelab board work_dirs/run1 work_dirs/run2 --port {DEFAULT_PORT}
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("board", help="watch training runs live in the browser",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="WORK_DIR", help="work dirs, or folders of them (default: work_dirs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.set_defaults(func=run)


def run(args) -> int:
    from tunelab.errors import TunelabError

    if not 1 <= args.port <= 65535:
        raise TunelabError(f"--port {args.port}: must be from 1 to 65535.")
    paths = [Path(p) for p in (args.paths or ["work_dirs"])]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise TunelabError(f"no such folder: {', '.join(missing)}. Pass the --work-dir of a run (or a folder of "
                           f"them), e.g. `tunelab board work_dirs`.")
    try:
        from tunelab.board.app import serve_board
    except ImportError as exc:
        raise TunelabError(f"tunelab board needs the web extra ({exc.name} is missing): "
                           f"pip install 'tunelab[web]'") from None
    serve_board(paths, host=args.host, port=args.port)
    return 0
