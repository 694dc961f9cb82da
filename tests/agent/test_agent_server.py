"""A real corral-agent process: hello, inventory, worker control, and hostile input."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Iterator

import msgpack
import pytest

from corral.engine.localagents import LocalAgents
from corral.engine.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    ErrorReply,
    Hello,
    Inventory,
    InventoryRequest,
    encode_frame,
    from_wire,
    read_frame,
    to_wire,
)
from corral.engine.runtime.agent_client import AgentClient
from corral.engine.runtime.errors import AgentRequestFailed, AgentUnreachable
from corral.engine.security.desktop import desktop_keys


@pytest.fixture(scope="module")
def agent() -> Iterator[str]:
    with LocalAgents(1) as agents:
        yield agents.addresses[0]


def _hello() -> bytes:
    return encode_frame(
        to_wire(
            Hello(role="desktop", proto_major=PROTOCOL_VERSION[0], proto_minor=PROTOCOL_VERSION[1])
        )
    )


async def _open(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection with this (paired) desktop's certificate: hostile input from a
    desktop the agent trusts still must not hurt it."""
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host, int(port), ssl=desktop_keys().ctx)


async def _handshake(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _open(address)
    writer.write(_hello())
    assert isinstance(from_wire(await read_frame(reader)), Hello)
    return reader, writer


def test_inventory_reports_a_cpu_only_host_cleanly(agent: str) -> None:
    async def run() -> None:
        client = AgentClient(agent)
        hello = await client.connect()
        assert hello.role == "agent" and hello.rpc_proto.startswith("7.")
        inv = await client.inventory()
        await client.close()
        assert inv.gpus == ()
        assert "no NVIDIA driver" in inv.nvml or inv.nvml == "ok"
        assert inv.ram_total > 0 and inv.cpu_count > 0
        assert [d.name for d in inv.devices if d.type == "cpu"] == ["CPU"]
        assert inv.worker.state == "stopped"

    asyncio.run(run())


def test_worker_starts_answers_and_stops(agent: str) -> None:
    async def run() -> None:
        client = AgentClient(agent)
        await client.connect()
        state = await client.start_rpc(threads=1)
        # no endpoint on the network: the worker is reached only through the tunnel
        assert state.state == "running" and state.endpoint == ""
        tunnel = client.open_tunnel()
        assert tunnel.probe()[0] == 7
        tunnel.close()
        again = await client.start_rpc(threads=1)
        assert again.pid == state.pid  # same settings: the running worker is reused
        stopped = await client.stop_rpc()
        assert stopped.state == "stopped"
        await client.close()

    asyncio.run(run())


def test_unknown_device_is_refused_with_what_exists(agent: str) -> None:
    async def run() -> None:
        client = AgentClient(agent)
        await client.connect()
        with pytest.raises(AgentRequestFailed, match=r"no device CUDA7.*it has CPU"):
            await client.start_rpc(devices=("CUDA7",))
        await client.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack(">I", 0xFFFFFFFF),  # oversize length
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # not msgpack
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # a stray HTTP client
    ],
    ids=["oversize", "garbage", "http"],
)
def test_malformed_frames_get_an_error_or_a_close_and_the_agent_keeps_serving(
    agent: str, payload: bytes
) -> None:
    async def run() -> None:
        other_reader, other_writer = await _handshake(agent)  # a bystander session
        reader, writer = await _handshake(agent)
        writer.write(payload)
        reply = await asyncio.wait_for(read_frame(reader), 10)
        assert isinstance(from_wire(reply), ErrorReply)
        assert from_wire(reply).code == ErrorCode.BAD_FRAME  # type: ignore[attr-defined]
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and then it hangs up
        other_writer.write(encode_frame(to_wire(InventoryRequest(req=5))))
        inv = from_wire(await asyncio.wait_for(read_frame(other_reader), 30))
        assert isinstance(inv, Inventory) and inv.req == 5
        other_writer.close()

    asyncio.run(run())


def test_bad_message_in_good_frame_is_answered_and_the_connection_lives(agent: str) -> None:
    async def run() -> None:
        reader, writer = await _handshake(agent)
        writer.write(encode_frame([8, {"req": 9, "threads": "many"}]))
        err = from_wire(await read_frame(reader))
        assert isinstance(err, ErrorReply) and err.req == 9 and err.code == ErrorCode.BAD_MESSAGE
        writer.write(encode_frame(to_wire(InventoryRequest(req=10))))
        assert isinstance(from_wire(await read_frame(reader)), Inventory)
        writer.close()

    asyncio.run(run())


def test_first_message_must_be_hello(agent: str) -> None:
    async def run() -> None:
        reader, writer = await _open(agent)
        writer.write(encode_frame(to_wire(InventoryRequest(req=1))))
        err = from_wire(await read_frame(reader))
        assert isinstance(err, ErrorReply) and err.code == ErrorCode.NOT_READY
        writer.close()

    asyncio.run(run())


def test_protocol_major_mismatch_names_both_versions(agent: str) -> None:
    async def run() -> None:
        reader, writer = await _open(agent)
        writer.write(encode_frame(to_wire(Hello(role="desktop", proto_major=99, proto_minor=0))))
        assert isinstance(from_wire(await read_frame(reader)), Hello)
        err = from_wire(await read_frame(reader))
        assert isinstance(err, ErrorReply) and err.code == ErrorCode.VERSION_MISMATCH
        assert "99.0" in err.message and f"{PROTOCOL_VERSION[0]}." in err.message
        writer.close()

    asyncio.run(run())


def test_raw_msgpack_without_a_frame_header_is_refused(agent: str) -> None:
    host, _, port = agent.rpartition(":")
    data = b""
    raw = socket.create_connection((host, int(port)), timeout=10)
    with desktop_keys().ctx.wrap_socket(raw) as sock:
        try:
            sock.sendall(msgpack.packb([1, {"role": "desktop"}]) * 100000)  # ~1.7 MB of junk
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            pass  # the agent hung up while we were still sending: also a refusal
    assert data == b"" or b"exceeds" in data

    async def still_serving() -> None:
        client = AgentClient(agent)
        await client.connect()
        await client.ping()
        await client.close()

    asyncio.run(still_serving())


def test_unreachable_agent_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before we connect: nothing listens there

    async def run() -> None:
        with pytest.raises(AgentUnreachable, match="is corral-agent running"):
            await AgentClient(f"127.0.0.1:{port}").connect()

    asyncio.run(run())
