"""A control connection to one corral-agent: hello, requests by number, pushed events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import ssl
from collections.abc import Callable

import corral
from corral.engine.aio import within
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
    Unpair,
    WorkerReply,
    WorkerState,
    from_wire,
    to_wire,
)
from corral.engine.security import channel
from corral.engine.security.channel import TlsConnection, TlsFailed
from corral.engine.security.desktop import DesktopKeys, desktop_keys
from corral.engine.security.identity import short
from corral.engine.security.pairing import (
    PairingRefused,
    check_code_text,
    pair_with_agent,
)
from corral.engine.security.pins import Peer
from corral.engine.security.tunnel import BlockingTls, DesktopTunnel, open_tunnel_channel

from .errors import (
    AgentRequestFailed,
    AgentTimeout,
    AgentUnreachable,
    NotPaired,
    PairingFailed,
    RuntimeFailure,
)

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
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 192.168.1.20:7340)")
    return host, int(port)


_NOT_ACCEPTED = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "DECRYPT_ERROR",
)
# A ping every second, each with 3 s to answer: a host that went silent (a pulled cable, a
# firewall that drops) is declared lost within 4 s, inside the agent's 8 s lease timeout and
# the 10 s a user waits before calling it a hang. A busy agent answers pings from its own
# event loop, apart from the worker, so load does not delay them.
_KEEPALIVE = 1.0
HEARTBEAT_DEADLINE = 3.0


def _pair_command(address: str) -> str:
    return (
        f"run `corral-agent pair` on that host and then `corral pair {address} --code CODE` "
        "here (or pair it in the app)"
    )


class AgentClient:
    """One TLS connection to a paired agent; `request()` awaits the reply with the same number."""

    def __init__(
        self,
        address: str,
        on_event: Callable[[AgentClient, AgentEvent], None] | None = None,
        keys: DesktopKeys | None = None,
        on_lost: Callable[[AgentClient], None] | None = None,
    ):
        self.address = address
        self.host, self.port = parse_address(address)
        self.hello: Hello | None = None
        self.peer: Peer | None = None  # the pinned agent this connection proved to be
        self._keys = keys
        self._on_event = on_event
        self._on_lost = on_lost
        self._conn: TlsConnection | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._numbers = itertools.count(1)
        self._read_task: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self.closed_reason = ""

    @property
    def keys(self) -> DesktopKeys:
        if self._keys is None:
            self._keys = desktop_keys()
        return self._keys

    @property
    def name(self) -> str:
        host = self.hello.hostname if self.hello and self.hello.hostname else ""
        return f"{host} ({self.address})" if host else self.address

    def _desktop_hello(self) -> Hello:
        return Hello(
            role="desktop",
            proto_major=PROTOCOL_VERSION[0],
            proto_minor=PROTOCOL_VERSION[1],
            corral_version=corral.__version__,
            hostname=self.keys.identity.name,
        )

    async def _open(self, ctx: ssl.SSLContext, timeout: float) -> TlsConnection:
        try:
            return await channel.connect(ctx, self.host, self.port, timeout)
        except TimeoutError:
            raise AgentUnreachable(
                f"agent {self.address} did not accept a connection within {timeout:.0f} s: "
                "check the address and that the host is up"
            ) from None
        except TlsFailed as exc:
            raise AgentUnreachable(
                f"{self.address} did not complete a TLS handshake ({exc.reason}): is it a "
                f"Corral agent of version {corral.__version__}?"
            ) from None
        except OSError as exc:
            raise AgentUnreachable(
                f"cannot reach agent {self.address}: {exc.strerror or exc}; "
                "is corral-agent running there and listening on that port?"
            ) from None

    async def _exchange_hello(self, conn: TlsConnection, timeout: float) -> Hello:
        with contextlib.suppress(ConnectionError):
            # may already be refused (the agent's alert came first): recv says why
            conn.send(to_wire(self._desktop_hello()))
        try:
            frame = await within(conn.recv(), timeout)
            theirs = from_wire(frame) if frame is not None else None
        except TlsFailed as exc:
            if any(k in exc.reason.upper() for k in _NOT_ACCEPTED):
                raise NotPaired(
                    f"the agent at {self.address} does not accept this desktop (it was never "
                    f"paired, or was unpaired there): {_pair_command(self.address)}"
                ) from None
            raise AgentUnreachable(f"{self.address}: TLS failed ({exc.reason})") from None
        except (TimeoutError, ProtocolError, OSError) as exc:
            raise AgentUnreachable(
                f"{self.address} did not answer as a Corral agent ({exc or 'no answer'})"
            ) from None
        if isinstance(theirs, ErrorReply):
            raise AgentUnreachable(f"agent {self.address} refused the connection: {theirs.message}")
        if not isinstance(theirs, Hello):
            raise AgentUnreachable(f"{self.address} did not answer as a Corral agent")
        if theirs.proto_major != PROTOCOL_VERSION[0]:
            raise AgentUnreachable(
                f"agent {self.address} speaks Corral protocol {theirs.proto_major}."
                f"{theirs.proto_minor}, this desktop {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}: "
                "install the same Corral version on both"
            )
        return theirs

    async def connect(self, timeout: float = 5.0) -> Hello:
        """Open the connection, check the agent is one this desktop paired with, exchange
        hello. AgentUnreachable (or NotPaired) says why not."""
        conn = await self._open(self.keys.ctx, timeout)
        try:
            fp = conn.peer_fingerprint
            peer = self.keys.agent(fp)
            if peer is None:
                raise NotPaired(
                    f"this desktop has not paired with the agent at {self.address} "
                    f"(certificate {short(fp)}): {_pair_command(self.address)}",
                    fp,
                )
            theirs = await self._exchange_hello(conn, timeout)
        except BaseException:
            conn.abort()
            raise
        self.peer = peer
        self._conn = conn
        # the pinned id wins: mDNS and hello are not trusted for identity
        self.hello = dataclasses.replace(theirs, agent_id=peer.peer_id or theirs.agent_id)
        loop = asyncio.get_running_loop()
        self._read_task = loop.create_task(self._read_loop())
        self._keepalive = loop.create_task(self._keep_alive())
        return self.hello

    async def pair(self, code: str, timeout: float = 10.0) -> Peer:
        """Pair with the agent using the code it shows (the desktop's half of
        security/pairing.py); pin it and return the pin. PairingFailed says why not."""
        try:
            check_code_text(code)
        except ValueError as exc:  # before connecting: a typo costs the agent no try
            raise PairingFailed(str(exc)) from None
        keys = self.keys
        conn = await self._open(keys.pairing_ctx, timeout)
        try:
            fp_agent = conn.peer_fingerprint
            agent_der = conn.peer_der
            theirs = await self._exchange_hello(conn, timeout)
            done = await pair_with_agent(
                _PairingConn(conn, self.address),
                code,
                keys.identity,
                fp_agent,
                f"agent {self.address}",
                timeout,
            )
        except PairingRefused as exc:
            raise PairingFailed(str(exc)) from None
        finally:
            conn.close()
        peer = Peer(
            fingerprint=fp_agent,
            name=done.hostname or theirs.hostname,
            cert_der=agent_der,
            peer_id=done.agent_id,
            address=self.address,
        )
        keys.pins.add(peer)
        return peer

    async def unpair(self) -> None:
        """Ask the agent to forget this desktop (when reachable), then forget it here."""
        fp = self.peer.fingerprint if self.peer else ""
        if self._conn is not None:
            with contextlib.suppress(RuntimeFailure):
                await self.request(lambda r: Unpair(req=r), timeout=5)
        if fp:
            self.keys.pins.remove(fp)

    def open_tunnel(self) -> DesktopTunnel:
        """A loopback endpoint for the inference child that reaches this agent's worker
        through the authenticated channel (the worker must be started by this client)."""
        assert self.peer is not None, "connect first"
        keys, peer, host, port = self.keys, self.peer, self.host, self.port
        hello = self._desktop_hello()

        def open_channel() -> BlockingTls:
            return open_tunnel_channel(keys.ctx, host, port, peer.fingerprint, hello)

        return DesktopTunnel(open_channel, self.name)

    async def _keep_alive(self) -> None:
        """A ping now and then, so the agent knows this session (and its lease) is alive, and
        this desktop knows the agent is: a missed deadline ends the connection, as a closed
        one would (TCP alone takes many minutes to give up on a silent peer)."""
        while True:
            await asyncio.sleep(_KEEPALIVE)
            try:
                await self.request(lambda r: Ping(req=r), timeout=HEARTBEAT_DEADLINE)
            except AgentTimeout:
                self._lose(
                    f"no answer to a heartbeat within {HEARTBEAT_DEADLINE:g} s "
                    "(the host or the network between went silent)"
                )
                return
            except RuntimeFailure:
                return  # the read loop saw the end and says why

    def _lose(self, reason: str) -> None:
        """Give up on the connection now: pending requests fail with `reason`."""
        if not self.closed_reason:
            self.closed_reason = reason
        if self._read_task is not None:
            self._read_task.cancel()
        if self._conn is not None:
            self._conn.abort()

    async def _read_loop(self) -> None:
        assert self._conn is not None
        try:
            while True:
                frame = await self._conn.recv()
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
        except TlsFailed as exc:
            self.closed_reason = (
                "the agent no longer accepts this desktop (unpaired there)"
                if any(k in exc.reason.upper() for k in _NOT_ACCEPTED)
                else f"TLS failed ({exc.reason})"
            )
        except (ProtocolError, OSError) as exc:
            self.closed_reason = str(exc) or type(exc).__name__
        except asyncio.CancelledError:
            self.closed_reason = self.closed_reason or "closed"
            raise
        finally:
            if self._on_lost is not None:
                self._on_lost(self)
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
        if self._conn is None or self._read_task is None or self._read_task.done():
            raise AgentUnreachable(
                f"not connected to agent {self.address}"
                + (f": {self.closed_reason}" if self.closed_reason else "")
            )
        req = next(self._numbers)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        try:
            self._conn.send(to_wire(build(req)))
        except ConnectionError:
            self._pending.pop(req, None)
            raise AgentUnreachable(f"lost the connection to agent {self.address}") from None
        try:
            reply = await within(fut, timeout)
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

    async def ping_echo(self, n: int, timeout: float = 30.0) -> int:
        """A ping whose answer carries `n` bytes back (timing the link): the bytes that came."""
        reply = await self.request(lambda r: Ping(req=r, echo=n), timeout=timeout)
        return len(getattr(reply, "pad", b""))

    async def ping_within(self, timeout: float) -> None:
        """A heartbeat: AgentUnreachable when no Pong comes back in time."""
        try:
            await self.request(lambda r: Ping(req=r), timeout=timeout)
        except AgentTimeout:
            raise AgentTimeout(
                f"agent {self.address} missed a heartbeat (no answer within {timeout:g} s)"
            ) from None

    async def close(self) -> None:
        for task in (self._keepalive, self._read_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._conn is not None:
            self._conn.close()


class _PairingConn:
    """The connection `pair` opened, as pairing's channel: a transport failure or a closed
    connection is a PairingRefused that names the agent."""

    def __init__(self, conn: TlsConnection, address: str) -> None:
        self._conn, self._address = conn, address

    def send(self, msg: Message) -> None:
        self._conn.send(to_wire(msg))

    async def recv(self, timeout: float) -> Message | None:
        try:
            frame = await within(self._conn.recv(), timeout)
        except (TimeoutError, TlsFailed, OSError) as exc:
            raise PairingRefused(f"agent {self._address} stopped answering ({exc})") from None
        return None if frame is None else from_wire(frame)
