"""KV-cache element types: ggml type numbers and bytes per row (docs/LLAMACPP.md)."""

from __future__ import annotations

# name → (ggml type number, block size, bytes per block)
KV_TYPES: dict[str, tuple[int, int, int]] = {
    "f32": (0, 1, 4),
    "f16": (1, 1, 2),
    "bf16": (30, 1, 2),
    "q8_0": (8, 32, 34),
    "q4_0": (2, 32, 18),
    "q4_1": (3, 32, 20),
    "iq4_nl": (20, 32, 18),
    "q5_0": (6, 32, 22),
    "q5_1": (7, 32, 24),
}


class UnknownCacheType(ValueError):
    pass


def ggml_type(name: str) -> int:
    try:
        return KV_TYPES[name][0]
    except KeyError:
        raise UnknownCacheType(
            f"unknown KV cache type {name!r}; use one of {', '.join(KV_TYPES)}"
        ) from None


def row_bytes(name: str, n: int) -> int:
    """Bytes of one row of n elements in this type."""
    _, block, size = KV_TYPES[name]
    return n // block * size
