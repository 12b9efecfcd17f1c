"""`tunelab demo`: the whole path on a tiny local model, on CPU (see tunelab/demo.py)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
The tutorials' "personal assistant" exercise in miniature, on CPU, with nothing downloaded: a tiny model is made
locally, fine-tuned on generated self-cognition data through `tunelab train`, converted with
`tunelab convert pth_to_hf`, then asked "请介绍一下你自己" and "who are you?" through `tunelab chat`.
Takes about 3 minutes on 2 CPU cores.

example:
  tunelab demo
  tunelab demo --out /tmp/demo --name 小助手
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="fine-tune a tiny local model on CPU to learn its new identity, then chat",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tunelab_demo", metavar="DIR",
                   help="where everything is written (default: ./tunelab_demo)")
    p.add_argument("--name", default="TuneBot", help="the assistant's new name (default: TuneBot)")
    p.add_argument("--author", default="tunelab", help="who made it, in its answers (default: tunelab)")
    p.add_argument("--epochs", type=int, default=8, help="passes over the generated data (default: 8)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tunelab.demo import run_demo

    answers = run_demo(args.out, name=args.name, author=args.author, epochs=args.epochs)
    learned = sum(args.name in a for a in answers)
    print(f"\nthe model named itself '{args.name}' in {learned} of {len(answers)} answers")
    return 0 if learned else 1
