"""The agent's control server: TLS with pinned desktops, pairing, leases, the RPC tunnel.

Every connection is TLS 1.3. A desktop with a pinned certificate gets the full protocol; a
desktop without a certificate may only say hello and pair; an unknown certificate fails the
handshake. One desktop connection at a time holds the lease on the worker (StartRpc takes
it; StopRpc, closing that connection, or `LEASE_TIMEOUT` of silence releases it), and only
the holder's desktop may open tunnels to the worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import corral
from corral.discovery import Advertiser, AgentHints
from corral.engine.aio import within
from corral.engine.hostmem import read_memory
from corral.engine.procs import usable_cores, uses_openmp
from corral.engine.protocol import (
    CONTROL,
    ECHO_MAX,
    PROTOCOL_VERSION,
    UNPAIRED,
    AgentEvent,
    CapabilityReply,
    CapabilityRequest,
    DeviceInfo,
    ErrorCode,
    ErrorReply,
    Hello,
    Inventory,
    InventoryRequest,
    Message,
    OkReply,
    OpenTunnel,
    Ping,
    Pong,
    ProtocolError,
    StartRpc,
    StopRpc,
    Subscribe,
    TunnelOpen,
    Unpair,
    WorkerReply,
    WorkerState,
    encode_frame,
    from_wire,
    to_wire,
)
from corral.engine.security import identity as ident
from corral.engine.security.channel import TlsConnection
from corral.engine.security.pairing import (
    STEP_TIMEOUT,
    AgentSide,
    PairingGate,
    PairingRefused,
    answer_pairing,
)
from corral.engine.security.pins import Peer, PinStore
from corral.engine.security.tls import server_context
from corral.engine.security.tunnel import (
    RELAY_SHARE,
    Pump,
    relay_keys,
    relay_mode,
    relay_share,
    start_data_path,
    unix_connection,
)

from . import inventory
from .admin import AdminServer
from .config import WorkerSettings
from .supervisor import RpcSupervisor, WorkerStartError, replace_host

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 3.0  # a TLS 1.3 handshake is one round trip; anything slower is not a desktop
CLIENT_HELLO_TIMEOUT = 0.75  # a client sends its whole ClientHello with its first write
_HELLO_TIMEOUT = 10.0  # a paired desktop's first frame
# An unpaired connection's steps (its hello too) get pairing.STEP_TIMEOUT each: the code is
# typed before `corral pair` connects, so its messages follow each other at once.
# Slots. Connections still in the TLS handshake (at most 3 s each, 0.75 s without a
# ClientHello) are capped in all and per source address; once the handshake shows a pinned
# certificate a connection takes a paired slot, which strangers never hold; one without a
# certificate (pairing) takes one of few unpaired slots, also capped per source. So 130
# strangers that finish TLS and hold cannot keep a paired desktop out (docs/SECURITY.md).
_MAX_PAIRED = 256
_MAX_HANDSHAKING = 512
_MAX_HANDSHAKING_PER_SOURCE = 128
_MAX_UNPAIRED = 32
_MAX_UNPAIRED_PER_SOURCE = 4
_SUBSCRIBER_BACKLOG = 1024 * 1024  # drop a subscriber that stops reading this much
# A lease holder silent this long has lost its lease (and its tunnels): desktops ping every
# second, so this is eight missed pings; a desktop cut off by a partition frees the workers
# for others within 10 s.
LEASE_TIMEOUT = 8.0
# ...and one whose own desktop connects again after this long without a ping is taken over
# (that desktop declares an agent lost after 3-4 s without a pong)
SAME_DESKTOP_SILENCE = 3.0


def load_agent_id(state_dir: Path) -> str:
    """A stable id per agent identity, created on first start (atomic write)."""
    path = state_dir / "agent-id"
    try:
        value = path.read_text().strip()
        if value:
            return value
    except OSError:
        pass
    value = uuid.uuid4().hex
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value


@dataclass(eq=False)
class _Conn:
    """One control connection; `peer` is the paired desktop, None while it only may pair."""

    proto: TlsConnection
    peer: Peer | None
    last_seen: float = field(default_factory=time.monotonic)
    since: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.peer.name if self.peer else "an unpaired desktop"


class _PairingConn:
    """An unpaired connection as pairing's channel: messages in, messages out."""

    def __init__(self, server: AgentServer, conn: _Conn) -> None:
        self._server, self._conn = server, conn

    def send(self, msg: Message) -> None:
        with contextlib.suppress(ConnectionError):
            self._conn.proto.send(to_wire(msg))

    async def recv(self, timeout: float) -> Message | None:
        return await self._server._next(self._conn, timeout)


class AgentServer:
    """Serves control connections and tunnels on one asyncio loop (pumps run in threads)."""

    def __init__(
        self,
        host: str,
        port: int,
        state_dir: Path,
        advertise: bool = True,
        advertise_interfaces: tuple[str, ...] = (),
        pairing_code: str = "",
        trusted_network: bool = False,
        settings: WorkerSettings | None = None,
    ) -> None:
        self.host = host
        self.settings = settings or WorkerSettings()
        self.port = port
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.agent_id = load_agent_id(state_dir)
        self.identity = ident.load_or_create(state_dir / "identity", "agent")
        self.pins = PinStore(state_dir / "paired-desktops.json")
        self.gate = PairingGate(inventory.hostname())
        self._initial_code = pairing_code
        self.trusted_network = trusted_network
        direct = None
        if trusted_network:
            direct = host if host not in ("", "0.0.0.0", "::") else "0.0.0.0"
        self.supervisor = RpcSupervisor(
            state_dir, direct, self._worker_changed, drop_tunnels=self._drop_tunnels
        )
        self.supervisor.configure(self.settings)
        self._ctx = server_context(self.identity, [p.cert_der for p in self.pins.peers()])
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshaking: collections.Counter[str] = collections.Counter()  # by source
        self._strangers: collections.Counter[str] = collections.Counter()  # unpaired, by source
        self._subscribers: set[_Conn] = set()
        self._lease: _Conn | None = None
        self._pumps: set[Pump] = set()
        self._pumps_lock = threading.Lock()
        self._ggml: asyncio.Task[inventory.GgmlProbe] | None = None
        self._capability_cache: dict[tuple[str, str], dict[tuple[str, str, int, bool], bool]] = {}
        self._advertise = advertise
        self._advertise_interfaces = advertise_interfaces
        self.advertiser: Advertiser | None = None
        self._background: list[asyncio.Task[None]] = []
        self.admin = AdminServer(self)

    async def start(self) -> int:
        """Bind and serve; return the port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._ggml = loop.create_task(inventory.probe_ggml())
        self._server = await loop.create_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        await self.admin.start()
        self._background.append(loop.create_task(self._watch_lease()))
        if self._advertise:
            self.advertiser = Advertiser(await self._hints(), self.host, self._advertise_interfaces)
            await self.advertiser.start()
            self._background.append(loop.create_task(self._watch_inventory()))
        return self.port

    async def _hints(self) -> AgentHints:
        gpus, _ = await asyncio.get_running_loop().run_in_executor(None, inventory.read_gpus)
        return AgentHints(
            agent_id=self.agent_id,
            corral_version=corral.__version__,
            protocol=f"{PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}",
            gpu_count=len(gpus),
            vram_total=sum(g.memory_total for g in gpus),
            port=self.port,
        )

    async def _watch_inventory(self, every: float = 30.0) -> None:
        """Re-announce when the GPUs change (a card added, a driver loaded)."""
        while True:
            await asyncio.sleep(every)
            if self.advertiser is not None:
                try:
                    await self.advertiser.update(await self._hints())
                except Exception:  # a failed re-announce must not stop the agent
                    log.exception("re-announcing failed")

    async def close(self) -> None:
        # goodbye first, so desktops drop this host at once instead of seeing it offline
        for task in self._background:
            task.cancel()
        if self.advertiser is not None:
            with contextlib.suppress(Exception):
                await within(self.advertiser.close(), 3)
        await self.admin.close()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        self._drop_tunnels()
        await self.supervisor.close()
        if self._ggml is not None:
            self._ggml.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await within(self._server.wait_closed(), 2)

    def apply(self, settings: WorkerSettings) -> None:
        """New worker settings (a reloaded config): inventories show them at once; a running
        worker keeps its devices and threads until its holder starts it again."""
        if settings != self.settings:
            log.info("worker settings now %s", settings)
        self.settings = settings
        self.supervisor.configure(settings)

    async def _shared_devices(self) -> tuple[DeviceInfo, ...]:
        """The ggml devices this agent offers, with the configured reserve taken off."""
        s = self.settings
        return tuple(
            dataclasses.replace(d, memory_free=max(0, d.memory_free - s.reserve_bytes(d.name)))
            for d in (await self._probe()).devices
            if s.shares(d.name)
        )

    # ------------------------------------------------------------------ trust

    def reload_pins(self) -> None:
        """New connections check against the current pins (after pairing or unpairing)."""
        self._ctx = server_context(self.identity, [p.cert_der for p in self.pins.peers()])

    def forget(self, who: str) -> list[Peer]:
        """Unpair the desktops `who` names; their connections and tunnels end now."""
        gone = self.pins.remove(who)
        if gone:
            self.reload_pins()
            fps = {p.fingerprint for p in gone}
            for conn in list(self._conns):
                if conn.peer is not None and conn.peer.fingerprint in fps:
                    if conn is self._lease:
                        self._release("unpaired")
                    conn.proto.abort()
        return gone

    # ------------------------------------------------------------------ connections

    def _accept(self) -> TlsConnection:
        proto = TlsConnection(
            self._ctx,
            server_side=True,
            handshake_timeout=HANDSHAKE_TIMEOUT,
            hello_timeout=CLIENT_HELLO_TIMEOUT,
            limits=UNPAIRED,  # until the peer's certificate shows it is paired
        )
        task = asyncio.get_running_loop().create_task(self._serve(proto))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return proto

    async def _serve(self, proto: TlsConnection) -> None:
        conn: _Conn | None = None
        source = ""
        stranger = False  # holds an unpaired slot
        try:
            await asyncio.sleep(0)  # let connection_made run: the peer's address is known
            source = str(proto.peername[0]) if proto.peername else ""
            paired = sum(1 for c in self._conns if c.peer is not None)
            if (
                self._handshaking.total() >= _MAX_HANDSHAKING
                or self._handshaking[source] >= _MAX_HANDSHAKING_PER_SOURCE
                or paired >= _MAX_PAIRED
            ):
                proto.abort()
                return
            self._handshaking[source] += 1
            try:
                await proto.handshake
            except (ConnectionError, OSError):
                return
            finally:
                self._handshaking[source] -= 1
            fp = proto.peer_fingerprint
            peer = self.pins.find(fp) if fp else None
            if fp and peer is None:  # verified by OpenSSL, but unpaired since
                proto.abort()
                return
            if peer is None:
                if (
                    self._strangers.total() >= _MAX_UNPAIRED
                    or self._strangers[source] >= _MAX_UNPAIRED_PER_SOURCE
                ):
                    proto.abort()
                    return
                self._strangers[source] += 1
                stranger = True
            else:
                proto.limits = CONTROL
            conn = _Conn(proto, peer)
            self._conns.add(conn)
            await self._session(conn)
        except ProtocolError as exc:
            log.warning("closing %s: %s", proto.peername, exc.message)
            self._send_error(proto, 0, exc.code, exc.message)
        except (ConnectionError, OSError, TimeoutError, asyncio.CancelledError):
            pass
        except Exception:  # a bug must not take the agent down; log it, drop this connection
            log.exception("internal error serving %s", proto.peername)
            self._send_error(proto, 0, ErrorCode.INTERNAL, "internal agent error; see its log")
        finally:
            if stranger:
                self._strangers[source] -= 1
            for counts in (self._handshaking, self._strangers):
                if counts.get(source, 1) <= 0:
                    del counts[source]
            if conn is not None:
                self._conns.discard(conn)
                self._subscribers.discard(conn)
                if conn is self._lease:
                    self._release(f"{conn.name} disconnected")
            proto.close()

    def _send_error(self, proto: TlsConnection, req: int, code: ErrorCode, message: str) -> None:
        with contextlib.suppress(Exception):
            proto.send(to_wire(ErrorReply.of(req, code, message)))

    async def _next(self, conn: _Conn, timeout: float) -> Message | None:
        frame = await within(conn.proto.recv(), timeout)
        if frame is None:
            return None
        conn.last_seen = time.monotonic()
        return from_wire(frame)

    async def _session(self, conn: _Conn) -> None:
        first = await self._next(conn, _HELLO_TIMEOUT if conn.peer else STEP_TIMEOUT)
        if first is None:
            return
        if not isinstance(first, Hello):
            raise ProtocolError(ErrorCode.NOT_READY, "the first message must be hello")
        conn.proto.send(to_wire(await self._hello()))
        if first.proto_major != PROTOCOL_VERSION[0]:
            raise ProtocolError(
                ErrorCode.VERSION_MISMATCH,
                f"this agent speaks Corral protocol {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}, "
                f"the peer {first.proto_major}.{first.proto_minor}: upgrade the older side",
            )
        if conn.peer is None:
            await self._pairing(conn)
            return
        sockname = conn.proto.transport.get_extra_info("sockname") if conn.proto.transport else None
        local_host = str(sockname[0]) if sockname else self.host
        while True:
            frame = await conn.proto.recv()
            if frame is None:
                return
            conn.last_seen = time.monotonic()
            try:
                msg = from_wire(frame)
                if isinstance(msg, OpenTunnel):
                    if await self._open_tunnel(conn, msg):
                        return  # the connection now belongs to a pump
                    continue
                reply = await self._handle(msg, conn, local_host)
            except ProtocolError as exc:
                # framing is intact: answer and keep the connection
                reply = ErrorReply.of(_req_of(frame), exc.code, exc.message)
            conn.proto.send(to_wire(reply))

    # ------------------------------------------------------------------ pairing

    async def _pairing(self, conn: _Conn) -> None:
        """An unpaired desktop: the agent's half of pairing (security/pairing.py)."""
        side = AgentSide(
            gate=self.gate,
            fingerprint=self.identity.fingerprint,
            agent_id=self.agent_id,
            hostname=inventory.hostname(),
            port=self.port,
            save=self._keep_pin,
        )
        try:
            peer = await answer_pairing(_PairingConn(self, conn), side)
        except PairingRefused as exc:
            log.warning("pairing from %s: %s", conn.proto.peername, exc)
            return
        if peer is not None:
            log.info("paired with %s (%s)", peer.name, ident.short(peer.fingerprint))
            await conn.proto.drain(2.0)

    def _keep_pin(self, peer: Peer) -> None:
        self.pins.add(peer)
        self.reload_pins()

    # ------------------------------------------------------------------ requests

    async def _hello(self) -> Hello:
        probe = await self._probe()
        features = ["tls-pinned", "pairing-spake2", "rpc-tunnel"]
        if relay_mode() != "python":
            features.append("rpc-relay")
        if self.trusted_network:
            features.append("rpc-direct")
        return Hello(
            role="agent",
            proto_major=PROTOCOL_VERSION[0],
            proto_minor=PROTOCOL_VERSION[1],
            corral_version=corral.__version__,
            llama_version=str(probe.build.get("llama_cpp_python", "")),
            llama_commit=str(probe.build.get("ggml_commit", "")),
            rpc_proto=str(probe.build.get("rpc_proto", "")),
            features=tuple(features),
            agent_id=self.agent_id,
            hostname=inventory.hostname(),
        )

    async def _probe(self) -> inventory.GgmlProbe:
        assert self._ggml is not None
        return await asyncio.shield(self._ggml)

    def _holds_lease(self, conn: _Conn, holder: _Conn | None) -> bool:
        """Whether `holder` still holds the lease, for `conn`'s desktop, on a running worker."""
        return (
            holder is not None
            and self._lease is holder
            and holder.peer is not None
            and conn.peer is not None
            and holder.peer.fingerprint == conn.peer.fingerprint
            and self.supervisor.running
        )

    def _in_use(self, conn: _Conn, req: int) -> ErrorReply | None:
        """The refusal for `conn` when another session holds the lease.

        A holder from the same desktop that has missed SAME_DESKTOP_SILENCE s of pings is a
        session that desktop already counts as lost (it gives up after 3-4 s): its lease is
        released for the new one at once, not after LEASE_TIMEOUT (a link that came back
        was refused for ~6.5 s for a session already dead)."""
        holder = self._lease
        if holder is None or holder is conn:
            return None
        silent = time.monotonic() - holder.last_seen
        same = holder.peer is not None and conn.peer is not None
        same = same and holder.peer.fingerprint == conn.peer.fingerprint  # type: ignore[union-attr]
        if same and silent >= SAME_DESKTOP_SILENCE:
            self._release(f"{holder.name} silent for {silent:.1f} s, and back on a new connection")
            holder.proto.abort()
            return None
        since = time.strftime("%H:%M", time.localtime(holder.since))
        who = holder.name + (" (another Corral session on that desktop)" if same else "")
        heard = f", last heard {silent:.0f} s ago" if silent >= 2 else ""
        return ErrorReply.of(
            req,
            ErrorCode.IN_USE,
            f"the workers of {inventory.hostname()} are in use by {who} since {since}{heard}; "
            "they are free when that session ends",
        )

    async def _handle(self, msg: Message, conn: _Conn, local_host: str) -> Message:
        """The reply to one request of a paired desktop (by _HANDLERS, below the class)."""
        handler = _HANDLERS.get(type(msg))
        if handler is not None:
            return await handler(self, msg, conn, local_host)
        if isinstance(msg, Hello):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello was already exchanged")
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{type(msg).__name__} is not a request")

    async def _on_ping(self, msg: Ping, conn: _Conn, local_host: str) -> Message:
        if msg.echo:  # a desktop timing the link: at most ECHO_MAX bytes, whatever it asks
            return Pong(req=msg.req, pad=bytes(min(max(msg.echo, 0), ECHO_MAX)))
        return Pong(req=msg.req)

    async def _on_inventory(self, msg: InventoryRequest, conn: _Conn, local_host: str) -> Message:
        return await self._inventory(msg.req, local_host, conn)

    async def _on_start_rpc(self, msg: StartRpc, conn: _Conn, local_host: str) -> Message:
        refused = self._in_use(conn, msg.req)
        if refused is not None:
            return refused
        if msg.threads < 0:
            return ErrorReply.of(msg.req, ErrorCode.BAD_MESSAGE, "threads must be >= 0")
        known = {d.name for d in await self._shared_devices()}
        devices = msg.devices or self.settings.devices
        unknown = [d for d in devices if d not in known]
        if unknown:
            return ErrorReply.of(
                msg.req,
                ErrorCode.UNKNOWN_DEVICE,
                f"no device {', '.join(unknown)} on {inventory.hostname()}; "
                f"it has {', '.join(sorted(known)) or 'none'}",
            )
        refused = self._in_use(conn, msg.req)  # taken while the probe ran
        if refused is not None:
            return refused
        self._lease = conn
        conn.since = time.time()
        spin = self.settings.rpc_spin
        if spin is not None and not uses_openmp((await self._probe()).build):
            log.warning(  # said, not passed over: `corral-agent doctor` says it too
                "rpc_spin = %d changes nothing: this llama.cpp has no OpenMP threads",
                spin,
            )
        threads = msg.threads or self.settings.rpc_threads
        cores = usable_cores()
        if threads > cores:
            log.warning(  # said, not passed over: `corral-agent doctor` says it too
                "the RPC worker gets %d threads (%s), but this agent may use %d core%s: "
                "the threads beyond them wait at every barrier of a graph",
                threads,
                "asked by the desktop" if msg.threads else "rpc_threads",
                cores,
                "" if cores == 1 else "s",
            )
        try:
            state = await self.supervisor.start(devices, threads, msg.cache and self.settings.cache)
        except WorkerStartError as exc:
            return ErrorReply.of(msg.req, ErrorCode.WORKER_FAILED, str(exc))
        return WorkerReply(req=msg.req, worker=replace_host(state, local_host))

    async def _on_stop_rpc(self, msg: StopRpc, conn: _Conn, local_host: str) -> Message:
        refused = self._in_use(conn, msg.req)
        if refused is not None:
            return refused
        self._release("stopped by its holder")
        return WorkerReply(req=msg.req, worker=await self.supervisor.stop())

    async def _on_subscribe(self, msg: Subscribe, conn: _Conn, local_host: str) -> Message:
        self._subscribers.add(conn)
        return OkReply(req=msg.req)

    async def _on_capabilities(
        self, msg: CapabilityRequest, conn: _Conn, local_host: str
    ) -> Message:
        return await self._capabilities(msg)

    async def _on_unpair(self, msg: Unpair, conn: _Conn, local_host: str) -> Message:
        assert conn.peer is not None
        log.info("%s unpaired itself", conn.peer.name)
        conn.proto.send(to_wire(OkReply(req=msg.req)))
        self.forget(conn.peer.fingerprint)
        raise ConnectionResetError("unpaired")

    async def _open_tunnel(self, conn: _Conn, msg: OpenTunnel) -> bool:
        """Turn `conn` into an RPC tunnel to the worker; False (after an error reply) if not."""
        holder = self._lease
        assert conn.peer is not None
        if (
            holder is None
            or holder.peer is None
            or holder.peer.fingerprint != conn.peer.fingerprint
        ):
            refused = self._in_use(conn, msg.req) or ErrorReply.of(
                msg.req,
                ErrorCode.NOT_READY,
                "no worker is started for this desktop: start it (StartRpc) first",
            )
            conn.proto.send(to_wire(refused))
            return False
        if not self.supervisor.running:
            conn.proto.send(
                to_wire(
                    ErrorReply.of(msg.req, ErrorCode.WORKER_FAILED, "the RPC worker is not running")
                )
            )
            return False
        if msg.relay and len(msg.relay) != RELAY_SHARE:
            conn.proto.send(
                to_wire(
                    ErrorReply.of(
                        msg.req,
                        ErrorCode.BAD_MESSAGE,
                        f"a relay key share is {RELAY_SHARE} bytes, this one {len(msg.relay)}",
                    )
                )
            )
            return False
        loop = asyncio.get_running_loop()
        # the worker's shim takes the connection itself when the desktop offers records
        handover = self.supervisor.worker_handover if msg.relay else ""
        try:
            if handover:
                plain = await loop.run_in_executor(None, unix_connection, handover, 5.0)
            else:
                plain = await loop.run_in_executor(None, self.supervisor.connect_plain, 5.0)
        except OSError as exc:
            conn.proto.send(
                to_wire(
                    ErrorReply.of(
                        msg.req,
                        ErrorCode.WORKER_FAILED,
                        f"the RPC worker does not answer: {exc}",
                    )
                )
            )
            return False
        if not self._holds_lease(conn, holder) or (
            handover and handover != self.supervisor.worker_handover
        ):  # while this waited: the lease ended, moved, or the worker restarted
            plain.close()
            refused = self._in_use(conn, msg.req) or ErrorReply.of(
                msg.req,
                ErrorCode.NOT_READY,
                "the lease or the RPC worker changed while the tunnel opened: try again",
            )
            conn.proto.send(to_wire(refused))
            return False
        sock, obj, inc, out, rest = await conn.proto.detach()
        self._conns.discard(conn)
        # the records when both ends have them: the desktop sends nothing more through
        # TLS after OpenTunnel, so there is no plaintext left over to carry across
        ours = relay_share() if msg.relay and not rest and not obj.pending() else b""
        if handover and not ours:  # a hand-over carries records only: a plain stream after all
            plain.close()
            try:
                plain = self.supervisor.connect_plain(5.0)
            except OSError:
                sock.close()
                return True
        # a desktop that offered no share may be a 2.0 one, which knows OkReply, not TunnelOpen
        answer = TunnelOpen(req=msg.req, relay=ours) if msg.relay else OkReply(req=msg.req)
        obj.write(encode_frame(to_wire(answer)))
        try:
            sock.sendall(out.read())
        except OSError:
            sock.close()
            plain.close()
            return True
        keys = relay_keys(msg.relay, ours, "agent") if ours else None
        try:
            pump, _ = start_data_path(
                sock, obj, inc, out, plain, keys, inc.read, bool(handover), self._pump_closed, rest
            )
        except OSError as exc:
            log.warning("hand-over to the RPC worker failed: %s", exc)
            sock.close()
            plain.close()
            return True
        with self._pumps_lock:
            self._pumps.add(pump)
        pump.start()
        return True

    def _pump_closed(self, pump: Pump) -> None:  # called from a pump thread
        with self._pumps_lock:
            self._pumps.discard(pump)

    def _drop_tunnels(self) -> None:
        """Close every tunnel (the worker behind them is gone, or the lease ended)."""
        with self._pumps_lock:
            pumps = list(self._pumps)
        for pump in pumps:
            pump.close()

    def _release(self, why: str) -> None:
        if self._lease is not None:
            log.info("lease of %s released: %s", self._lease.name, why)
            self._lease = None
            self._drop_tunnels()

    async def _watch_lease(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            holder = self._lease
            if holder is not None and time.monotonic() - holder.last_seen > LEASE_TIMEOUT:
                self._release(f"{holder.name} silent for {LEASE_TIMEOUT:.0f} s")
                holder.proto.abort()

    def lease_holder(self) -> str:
        return self._lease.peer.fingerprint if self._lease and self._lease.peer else ""

    def connected(self) -> set[str]:
        return {c.peer.fingerprint for c in self._conns if c.peer is not None}

    async def _capabilities(self, msg: CapabilityRequest) -> Message:
        """Answers from this host's own backend, cached per llama.cpp build and device."""
        probe = await self._probe()
        if msg.device not in {d.name for d in probe.devices}:
            return ErrorReply.of(
                msg.req,
                ErrorCode.UNKNOWN_DEVICE,
                f"no device {msg.device} on {inventory.hostname()}",
            )
        build = (
            str(probe.build.get("ggml_commit", "")) + "/" + str(probe.build.get("system_info", ""))
        )
        keys = [(q.type_k, q.type_v, q.head_dim, q.flash_attn) for q in msg.questions]
        cache = self._capability_cache.setdefault((build, msg.device), {})
        missing = sorted({k for k in keys if k not in cache})
        if missing:
            try:
                answers = await inventory.ask_capabilities(msg.device, missing)
            except RuntimeError as exc:
                return ErrorReply.of(msg.req, ErrorCode.INTERNAL, str(exc))
            except ValueError as exc:
                return ErrorReply.of(msg.req, ErrorCode.BAD_MESSAGE, str(exc))
            cache.update(zip(missing, answers, strict=True))
        return CapabilityReply(
            req=msg.req, device=msg.device, answers=tuple(cache[k] for k in keys)
        )

    async def _inventory(self, req: int, local_host: str, asker: _Conn | None = None) -> Inventory:
        """This host's inventory; `asker` is told when another desktop holds the workers
        (its own sessions, on other connections, are its business)."""
        loop = asyncio.get_running_loop()
        holder = self._lease
        other = holder is not None and holder.peer is not None and asker is not None
        other = other and (asker.peer is None or asker.peer.fingerprint != holder.peer.fingerprint)  # type: ignore[union-attr]
        pid = self.supervisor.state.pid
        pids = frozenset({pid}) if pid else frozenset()
        gpus, nvml = await loop.run_in_executor(None, inventory.read_gpus, pids)
        total, free = read_memory()
        probe = await self._probe()
        return Inventory(
            req=req,
            agent_id=self.agent_id,
            hostname=inventory.hostname(),
            cpu_model=inventory.cpu_model(),
            cpu_count=inventory.cpu_count(),
            ram_total=total,
            ram_free=free,
            gpus=gpus,
            nvml=nvml,
            devices=await self._shared_devices(),
            worker=replace_host(self.supervisor.state, local_host),
            system_info=str(probe.build.get("system_info", "")),
            in_use_by=holder.name if other and holder is not None else "",
        )

    # ------------------------------------------------------------------ events

    def _worker_changed(self, kind: str, state: WorkerState, message: str) -> None:
        log.info("worker %s: %s", kind, message)
        for conn in list(self._subscribers):
            proto = conn.proto
            if proto.closed:
                self._subscribers.discard(conn)
                continue
            if proto.write_buffer_size() > _SUBSCRIBER_BACKLOG:
                log.warning("dropping a subscriber that stopped reading")
                self._subscribers.discard(conn)
                proto.abort()
                continue
            sockname = proto.transport.get_extra_info("sockname") if proto.transport else None
            host = str(sockname[0]) if sockname else self.host
            event = AgentEvent(kind=kind, worker=replace_host(state, host), message=message)
            with contextlib.suppress(ConnectionError):
                proto.send(to_wire(event))


def _req_of(frame: object) -> int:
    """The request number of a frame that failed validation, so the error reaches its caller."""
    if isinstance(frame, list) and len(frame) == 2 and isinstance(frame[1], dict):
        req = frame[1].get("req", 0)
        if type(req) is int:
            return req
    return 0


# A paired desktop's requests and the AgentServer method that answers each (OpenTunnel is
# not here: it turns the connection into a tunnel instead of answering on it).
_HANDLERS: dict[type[Message], Callable[..., Awaitable[Message]]] = {
    Ping: AgentServer._on_ping,
    InventoryRequest: AgentServer._on_inventory,
    StartRpc: AgentServer._on_start_rpc,
    StopRpc: AgentServer._on_stop_rpc,
    Subscribe: AgentServer._on_subscribe,
    CapabilityRequest: AgentServer._on_capabilities,
    Unpair: AgentServer._on_unpair,
}
