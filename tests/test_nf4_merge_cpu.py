"""The merged 4-bit weight's Triton kernel (tunelab.model.nf4_merge) on the CPU, in Triton's interpreter.

Training runs the kernel only on a GPU (tests/test_nf4_merge_gpu.py checks it there, with compile and a QLoRA
layer). Triton's interpreter runs the same kernel source with numpy on the CPU, so CI checks its indexing, masks,
block scales and codebook against bitsandbytes' own dequantisation on every change: with a zero adapter the kernel
is bitsandbytes bit for bit, with one each element is within one rounding of the exact sum. fp16 and fp32 only: the
interpreter's bf16 `tl.dot` is not bf16 arithmetic.

The interpreter is switched on by TRITON_INTERPRET=1 when the kernel is first built, so the checks run in a child
process; this process's kernel (the GPU one, where there is a GPU) stays as it is.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("triton", reason="Triton is not installed (pip install triton; Linux only)")

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import torch
import bitsandbytes.functional as bnbf
from tests.test_fast_nf4 import _quantised
from tests.test_nf4_merge_gpu import _ulp
from tunelab.model import nf4_merge


def check(shape, nested, quant_type, dtype, blocksize, ranks):
    dtype = getattr(torch, dtype)
    _, packed, state = _quantised(tuple(shape), dtype, quant_type, nested, blocksize)
    reference = bnbf.dequantize_4bit(packed, state)

    def kernel(lora_a, lora_b, scale, tile=nf4_merge.TILE):
        out = torch.full(shape, float("nan"), dtype=dtype)  # every element must be written
        nf4_merge.launch(out, *nf4_merge.operands(packed, state, lora_a, lora_b, dtype), scale, tile=tile)
        return out

    report = {}
    for rank in ranks:
        zero = kernel(torch.zeros(rank, shape[1], dtype=dtype), torch.zeros(shape[0], rank, dtype=dtype), 0.5)
        report[f"zero adapter, rank {rank}: bit for bit"] = torch.equal(zero, reference)
        lora_a = torch.randn(rank, shape[1], dtype=dtype) * 0.1
        lora_b = torch.randn(shape[0], rank, dtype=dtype) * 0.1
        exact = reference.double() + 0.25 * (lora_b.double() @ lora_a.double())
        got = kernel(lora_a, lora_b, 0.25)
        # one rounding to dtype of the sum (half a unit in the last place) plus fp32 accumulation over the rank
        worst = ((got.double() - exact).abs() - _ulp(exact, dtype) - 1e-6).max().item()
        report[f"adapter, rank {rank}: within one rounding of the exact sum (excess {worst:.3g})"] = worst <= 0
        other_tile = kernel(lora_a, lora_b, 0.25, tile=(32, 128, 4))
        report[f"adapter, rank {rank}: another tile writes the same"] = torch.equal(other_tile, got)
    return report


cases = json.loads(sys.argv[1])
print(json.dumps({name: check(**case) for name, case in cases.items()}))
"""

# (128, 256): whole tiles of the default 64 rows; (70, 192): rows and columns that fill no tile.
CASES = {f"{shape} {'nested' if nested else 'plain'} {quant_type} {dtype}":
         dict(shape=shape, nested=nested, quant_type=quant_type, dtype=dtype, blocksize=64, ranks=[3, 8])
         for shape in [(128, 256), (70, 192)] for nested in [True, False] for quant_type in ["nf4", "fp4"]
         for dtype in ["float16", "float32"]}
CASES.update({f"blocksize {blocksize}": dict(shape=(64, 512), nested=True, quant_type="nf4", dtype="float16",
                                             blocksize=blocksize, ranks=[16]) for blocksize in [32, 128, 256]})


@pytest.fixture(scope="module")
def reports() -> dict:
    """Every case's checks, from one child process (importing torch, bitsandbytes and Triton takes seconds)."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_is_bitsandbytes_plus_the_product(reports, case):
    report = reports[case]
    assert report and all(report.values()), report
