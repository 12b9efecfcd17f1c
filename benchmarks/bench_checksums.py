"""What the checkpoint checksums cost: writing a checkpoint-sized safetensors file, then hashing it (as a save does,
`tunelab.train.checksums.write_manifest`) and verifying it (as resume does), on the CPU.

    python benchmarks/bench_checksums.py --gib 1 --dir /path/on/the/disk/of/your/work_dirs

The hash reads the file back just after it was written, so it mostly comes from the page cache; verification on
resume reads it again (from the disk when the cache has been dropped since). sha256 is timed alongside for
comparison. Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tunelab.train.checksums import verify_checkpoint, write_manifest


def _timed(label: str, gib: float, fn) -> float:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    print(f"{label:<34} {seconds:7.2f} s   {gib / seconds:6.2f} GiB/s")
    return seconds


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the weights file (default 1 GiB)")
    parser.add_argument("--dir", default=None, help="where to write (default: the system's temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_checksums_", dir=args.dir))
    try:
        checkpoint = root / "iter_1"
        (checkpoint / "model").mkdir(parents=True)
        n = int(args.gib * 2**30) // 4 // 16
        tensors = {f"layer{i}.weight": torch.randn(n) for i in range(16)}  # 16 tensors, fp32
        weights = checkpoint / "model" / "model.safetensors"
        gib = args.gib
        write = _timed("write safetensors", gib, lambda: save_file(tensors, str(weights)))
        manifest = _timed("xxh3-128 checksums (save)", gib, lambda: write_manifest(checkpoint))
        _timed("verify (resume)", gib, lambda: verify_checkpoint(checkpoint))
        _timed("sha256, for comparison", gib, lambda: _sha256(weights))
        print(f"checksums add {100 * manifest / write:.0f}% to the write of the weights")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
