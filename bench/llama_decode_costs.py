"""Per-token cost of the Python side of a decode loop (diagnostic for llama_bench_compare.py).

Three loops over the same loaded model, each round 128 single-token decodes after the same
prompt, interleaved, median of rounds:

- sync: decode a fixed token and synchronize, nothing else (what llama-bench's tg test does)
- sampler: `llama_sampler_sample` (greedy) then decode, as Corral's inference child samples
- numpy: argmax over `llama_get_logits_ith` with numpy, then decode

    CUDA_VISIBLE_DEVICES=0 python3 bench/llama_decode_costs.py MODEL [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

# llama_cpp before numpy, as run: a first try with numpy imported first (and verbose=False,
# from the repository root) segfaulted during the load; which of the three did it is unknown
import llama_cpp as L
import numpy as np

MODES = ("sync", "sampler", "numpy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=4)
    opts = parser.parse_args()
    llm = L.Llama(
        model_path=opts.model,
        n_ctx=1024,
        n_threads=opts.threads,
        n_threads_batch=opts.threads,
        n_gpu_layers=-1,
        flash_attn=True,
        verbose=True,
    )
    ctx = llm.ctx
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(llm.model))
    prompt = llm.tokenize(b"Write a long story about a lighthouse keeper.", add_bos=True)
    sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(sampler, L.llama_sampler_init_greedy())
    one: Any = (L.llama_token * 1)()

    def run(mode: str, n: int) -> float:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        arr = (L.llama_token * len(prompt))(*prompt)
        L.llama_decode(ctx, L.llama_batch_get_one(arr, len(prompt)))
        L.llama_synchronize(ctx)
        tok = 100
        t0 = time.perf_counter()
        for _ in range(n):
            if mode == "sampler":
                tok = L.llama_sampler_sample(sampler, ctx, -1)
            elif mode == "numpy":
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), (n_vocab,))
                tok = int(logits.argmax())
            else:
                L.llama_synchronize(ctx)
            one[0] = tok
            L.llama_decode(ctx, L.llama_batch_get_one(one, 1))
        L.llama_synchronize(ctx)
        return n / (time.perf_counter() - t0)

    for mode in MODES:  # warm-up
        run(mode, 16)
    res: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(opts.rounds):
        for mode in MODES:
            res[mode].append(run(mode, opts.tokens))
    for mode, v in res.items():
        med = statistics.median(v)
        print(mode, "tok/s median", round(med, 1), "us/token", round(1e6 / med, 1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
