"""GGUF types below 8 bits (`--type q4_k_m`, ...), made by llama.cpp's own quantiser.

k-quants choose a type per tensor and need llama.cpp's code to do it as llama.cpp reads it, so tunelab writes the
model as f16 GGUF (`gguf.write_gguf`) and hands that file to `llama_model_quantize` from llama-cpp-python (the
library `llama-quantize` is built on), which writes the quantised file; the f16 file is removed after. Without
llama-cpp-python installed, the error names both ways to get the file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

from tunelab.errors import TunelabError

# --type -> llama.cpp's file type (llama.h's llama_ftype); Q4_K_M is what Ollama's and Unsloth's exports default to
QUANTISED_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                   "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def f16_source(out_path: Path) -> Path:
    """The f16 file the quantiser reads: written beside OUT.gguf, removed once OUT.gguf is written."""
    return out_path.with_name(f"{out_path.stem}.f16.gguf")


def check_quantiser(out_type: str, out_path: Path) -> None:
    """Before anything loads: llama-cpp-python is there to quantise to `out_type`, and the f16 file's name beside
    `out_path` holds no file already (it would be overwritten, then removed)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise TunelabError(f"--type {out_type} is quantised by llama.cpp: pip install llama-cpp-python (it builds "
                           f"llama.cpp, a few minutes), or write --type f16 and run llama.cpp's own "
                           f"`llama-quantize OUT.gguf OUT-{out_type}.gguf {out_type.upper()}`.")
    source = f16_source(out_path)
    if source.exists():
        raise TunelabError(f"{source} exists: --type {out_type} writes the f16 file it quantises from under that name "
                           f"and removes it after. Move it away (or delete it, if a failed quantisation left it), or "
                           f"name another output file. Nothing was written.")


def quantise(source: Path, out_path: Path, out_type: str) -> None:
    """Quantise the GGUF `source` to `out_type` at `out_path` (written whole or not at all)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTISED_TYPES[out_type])
    params.nthread = os.cpu_count() or 1
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if code != 0 or not tmp.is_file():
            raise TunelabError(f"llama.cpp could not quantise {source} to {out_type} (code {code}; its log above "
                               f"says why). The f16 file is kept there: quantise it with llama.cpp's "
                               f"llama-quantize, or pick another --type.")
        tmp.replace(out_path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
