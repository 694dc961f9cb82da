"""The ggml backend devices this process sees (local GPUs, CPU, registered RPC servers)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass

from ._lib import load
from .errors import UnknownDevice

_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


@dataclass(frozen=True, slots=True)
class GgmlDevice:
    index: int
    name: str
    description: str
    backend: str
    type: str
    memory_free: int
    memory_total: int


def _handles() -> list[int]:
    g = load()
    count = g.fn("ggml_backend_dev_count", ctypes.c_size_t)
    get = g.fn("ggml_backend_dev_get", ctypes.c_void_p, ctypes.c_size_t)
    return [get(i) for i in range(count())]


def list_devices() -> list[GgmlDevice]:
    """Every registered device in llama.cpp's order, with its free and total memory."""
    g = load()
    name = g.fn("ggml_backend_dev_name", ctypes.c_char_p, ctypes.c_void_p)
    desc = g.fn("ggml_backend_dev_description", ctypes.c_char_p, ctypes.c_void_p)
    dtype = g.fn("ggml_backend_dev_type", ctypes.c_int, ctypes.c_void_p)
    memory = g.fn(
        "ggml_backend_dev_memory",
        None,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    )
    reg_of = g.fn("ggml_backend_dev_backend_reg", ctypes.c_void_p, ctypes.c_void_p)
    reg_name = g.fn("ggml_backend_reg_name", ctypes.c_char_p, ctypes.c_void_p)
    out = []
    for i, dev in enumerate(_handles()):
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        memory(dev, ctypes.byref(free), ctypes.byref(total))
        reg = reg_of(dev)
        out.append(
            GgmlDevice(
                index=i,
                name=(name(dev) or b"").decode(errors="replace"),
                description=(desc(dev) or b"").decode(errors="replace"),
                backend=(reg_name(reg) or b"").decode(errors="replace") if reg else "",
                type=_TYPES.get(dtype(dev), "unknown"),
                memory_free=free.value,
                memory_total=total.value,
            )
        )
    return out


def device_handles(names: list[str]) -> list[int]:
    """ggml_backend_dev_t pointers for device names; UnknownDevice names what exists."""
    devices = list_devices()
    handles = _handles()
    by_name = {d.name: handles[d.index] for d in devices}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UnknownDevice(
            f"no ggml device named {', '.join(missing)} on this host; "
            f"it has {', '.join(sorted(by_name)) or 'none'}"
        )
    return [by_name[n] for n in names]


def pick_worker_devices(devices: Iterable[tuple[str, str]]) -> list[str]:
    """What an RPC worker serves when not told, from (name, type) pairs: every GPU, else the
    CPU. Pure: the agent's worker and the desktop's planner both apply it."""
    devices = list(devices)
    gpus = [n for n, t in devices if t in ("gpu", "igpu") and not n.startswith("RPC")]
    return gpus or [n for n, t in devices if t == "cpu"][:1]


def default_worker_devices() -> list[str]:
    """pick_worker_devices over this process's ggml devices."""
    return pick_worker_devices((d.name, d.type) for d in list_devices())
