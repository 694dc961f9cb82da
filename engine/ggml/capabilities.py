"""Ask a ggml device whether it can run the attention and KV-cache ops a plan needs.

ggml's RPC client answers "supported" for every op without asking the remote, so a worker
that lacks a kernel aborts mid-load and takes the client with it. We build the real nodes
(FLASH_ATTN_EXT with the planned K/V types and head size, SET_ROWS into the cache type) in a
metadata-only ggml context and ask the device itself: ask the device, don't guess from a table.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from ._lib import load
from .devices import device_handles

GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I64 = 0, 1, 27


@dataclass(frozen=True, slots=True)
class Question:
    """One combination to ask about."""

    type_k: int  # ggml type numbers
    type_v: int
    head_dim: int
    flash_attn: bool


class _InitParams(ctypes.Structure):
    _fields_ = [
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    ]


def ask(device: str, questions: list[Question]) -> list[bool]:
    """For each question: can `device` run the cache writes (and flash attention) it needs?"""
    g = load()
    init = g.fn("ggml_init", ctypes.c_void_p, _InitParams)
    free = g.fn("ggml_free", None, ctypes.c_void_p)
    new4 = g.fn(
        "ggml_new_tensor_4d",
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
    )
    fa = g.fn(
        "ggml_flash_attn_ext",
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_float,
        ctypes.c_float,
        ctypes.c_float,
    )
    set_rows = g.fn(
        "ggml_set_rows",
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
    )
    supports = g.fn("ggml_backend_dev_supports_op", ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)
    (dev,) = device_handles([device])
    answers = []
    n_kv, n_tok, n_head, n_head_kv = 256, 8, 4, 2
    for q in questions:
        ctx = init(_InitParams(16 << 20, None, True))  # metadata only: no tensor data
        try:
            ok = True
            for cache_type in (q.type_k, q.type_v):
                cache = new4(ctx, cache_type, q.head_dim * n_head_kv, n_kv, 1, 1)
                src = new4(ctx, GGML_TYPE_F32, q.head_dim * n_head_kv, n_tok, 1, 1)
                idx = new4(ctx, GGML_TYPE_I64, n_tok, 1, 1, 1)
                ok = ok and bool(supports(dev, set_rows(ctx, cache, src, idx)))
            if q.flash_attn:
                qt = new4(ctx, GGML_TYPE_F32, q.head_dim, n_tok, n_head, 1)
                kt = new4(ctx, q.type_k, q.head_dim, n_kv, n_head_kv, 1)
                vt = new4(ctx, q.type_v, q.head_dim, n_kv, n_head_kv, 1)
                mask = new4(ctx, GGML_TYPE_F16, n_kv, 64, 1, 1)
                node = fa(ctx, qt, kt, vt, mask, 1.0, 0.0, 0.0)
                ok = ok and bool(supports(dev, node))
            answers.append(ok)
        finally:
            free(ctx)
    return answers
