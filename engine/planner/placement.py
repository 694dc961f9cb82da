"""Which layer goes to which device, exactly as llama.cpp decides it (llama-model.cpp).

llama.cpp keeps the split points in 32-bit floats: cumulative sums of tensor_split, divided
by the total, and layer il goes to the first device whose split point exceeds
(il - i_gpu_start) / n_offloaded. We do the same arithmetic in float32, or boundaries would
differ on some splits. Layer n_layer is the output layer.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

HOST = -1  # the layer stays on the CPU of the desktop (not offloaded)


def split_points(tensor_split: Sequence[float]) -> list[float]:
    """Normalized cumulative split points, computed in float32 like llama.cpp."""
    splits = np.asarray(tensor_split, dtype=np.float32)
    acc = np.float32(0.0)
    cumulative = []
    for value in splits:
        acc = np.float32(acc + value)
        cumulative.append(acc)
    return [float(np.float32(c / acc)) for c in cumulative]


def assign_layers(n_layer: int, tensor_split: Sequence[float], n_gpu_layers: int = -1) -> list[int]:
    """Device index (into the split's device order) for layers 0..n_layer; HOST if not offloaded.

    tensor_split has one weight per device in llama.cpp's order: RPC devices in registration
    order, then local GPUs. n_gpu_layers < 0 offloads everything (the output layer too).
    """
    n_devices = len(tensor_split)
    total = n_layer + 1
    n_gpu = total if n_gpu_layers < 0 else n_gpu_layers
    i_gpu_start = max(total - n_gpu, 0)
    act = 0 if n_devices == 0 else min(n_gpu, total)
    points = split_points(tensor_split) if n_devices else []
    out = []
    for il in range(total):
        if il < i_gpu_start or il - i_gpu_start >= act:
            out.append(HOST)
            continue
        x = float(np.float32(np.float32(il - i_gpu_start) / np.float32(act)))
        out.append(min(bisect.bisect_right(points, x), n_devices - 1))
    return out


def split_for_counts(counts: Sequence[int]) -> list[float]:
    """The tensor_split that gives each device exactly counts[i] of the offloaded layers."""
    split = [float(c) for c in counts]
    total = sum(counts)
    got = assign_layers(total - 1, split)
    expected = [i for i, c in enumerate(counts) for _ in range(c)]
    if got != expected:  # never seen; kept so a float surprise cannot pass silently
        raise ValueError(f"cannot express layer counts {list(counts)} as a tensor_split")
    return split


def split_for_weights(n_layer: int, weights: Sequence[float]) -> list[float]:
    """A tensor_split proportional to weights (balanced: free memory; speed: device speed)."""
    total = sum(weights)
    if total <= 0:  # nothing has room: split evenly, and let the plan report the shortfall
        return [1.0 / len(weights)] * len(weights)
    return [w / total for w in weights]
