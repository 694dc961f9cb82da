"""The frame codec and message registry (pure functions: no sockets needed)."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest

from corral.engine.protocol import (
    MAX_FRAME,
    ErrorCode,
    FrameDecoder,
    GpuInfo,
    Hello,
    Inventory,
    ProtocolError,
    StartRpc,
    WorkerState,
    encode_frame,
    from_wire,
    read_frame,
    to_wire,
)
from corral.engine.protocol.messages import CONTROL_MESSAGES


def _decode_one(data: bytes) -> object:
    frames = FrameDecoder().feed(data)
    assert len(frames) == 1
    return frames[0]


def test_round_trip_with_nested_records() -> None:
    inv = Inventory(
        req=7,
        agent_id="a",
        hostname="h",
        gpus=(GpuInfo(index=0, name="H200", memory_total=10, memory_free=5, power_w=300.5),),
        worker=WorkerState(state="running", endpoint="10.0.0.2:5000", devices=("CUDA0",)),
    )
    assert from_wire(_decode_one(encode_frame(to_wire(inv)))) == inv


def test_unknown_fields_are_ignored_and_missing_take_defaults() -> None:
    wire = [StartRpc.TYPE, {"req": 3, "from_the_future": [1, 2]}]
    assert from_wire(wire) == StartRpc(req=3)


def test_missing_required_field_is_a_bad_message() -> None:
    with pytest.raises(ProtocolError) as err:
        from_wire([Hello.TYPE, {"role": "desktop", "proto_major": 1}])
    assert err.value.code == ErrorCode.BAD_MESSAGE
    assert "proto_minor" in err.value.message


@pytest.mark.parametrize(
    "wire",
    [
        {"not": "a list"},
        [9999, {}],
        [StartRpc.TYPE, {"req": "seven"}],
        [StartRpc.TYPE, {"req": True}],  # bool is not an int on the wire
        [StartRpc.TYPE, {"req": 1, "devices": "CUDA0"}],
        [StartRpc.TYPE, {"req": 1, "devices": [1, 2]}],
        [StartRpc.TYPE, []],
    ],
)
def test_malformed_messages_are_rejected(wire: object) -> None:
    with pytest.raises(ProtocolError) as err:
        from_wire(wire)
    assert err.value.code == ErrorCode.BAD_MESSAGE


def test_registry_numbers_are_unique_and_stable() -> None:
    assert len(set(CONTROL_MESSAGES.types)) == len(CONTROL_MESSAGES.types)
    assert CONTROL_MESSAGES.types[1] is Hello  # never renumber


def test_oversize_length_is_refused_before_reading_the_body() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as err:
        decoder.feed(struct.pack(">I", MAX_FRAME + 1))  # no body at all: it must not wait for it
    assert err.value.code == ErrorCode.BAD_FRAME


def test_stream_reader_refuses_oversize_frames() -> None:
    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack(">I", 0xFFFFFFFF))
        with pytest.raises(ProtocolError):
            await read_frame(reader)

    asyncio.run(run())


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        msgpack.packb(msgpack.ExtType(5, b"xx")),
        msgpack.packb({1: "int keys are not allowed"}),
        msgpack.packb([1, 2]) + b"\x00",  # trailing garbage
        b"\x92\x01",  # truncated array
    ],
)
def test_garbage_bodies_are_bad_frames(body: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert err.value.code == ErrorCode.BAD_FRAME


def test_decoder_reassembles_frames_split_anywhere() -> None:
    data = encode_frame(["a"]) + encode_frame({"op": "b"}) + encode_frame(3)
    decoder = FrameDecoder()
    out: list[object] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == [["a"], {"op": "b"}, 3]


def test_encoding_an_oversize_frame_fails_loudly() -> None:
    with pytest.raises(ProtocolError):
        encode_frame(b"x" * (MAX_FRAME + 1))
