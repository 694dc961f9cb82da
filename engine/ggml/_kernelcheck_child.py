"""One path of the CPU-kernel self-test (engine/ggml/kernelcheck.py), in its own process.

  python -m corral.engine.ggml._kernelcheck_child --dir D --path plain|extra --types a,b
      [--reference] [--threads N]

Writes the models it needs into D (a random-weight F32 llama and each type quantized from
it), decodes the same tokens with each on the CPU alone, and saves the logits as
D/<path>-<type>.npy.
Prints one JSON line per event on stdout: {"event": "start", "type": t} before a type, then
"result" (with the file and the extra CPU buffers llama.cpp used) or "failed". A crash
between a "start" and its "result" is that type's.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path
from typing import Any

# 2 layers of a small llama whose matmuls every extra buffer type takes: rows a multiple of
# 32 (AMX tiles) and of 8 (repack), columns a multiple of 256 (K-quant blocks)
_SHAPE = {"n_layer": 2, "n_embd": 256, "n_head": 4, "n_head_kv": 2, "n_ff": 512, "n_vocab": 384}
_PROMPT = [1] + [259 + (i * 37) % 125 for i in range(31)]  # one batch: the matrix-matrix path
_STEPS = [300, 301, 350, 290, 333, 270]  # one token each: the matrix-vector path


def _emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def _models(folder: Path, types: list[str]) -> dict[str, Path]:
    """The F32 model and each quantized one, written once per folder."""
    from corral.engine.model.synthetic import TinyLlama, write_tiny_llama

    from .quantize import quantize

    f32 = folder / "f32.gguf"
    if not f32.exists():
        write_tiny_llama(folder / "f32.part", TinyLlama(**_SHAPE, seed=7)).rename(f32)
    files = {"f32": f32}
    for t in types:
        out = folder / f"{t}.gguf"
        if not out.exists():
            quantize(f32, folder / f"{t}.part", t, threads=1, pure=True).rename(out)
        files[t] = out
    return files


def _logits(model_path: Path, extra: bool, threads: int) -> Any:
    """Decode the prompt in one batch, then the steps one by one; the last logits of each."""
    import llama_cpp as L
    import numpy as np

    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mparams.use_extra_bufts = extra
    mparams.use_mmap = False
    none = (ctypes.c_void_p * 1)(None)  # no GPU devices at all: the CPU backend alone
    mparams.devices = ctypes.addressof(none)  # a NULL-ended list of ggml_backend_dev_t
    model = L.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path.name}")
    try:
        cparams = L.llama_context_default_params()
        cparams.n_ctx = 256
        cparams.n_batch = cparams.n_ubatch = 64
        cparams.n_threads = cparams.n_threads_batch = threads
        ctx = L.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        try:
            n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)))
            rows = []
            for chunk in [_PROMPT, *([s] for s in _STEPS)]:
                arr = (L.llama_token * len(chunk))(*chunk)
                if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(chunk))) != 0:
                    raise RuntimeError("llama_decode failed")
                ptr = L.llama_get_logits_ith(ctx, -1)
                rows.append(np.ctypeslib.as_array(ptr, (n_vocab,)).copy())
            return np.stack(rows)
        finally:
            L.llama_free(ctx)
    finally:
        L.llama_model_free(model)


def _used_buffers(lines: list[str]) -> dict[str, float]:
    """The extra CPU buffers llama.cpp logged, MiB each."""
    from .kernelcheck import is_extra_buffer
    from .loadlog import parse_load_log

    model = parse_load_log(lines).buffers.get("model", {})
    return {name: mib for name, mib in model.items() if is_extra_buffer(name)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral-kernelcheck-child")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--path", choices=["plain", "extra"], required=True)
    parser.add_argument("--types", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", action="store_true")
    opts = parser.parse_args(argv)
    types = [t for t in opts.types.split(",") if t]

    import faulthandler

    import numpy as np

    from .logs import LogCapture

    faulthandler.enable()  # a crash names the Python frame (which model, which step)
    capture = LogCapture()
    capture.install()
    files = _models(opts.dir, types)
    extra = opts.path == "extra"
    if opts.reference:
        out = opts.dir / "reference.npy"
        np.save(out, _logits(files["f32"], False, opts.threads))
        _emit(event="reference", file=str(out))
    for t in types:
        _emit(event="start", type=t)
        mark = capture.count
        try:
            logits = _logits(files[t], extra, opts.threads)
        except RuntimeError as exc:
            _emit(event="failed", type=t, message=str(exc))
            continue
        out = opts.dir / f"{opts.path}-{t}.npy"
        np.save(out, logits)
        _emit(event="result", type=t, file=str(out), extra_mib=_used_buffers(capture.since(mark)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
