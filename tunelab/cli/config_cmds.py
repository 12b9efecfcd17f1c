"""`tunelab list-cfg` and `tunelab copy-cfg`: find a built-in config and copy it to edit."""

from __future__ import annotations

import argparse
import sys

LIST_DESCRIPTION = """\
List the built-in configs: <model>_<method>_<dataset>_e<epochs>.
Methods: full, lora (adapters on a bf16 base), qlora (adapters on a 4-bit base).

example:
  tunelab list-cfg
  tunelab list-cfg -p internlm2_1_8b
  tunelab list-cfg -p qwen2_5_0_5b_qlora
  tunelab list-cfg -p '*qlora*alpaca*'
"""

COPY_DESCRIPTION = """\
Copy a built-in config to DIR/NAME_copy.py, a plain Python file you edit.
The settings to edit sit at the top (PART 1); every setting is in docs/CONFIG.md.

example:
  tunelab copy-cfg internlm2_1_8b_qlora_alpaca_e3 ./
  tunelab train internlm2_1_8b_qlora_alpaca_e3_copy.py --work-dir work_dirs/run1
"""


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("list-cfg", help="list the built-in configs (model x method x dataset)",
                              description=LIST_DESCRIPTION, formatter_class=fmt)
    p.add_argument("-p", "--pattern", help="show only names containing this text, or matching it as a glob "
                   "(*qlora*alpaca*); case-insensitive")
    p.set_defaults(func=list_cfg)

    p = subparsers.add_parser("copy-cfg", help="copy a built-in config to a folder, to edit it",
                              description=COPY_DESCRIPTION, formatter_class=fmt)
    p.add_argument("name", metavar="NAME", help="a name from `tunelab list-cfg`")
    p.add_argument("dest_dir", metavar="DIR", help="folder to write NAME_copy.py into (made if missing); a name ending "
                   "in .py that is not a folder is the file to write")
    p.add_argument("--force", action="store_true", help="overwrite NAME_copy.py if it exists")
    p.set_defaults(func=copy_cfg)


def list_cfg(args) -> int:
    from tunelab.config.registry import MODELS, list_configs
    from tunelab.errors import TunelabError

    names = list_configs(args.pattern)
    if not names:
        raise TunelabError(f"no built-in config contains or matches {args.pattern!r}. "
                           f"Models: {', '.join(MODELS)}. Try `tunelab list-cfg` for all of them.")
    print("\n".join(names))
    # The hint goes to stderr so `tunelab list-cfg | grep ...` sees names only.
    print(f"\n{len(names)} configs. Copy one to edit it: tunelab copy-cfg NAME ./", file=sys.stderr)
    return 0


def copy_cfg(args) -> int:
    from tunelab.config.registry import canonical_name, copy_config

    path = copy_config(args.name, args.dest_dir, force=args.force)
    print(f"wrote {path}")
    print(f"next: edit the settings at its top, then\n  tunelab train {path} --work-dir work_dirs/"
          f"{canonical_name(args.name)}")  # the work dir its header names
    return 0
