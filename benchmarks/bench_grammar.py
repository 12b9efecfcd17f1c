"""What structured output adds to a decode step: xgrammar's token masks for a batch of replies held to a JSON schema,
over a vocabulary of a real model's size, as `tunelab serve`'s batcher pays it (`grammar.mask_outside_grammars`).

    python benchmarks/bench_grammar.py                    # CPU logits
    python benchmarks/bench_grammar.py --device cuda      # the masks applied to logits on the GPU

No model hub here, so the vocabulary is synthetic: 151,936 pieces shaped like a byte-level BPE vocabulary (Qwen2.5's
width): the printable bytes, then words with and without a leading space, digits, punctuation and whitespace runs,
CJK pieces. Each of --batch replies is taken into a JSON string (the widest set of allowed tokens: most pieces may
come next) or to the start of a number (a narrow set), then every step fills each row's mask and applies them.
Reported: ms per step for the batch (fill + apply), the median of --steps.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import SCHEMA  # noqa: E402 (the schema bench_serve --structured holds replies to)

WIDTH = 151_936


def synthetic_vocabulary(size: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = {chr(b) for b in range(32, 127)} | {"\n", "\t"}
    while len(pieces) < size - 2:
        kind, n = rng.random(), max(1, int(rng.expovariate(1 / 5)))
        if kind < 0.55:
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
            word = word.capitalize() if rng.random() < 0.2 else word
            pieces.add(" " + word if rng.random() < 0.6 else word)
        elif kind < 0.65:
            pieces.add("".join(rng.choice(string.digits) for _ in range(min(n, 3))))
        elif kind < 0.8:
            pieces.add("".join(rng.choice(string.punctuation + " \n\t") for _ in range(min(n, 4))))
        else:
            pieces.add("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(min(n, 3))))
    return sorted(pieces) + ["<|im_end|>", "<|endoftext|>"]


def main(argv=None) -> int:
    import torch
    import xgrammar

    from tunelab.chat.grammar import mask_outside_grammars, new_matcher

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    vocab = synthetic_vocabulary(WIDTH - 1000)
    ids = {piece: i for i, piece in enumerate(vocab)}
    info = xgrammar.TokenizerInfo(vocab, vocab_type=xgrammar.VocabType.RAW, vocab_size=WIDTH,
                                  stop_token_ids=[ids["<|im_end|>"]])
    start = time.perf_counter()
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    print(f"{len(vocab):,} pieces, logits {WIDTH:,} wide, on {args.device}; schema compiled in "
          f"{time.perf_counter() - start:.2f} s\n| rows | where | ms a step (fill + apply) |\n|---|---|---|")
    for where, prefix in (("inside a string", '{"title": "the quick brown fox'),
                          ("before a number", '{"title": "x", "tags": [], "score": ')):
        for batch in args.batch:
            matchers = []
            for row in range(batch):
                matcher = new_matcher(compiled)
                for ch in prefix:
                    assert matcher.accept_token(ids[ch]), (where, ch)
                matchers.append((row, matcher))
            logits = torch.zeros(batch, WIDTH, device=args.device)
            times = []
            for _ in range(args.steps):
                if args.device != "cpu":
                    torch.cuda.synchronize()
                begin = time.perf_counter()
                mask_outside_grammars(logits, matchers)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - begin)
            allowed = int(torch.isfinite(logits[0]).sum())
            print(f"| {batch} | {where} ({allowed:,} tokens allowed) | {statistics.median(times) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
