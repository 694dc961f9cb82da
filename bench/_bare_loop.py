"""Baseline for bench/generation.py: the plainest llama-cpp-python low-level decode loop.

    python3 bench/_bare_loop.py MODEL TOKENS THREADS [RPC_ENDPOINT ...] [--flash-attn on|off]

Loads the model once (split evenly over the RPC endpoints, if any), then for each line on
stdin generates TOKENS greedy tokens and prints the seconds the loop took (decode + sample,
synchronized), one line per round. bench/generation.py and bench/llama_bench_compare.py
both run it.
"""

from __future__ import annotations

import argparse
import sys
import time

import llama_cpp as L


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("tokens", type=int)
    parser.add_argument("threads", type=int)
    parser.add_argument("endpoints", nargs="*", help="RPC workers to split over")
    parser.add_argument("--flash-attn", choices=["on", "off"], default="off")
    opts = parser.parse_args()
    model, n_tokens, threads, endpoints = opts.model, opts.tokens, opts.threads, opts.endpoints
    if endpoints:
        from corral.engine.ggml import add_rpc_server

        for endpoint in endpoints:
            add_rpc_server(endpoint)
    llm = L.Llama(
        model_path=model,
        n_ctx=1024,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=-1,
        tensor_split=[1.0] * len(endpoints) or None,
        flash_attn=opts.flash_attn == "on",
        verbose=False,
    )
    ctx = llm.ctx
    prompt = llm.tokenize(b"Write a long story about a lighthouse keeper.", add_bos=True)
    sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(sampler, L.llama_sampler_init_greedy())
    for _ in sys.stdin:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        arr = (L.llama_token * len(prompt))(*prompt)
        L.llama_decode(ctx, L.llama_batch_get_one(arr, len(prompt)))
        L.llama_synchronize(ctx)
        one = (L.llama_token * 1)()
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            one[0] = L.llama_sampler_sample(sampler, ctx, -1)
            L.llama_decode(ctx, L.llama_batch_get_one(one, 1))
        L.llama_synchronize(ctx)
        print(time.perf_counter() - t0, flush=True)


if __name__ == "__main__":
    main()
