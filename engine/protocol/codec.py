"""Length-prefixed msgpack frames with a hard size cap, checked before anything is allocated."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import ErrorCode, ProtocolError

# 4 MiB: the largest legitimate frame is an inventory of a many-GPU host (a few KiB) or a
# chat message; model bytes never travel on the control channel (they go over ggml RPC).
# Anything larger is a bug or an attack, and is refused before it is buffered.
MAX_FRAME = 4 * 1024 * 1024
_HEADER = struct.Struct(">I")
_READ_CHUNK = 256 * 1024  # StreamReader.readexactly is slow on large sizes; read in chunks


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """How large one frame may be, and how many items one array or map in it may hold:
    checked before the frame is buffered whole or decoded."""

    max_frame: int = MAX_FRAME
    max_items: int = 65536


CONTROL = FrameLimits()
# A peer that has not proved it is paired sends Hello and the pairing exchange: well under
# 2 KiB. At 4 MiB, one frame of nested empty arrays decoded to ~300 MB of Python lists and
# held the agent's loop for ~2 s (docs/SECURITY.md); 16 KiB decode to under 1 MB, at once.
UNPAIRED = FrameLimits(max_frame=16 * 1024, max_items=256)


def _unpackb(body: bytes, limits: FrameLimits = CONTROL) -> Any:
    # The frame length is already capped; these limits bound what one frame may expand to.
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        use_list=True,
        ext_hook=_no_ext,
        max_buffer_size=limits.max_frame,
        max_str_len=limits.max_frame,
        max_bin_len=limits.max_frame,
        max_array_len=limits.max_items,
        max_map_len=limits.max_items,
        max_ext_len=0,
    )
    try:
        unpacker.feed(body)
        obj = unpacker.unpack()
        if unpacker.tell() != len(body):
            raise ProtocolError(ErrorCode.BAD_FRAME, "trailing bytes after the msgpack object")
        return obj
    except msgpack.OutOfData:
        raise ProtocolError(ErrorCode.BAD_FRAME, "truncated msgpack object") from None
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame is not valid msgpack: {exc}") from None


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(ErrorCode.BAD_FRAME, f"msgpack ext type {code} is not allowed")


def encode_frame(obj: Any) -> bytes:
    """Header and body as one bytes object, so a frame is one write."""
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def _check_length(n: int, limit: int = MAX_FRAME) -> None:
    if n > limit:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame length {n} exceeds the {limit}-byte limit")


async def read_frame(reader: asyncio.StreamReader) -> Any | None:
    """Next decoded frame, or None on a clean end of stream between frames."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError(ErrorCode.BAD_FRAME, "stream ended inside a frame header") from None
        return None
    (n,) = _HEADER.unpack(header)
    _check_length(n)
    parts = []
    left = n
    try:
        while left:
            chunk = await reader.readexactly(min(left, _READ_CHUNK))
            parts.append(chunk)
            left -= len(chunk)
    except asyncio.IncompleteReadError:
        raise ProtocolError(ErrorCode.BAD_FRAME, "stream ended inside a frame") from None
    return _unpackb(b"".join(parts))


async def write_frame(writer: asyncio.StreamWriter, obj: Any) -> None:
    """Encode and send one frame, waiting for the transport to drain."""
    writer.write(encode_frame(obj))
    await writer.drain()


class FrameDecoder:
    """Incremental decoder: `feed` decodes all it can (the inference child's pipe);
    `push`, `ready` and `pop` decode one frame at a time (the control channel, which reads
    no further while a whole frame waits)."""

    def __init__(self, limits: FrameLimits = CONTROL) -> None:
        self._buf = bytearray()
        self.limits = limits

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def push(self, data: bytes) -> None:
        self._buf += data

    def ready(self) -> bool:
        """A whole frame is buffered; ProtocolError if the next one is over the limit."""
        if len(self._buf) < _HEADER.size:
            return False
        (n,) = _HEADER.unpack_from(self._buf)
        _check_length(n, self.limits.max_frame)
        return len(self._buf) >= _HEADER.size + n

    def pop(self) -> Any:
        """Decode the whole frame `ready` saw (ProtocolError if it is not valid)."""
        (n,) = _HEADER.unpack_from(self._buf)
        body = bytes(self._buf[_HEADER.size : _HEADER.size + n])
        del self._buf[: _HEADER.size + n]
        return _unpackb(body, self.limits)

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes; return every complete frame they finish."""
        self.push(data)
        out = []
        while self.ready():
            out.append(self.pop())
        return out

    def take_rest(self) -> bytes:
        """The bytes after the last complete frame (the start of a stream that follows)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest
