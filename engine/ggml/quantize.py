"""Quantize a GGUF with llama.cpp (tests and benches make their model shapes this way)."""

from __future__ import annotations

import ctypes
from pathlib import Path

from ._lib import load
from .errors import GgmlError

# llama_ftype values (llama.h)
FTYPES = {"f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def quantize(src: str | Path, dst: str | Path, ftype: str, threads: int = 0) -> Path:
    """Write dst as src quantized to ftype (f16, q4_0, q8_0, q4_k_m, q5_k_m, q6_k)."""
    if ftype not in FTYPES:
        raise GgmlError(f"unknown quantization {ftype!r}; use one of {', '.join(FTYPES)}")
    llama = load().llama
    params = llama.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    rc = llama.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise GgmlError(f"llama.cpp could not quantize {src} to {ftype} (code {rc})")
    return Path(dst)
