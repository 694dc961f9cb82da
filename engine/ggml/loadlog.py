"""Read what llama.cpp actually did at load from its log lines (pure; no llama_cpp import)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_LAYER = re.compile(r"layer\s+(\d+) assigned to device ([^,\s]+)(?:, is_swa = (\d))?")
_BUFFER = re.compile(r"\s(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")


@dataclass(frozen=True, slots=True)
class LoadReport:
    """Layer → device name, and MiB per buffer kind per buffer name (as llama.cpp logged)."""

    layers: dict[int, str] = field(default_factory=dict)
    buffers: dict[str, dict[str, float]] = field(default_factory=dict)
    swa: tuple[int, ...] = ()  # the layers llama.cpp runs with the sliding window


def parse_load_log(lines: Iterable[str]) -> LoadReport:
    """Collect layer assignments, and buffer sizes summed per kind and buffer name."""
    layers: dict[int, str] = {}
    buffers: dict[str, dict[str, float]] = {}
    swa: list[int] = []
    for line in lines:
        m = _LAYER.search(line)
        if m:
            layers[int(m.group(1))] = m.group(2)
            if m.group(3) == "1":
                swa.append(int(m.group(1)))
            continue
        b = _BUFFER.search(line)
        if b:
            kind = buffers.setdefault(b.group(2), {})
            kind[b.group(1)] = kind.get(b.group(1), 0.0) + float(b.group(3))
    return LoadReport(layers=layers, buffers=buffers, swa=tuple(sorted(set(swa))))


def compact_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out: list[str] = []
    for n in sorted(layers):
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)
