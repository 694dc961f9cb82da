"""ggml RPC: register remote servers with this process's llama.cpp, and run a server."""

from __future__ import annotations

import ctypes

from ._lib import load
from .devices import device_handles
from .errors import GgmlError, GgmlUnavailable


def supports_rpc() -> bool:
    """True when the installed llama.cpp was built with the RPC backend."""
    return bool(load().llama.llama_supports_rpc())


def add_rpc_server(endpoint: str) -> None:
    """Register host:port as an RPC device; call before the model is created.

    ggml connects at once: an unreachable endpoint aborts the process, so callers probe it
    first (engine.ggml.probe) and only the inference child calls this.
    """
    g = load()
    if not supports_rpc():
        raise GgmlUnavailable("this llama-cpp-python was built without -DGGML_RPC=on")
    add = g.fn("ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
    register = g.fn("ggml_backend_register", None, ctypes.c_void_p)
    reg = add(endpoint.encode())
    if not reg:
        raise GgmlError(f"ggml refused the RPC endpoint {endpoint!r}")
    register(reg)


def start_rpc_server(
    endpoint: str, device_names: list[str], threads: int, cache_dir: str | None
) -> None:
    """Serve the named devices on endpoint. Returns only if the server could not start."""
    g = load()
    start = g.fn(
        "ggml_backend_rpc_start_server",
        None,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p),
    )
    handles = device_handles(device_names)
    arr = (ctypes.c_void_p * len(handles))(*handles)
    start(
        endpoint.encode(),
        cache_dir.encode() if cache_dir else None,
        threads,
        len(handles),
        arr,
    )
