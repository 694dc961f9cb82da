"""A lean GGUF header reader: metadata and the tensor table, without the big arrays.

gguf.GGUFReader parses every token string and merge of the vocabulary into numpy objects
(2.3 s for SmolLM2's 49k tokens); the planner needs only sizes and shapes. This reads the
same file format (constants from the `gguf` package) and skips array payloads, keeping their
lengths, so a plan starts in milliseconds.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 4096  # numeric arrays up to this long are kept (per-layer head counts)


class HeaderError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """A skipped array: its element type and length."""

    type: int
    count: int


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    n_bytes: int


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise HeaderError("the file ends inside its header (truncated?)")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise HeaderError("the file ends inside its header (truncated?)")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALARS and count <= _KEEP_ARRAY:
                return [self.unpack(_SCALARS[etype]) for _ in range(count)]
            if etype in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[etype]) * count
            elif etype == _STRING:
                for _ in range(count):
                    n = self.unpack("<Q")  # moves pos past the length first
                    self.pos += n
                    if self.pos > len(self.buf):
                        break
            else:
                raise HeaderError(f"nested arrays of type {etype} are not supported")
            if self.pos > len(self.buf):
                raise HeaderError("the file ends inside its header (truncated?)")
            return ArrayInfo(etype, count)
        raise HeaderError(f"unknown metadata value type {vtype}")


def read_header(path: str | Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """(metadata, tensors) of a GGUF file; HeaderError says what is wrong with it."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise HeaderError("the file is empty") from None
    with buf:
        cur = _Cursor(buf)
        if buf[:4] != b"GGUF":
            raise HeaderError("not a GGUF file (bad magic)")
        cur.pos = 4
        version = cur.unpack("<I")
        if version < 2:
            raise HeaderError(f"GGUF version {version} is too old")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("<I"))
        tensors = []
        end = 0  # where the last tensor's data ends, from the data section's start
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
            ttype = cur.unpack("<I")
            offset = cur.unpack("<Q")
            try:
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise HeaderError(f"tensor {name} has unknown type {ttype}") from None
            n = 1
            for d in dims:
                n *= d
            tensors.append(TensorInfo(name, dims, ttype, n // block * size))
            end = max(end, offset + n // block * size)
        # the tensor data starts at the next multiple of general.alignment after the header
        align = meta.get("general.alignment", 32)
        align = align if isinstance(align, int) and align > 0 else 32
        needed = -(-cur.pos // align) * align + end
        if len(buf) < needed:
            raise HeaderError(
                f"the file is cut short: {len(buf):,} bytes where its tensors need {needed:,} "
                "(an incomplete download or copy): download it again"
            )
    return meta, tensors
