"""Data engine speed: tokenise + pack N alpaca-sized synthetic samples; prints samples/s and tokens/s.

    python benchmarks/bench_data.py --n 100000 --num-proc 2

Uses the tiny byte-level BPE tokenizer of the tests (trained locally, no download); --vocab-size builds a larger one.
The cache is off so every run does the full work: read JSONL, normalise, render the template, tokenise, label, pack.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("the quick brown fox jumps over lazy dog give three tips for staying healthy translate following sentence "
         "into French what is capital of China Beijing hello assistant help you today please introduce yourself "
         "instruction describes task write response appropriately completes request").split()


def synthetic(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-sized records: ~12-word instructions, an input a third of the time, ~40-180-word outputs."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."  # noqa: E731
    return [{"instruction": words(rng.randint(6, 20)), "input": words(rng.randint(5, 30)) if rng.random() < 0.35
             else "", "output": words(rng.randint(40, 180))} for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--template", default="internlm2_chat")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from tunelab.config.schema import TrainConfig
    from tunelab.data.dataset import build_datasets
    from tunelab.model.tiny import make_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    tokenizer = make_tokenizer(work / "tok", vocab_size=args.vocab_size)
    data = work / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in synthetic(args.n)))
    cfg = TrainConfig(data_path=str(data), prompt_template=args.template, max_length=args.max_length,
                      pack_to_max_length=True, num_proc=args.num_proc)
    start = time.perf_counter()
    bundle = build_datasets(cfg, tokenizer, log=lambda m: None, use_cache=False)
    seconds = time.perf_counter() - start
    s = bundle.stats
    fill = s.tokens / (s.rows * args.max_length)
    print(f"{s.samples} samples, {s.tokens} tokens -> {s.rows} packed rows of {args.max_length} "
          f"(fill {fill:.1%}) in {seconds:.1f}s on {args.num_proc} processes (vocab {len(tokenizer)})")
    print(f"{s.samples / seconds:,.0f} samples/s, {s.tokens / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
