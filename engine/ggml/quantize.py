"""Quantize a GGUF with llama.cpp (the CPU-kernel self-test, tests and benches make their
model shapes this way)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

from ._lib import load
from .errors import GgmlError

# llama_ftype values (llama.h)
FTYPES = {
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k_s": 11,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
    "bf16": 32,
}


def quantize(
    src: str | Path,
    dst: str | Path,
    ftype: str,
    threads: int = 0,
    pure: bool = False,
    types: Sequence[tuple[str, int]] = (),
    output_type: int = -1,
) -> Path:
    """Write dst as src quantized to ftype (one of FTYPES). `pure` gives every 2-D tensor
    that type (llama.cpp otherwise keeps the embeddings and output in a wider one); `types`
    gives the tensors whose names a regular expression finds their own ggml type (the first
    that matches), and `output_type` (a ggml type, -1: none) output.weight's."""
    if ftype not in FTYPES:
        raise GgmlError(f"unknown quantization {ftype!r}; use one of {', '.join(FTYPES)}")
    llama = load().llama
    params = llama.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    params.pure = pure
    if output_type >= 0:
        params.output_tensor_type = output_type
    if types:  # llama.cpp reads them up to the entry whose pattern is NULL
        table = (llama.llama_model_tensor_override * (len(types) + 1))()
        for entry, (pattern, ggml_type) in zip(table, types, strict=False):
            entry.pattern, entry.type = pattern.encode(), ggml_type
        params.tt_overrides = table
    rc = llama.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise GgmlError(f"llama.cpp could not quantize {src} to {ftype} (code {rc})")
    return Path(dst)
