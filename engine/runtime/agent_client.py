"""A control connection to one corral-agent: hello, requests by number, pushed events."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

import corral
from corral.engine.protocol import (
    PROTOCOL_VERSION,
    AgentEvent,
    CapabilityQuestion,
    CapabilityReply,
    CapabilityRequest,
    ErrorReply,
    Hello,
    Inventory,
    InventoryRequest,
    Message,
    Ping,
    ProtocolError,
    StartRpc,
    StopRpc,
    Subscribe,
    WorkerReply,
    WorkerState,
    encode_frame,
    from_wire,
    read_frame,
    to_wire,
)

from .errors import AgentRequestFailed, AgentTimeout, AgentUnreachable

log = logging.getLogger(__name__)


def parse_address(text: str, default_port: int = 7340) -> tuple[str, int]:
    """HOST[:PORT] or [V6]:PORT → (host, port); ValueError says what is wrong."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 192.168.1.20:7340)")
    return host, int(port)


class AgentClient:
    """One connection; `request()` awaits the reply with the same number."""

    def __init__(
        self, address: str, on_event: Callable[[AgentClient, AgentEvent], None] | None = None
    ):
        self.address = address
        self.host, self.port = parse_address(address)
        self.hello: Hello | None = None
        self._on_event = on_event
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._numbers = itertools.count(1)
        self._read_task: asyncio.Task[None] | None = None
        self.closed_reason = ""

    @property
    def name(self) -> str:
        host = self.hello.hostname if self.hello and self.hello.hostname else ""
        return f"{host} ({self.address})" if host else self.address

    async def connect(self, timeout: float = 5.0) -> Hello:
        """Open the connection and exchange hello; AgentUnreachable says why not."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), timeout
            )
        except TimeoutError:
            raise AgentUnreachable(
                f"agent {self.address} did not accept a connection within {timeout:.0f} s: "
                "check the address and that the host is up"
            ) from None
        except OSError as exc:
            raise AgentUnreachable(
                f"cannot reach agent {self.address}: {exc.strerror or exc}; "
                "is corral-agent running there and listening on that port?"
            ) from None
        ours = Hello(
            role="desktop",
            proto_major=PROTOCOL_VERSION[0],
            proto_minor=PROTOCOL_VERSION[1],
            corral_version=corral.__version__,
        )
        self._reader, self._writer = reader, writer
        writer.write(encode_frame(to_wire(ours)))
        try:
            frame = await asyncio.wait_for(read_frame(reader), timeout)
            theirs = from_wire(frame) if frame is not None else None
        except (TimeoutError, ProtocolError, OSError) as exc:
            await self.close()
            raise AgentUnreachable(
                f"{self.address} did not answer as a Corral agent ({exc})"
            ) from None
        if isinstance(theirs, ErrorReply):
            await self.close()
            raise AgentUnreachable(f"agent {self.address} refused the connection: {theirs.message}")
        if not isinstance(theirs, Hello):
            await self.close()
            raise AgentUnreachable(f"{self.address} did not answer as a Corral agent")
        if theirs.proto_major != PROTOCOL_VERSION[0]:
            await self.close()
            raise AgentUnreachable(
                f"agent {self.address} speaks Corral protocol {theirs.proto_major}."
                f"{theirs.proto_minor}, this desktop {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}: "
                "install the same Corral version on both"
            )
        self.hello = theirs
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop())
        return theirs

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                frame = await read_frame(self._reader)
                if frame is None:
                    self.closed_reason = "the agent closed the connection"
                    break
                msg = from_wire(frame)
                if isinstance(msg, AgentEvent):
                    if self._on_event is not None:
                        self._on_event(self, msg)
                    continue
                req = getattr(msg, "req", 0)
                fut = self._pending.pop(req, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                elif isinstance(msg, ErrorReply):
                    self.closed_reason = msg.message
        except (ProtocolError, OSError) as exc:
            self.closed_reason = str(exc)
        except asyncio.CancelledError:
            self.closed_reason = "closed"
            raise
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(
                        AgentUnreachable(
                            f"lost the connection to agent {self.address}: "
                            f"{self.closed_reason or 'closed'}"
                        )
                    )
            self._pending.clear()

    async def request(self, build: Callable[[int], Message], timeout: float = 30.0) -> Message:
        """Send `build(req)` and await its reply; an ErrorReply raises AgentRequestFailed."""
        if self._writer is None or self._read_task is None or self._read_task.done():
            raise AgentUnreachable(f"not connected to agent {self.address}")
        req = next(self._numbers)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        self._writer.write(encode_frame(to_wire(build(req))))
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._pending.pop(req, None)
            raise AgentTimeout(
                f"agent {self.address} did not answer within {timeout:g} s"
            ) from None
        if isinstance(reply, ErrorReply):
            raise AgentRequestFailed(f"agent {self.name}: {reply.message}")
        return reply

    async def inventory(self) -> Inventory:
        reply = await self.request(lambda r: InventoryRequest(req=r))
        assert isinstance(reply, Inventory)
        return reply

    async def start_rpc(self, devices: tuple[str, ...] = (), threads: int = 0) -> WorkerState:
        reply = await self.request(lambda r: StartRpc(req=r, devices=devices, threads=threads), 90)
        assert isinstance(reply, WorkerReply)
        return reply.worker

    async def stop_rpc(self) -> WorkerState:
        reply = await self.request(lambda r: StopRpc(req=r))
        assert isinstance(reply, WorkerReply)
        return reply.worker

    async def capabilities(
        self, device: str, questions: tuple[CapabilityQuestion, ...]
    ) -> tuple[bool, ...]:
        reply = await self.request(
            lambda r: CapabilityRequest(req=r, device=device, questions=questions), 150
        )
        assert isinstance(reply, CapabilityReply)
        return reply.answers

    async def subscribe(self) -> None:
        await self.request(lambda r: Subscribe(req=r))

    async def wait_lost(self, timeout: float) -> bool:
        """Wait up to `timeout` for the connection to end; True if it did (the reason is in
        `closed_reason`). A heartbeat sleeps in here, so a dead agent is noticed at once."""
        if self._read_task is None:
            return True
        done, _ = await asyncio.wait({self._read_task}, timeout=timeout)
        return bool(done)

    async def ping(self) -> None:
        await self.ping_within(5.0)

    async def ping_within(self, timeout: float) -> None:
        """A heartbeat: AgentUnreachable when no Pong comes back in time."""
        try:
            await self.request(lambda r: Ping(req=r), timeout=timeout)
        except AgentTimeout:
            raise AgentTimeout(
                f"agent {self.address} missed a heartbeat (no answer within {timeout:g} s)"
            ) from None

    async def close(self) -> None:
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._read_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.wait_closed(), 2)
