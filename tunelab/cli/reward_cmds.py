"""`tunelab reward`: score replies with a reward model (tunelab.chat.reward)."""

from __future__ import annotations

import argparse
import json
import sys

from tunelab.cli.data_cmds import _positive_int, _warn

DESCRIPTION = """\
Score the replies of a data file (or a folder of them) with a reward model trained with objective = 'reward'. A
preference pair gets a score for its chosen and its rejected reply, and the fraction of pairs ranked right is
printed at the end (pairs whose two sequences are the same tokens are scored but not counted); a conversation or a
KTO sample gets a score for its last reply. One JSON line per record on stdout. The records are read as training
reads them: a LLaMA-Factory dataset_info.json with --dataset NAMES reads each dataset through its entry's columns
and tags. The prompt template, system prompt and max_length come from the model's tunelab.json (or the flags).

example (the names of docs/PREFERENCE.md: hf_rm from convert pth_to_hf, rm from convert merge):
  tunelab reward work_dirs/rm --data data/pairs_test.jsonl
  tunelab reward rm --data chats.jsonl -n 100 > scores.jsonl
  tunelab reward Qwen/Qwen2.5-1.5B-Instruct --adapter hf_rm --data pairs.jsonl
  tunelab reward rm --data data/dataset_info.json --dataset dpo_en_demo
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("reward", help="score replies with a reward model", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="a reward model directory, a checkpoint (iter_N / WORK_DIR), or "
                   "the base model with --adapter")
    p.add_argument("--adapter", metavar="DIR", help="the reward model's LoRA adapter (with its trained head)")
    p.add_argument("--data", required=True, metavar="FILE_OR_DIR", help="pairs, KTO samples or conversations: a file "
                   "or a folder of them (.json / .jsonl / .csv / .tsv / .parquet), or a LLaMA-Factory "
                   "dataset_info.json with --dataset")
    p.add_argument("--dataset", metavar="NAMES", help="the datasets of a dataset_info.json to score (e.g. "
                   "dpo_en_demo,kto_en_demo)")
    p.add_argument("-n", type=_positive_int, metavar="N", help="score only the first N records")
    p.add_argument("--prompt-template", "--template", metavar="NAME", dest="prompt_template",
                   help="chat template (default: from tunelab.json; --template: LLaMA-Factory's spelling)")
    p.add_argument("--system", metavar="TEXT", help="system prompt (default: the one used in training)")
    p.add_argument("--max-length", type=_positive_int, metavar="N",
                   help="tokens a sequence (default: as in training)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="records scored together")
    p.add_argument("--bits", type=int, choices=[4, 8], help="load the base quantised with bitsandbytes")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own code (only for repos you trust)")
    p.set_defaults(func=reward_cmd)


def reward_cmd(args) -> int:
    from tunelab.chat.reward import load_reward_model, read_scored, score_file

    # before loading the model: a bad record stops it at once
    samples = read_scored(args.data, args.n, args.dataset, warn=_warn)
    rm = load_reward_model(args.model, adapter=args.adapter, prompt_template=args.prompt_template,
                           system=args.system, max_length=args.max_length, device=args.device, dtype=args.dtype,
                           bits=args.bits, trust_remote_code=args.trust_remote_code)
    scores = score_file(rm, args.data, limit=args.n, batch_size=args.batch_size, samples=samples,
                        on_record=lambda r: print(json.dumps(r), flush=True))
    pairs, skipped = scores.pairs, scores.skipped
    if pairs:
        print(f"pairwise accuracy: {scores.accuracy:.4f} ({sum(r['correct'] for r in pairs)} of {len(pairs)} pairs "
              f"score the chosen reply higher)", file=sys.stderr)
    if skipped:
        n = sum(skipped.values())
        print(f"{'no pair ranked: ' if not pairs else ''}{n} pair{'' if n == 1 else 's'} not counted in the accuracy "
              f"(two sequences of the same tokens, one score twice): "
              + "; ".join(f"{count} {why}" for why, count in skipped.items())
              + (". Raise --max-length to score the replies of long prompts." if any("max_length" in why
                                                                                     for why in skipped) else "."),
              file=sys.stderr)
    return 0
