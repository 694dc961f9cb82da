"""The agent's control server: hello, inventory, worker control, and a status stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from pathlib import Path

import corral
from corral.discovery import Advertiser, AgentHints
from corral.engine.protocol import (
    PROTOCOL_VERSION,
    AgentEvent,
    CapabilityReply,
    CapabilityRequest,
    ErrorCode,
    ErrorReply,
    Hello,
    Inventory,
    InventoryRequest,
    Message,
    OkReply,
    Ping,
    Pong,
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

from . import inventory
from .supervisor import RpcSupervisor, WorkerStartError, replace_host

log = logging.getLogger(__name__)

_HELLO_TIMEOUT = 10.0
_MAX_CONNECTIONS = 64
_SUBSCRIBER_BACKLOG = 1024 * 1024  # drop a subscriber that stops reading this much


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


class AgentServer:
    """Serves any number of control connections on one asyncio loop."""

    def __init__(
        self,
        host: str,
        port: int,
        state_dir: Path,
        advertise: bool = True,
        advertise_interfaces: tuple[str, ...] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.agent_id = load_agent_id(state_dir)
        tunnel_host = host if host not in ("", "0.0.0.0", "::") else "0.0.0.0"
        self.supervisor = RpcSupervisor(state_dir, tunnel_host, self._worker_changed)
        self._server: asyncio.Server | None = None
        self._subscribers: set[asyncio.StreamWriter] = set()
        self._connections: set[asyncio.Task[None]] = set()
        self._ggml: asyncio.Task[inventory.GgmlProbe] | None = None
        self._capability_cache: dict[tuple[str, str], dict[tuple[str, str, int, bool], bool]] = {}
        self._advertise = advertise
        self._advertise_interfaces = advertise_interfaces
        self.advertiser: Advertiser | None = None
        self._reannounce: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and serve; return the port (useful with port 0)."""
        self._ggml = asyncio.get_running_loop().create_task(inventory.probe_ggml())
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        if self._advertise:
            self.advertiser = Advertiser(await self._hints(), self.host, self._advertise_interfaces)
            await self.advertiser.start()
            self._reannounce = asyncio.get_running_loop().create_task(self._watch_inventory())
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
        if self._reannounce is not None:
            self._reannounce.cancel()
        if self.advertiser is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.advertiser.close(), 3)
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await self.supervisor.close()
        if self._ggml is not None:
            self._ggml.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # ------------------------------------------------------------------ connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= _MAX_CONNECTIONS:
            await self._send_error(writer, 0, ErrorCode.BUSY, "too many connections")
            writer.close()
            return
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        try:
            await self._session(reader, writer)
        except ProtocolError as exc:
            log.warning("closing %s: %s", peer, exc.message)
            await self._send_error(writer, 0, exc.code, exc.message)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug must not take the agent down; log it, drop this connection
            log.exception("internal error serving %s", peer)
            await self._send_error(
                writer, 0, ErrorCode.INTERNAL, "internal agent error; see its log"
            )
        finally:
            self._connections.discard(task)
            self._subscribers.discard(writer)
            writer.close()

    async def _send_error(
        self, writer: asyncio.StreamWriter, req: int, code: ErrorCode, message: str
    ) -> None:
        with contextlib.suppress(Exception):
            writer.write(
                encode_frame(to_wire(ErrorReply(req=req, code=int(code), message=message)))
            )
            await asyncio.wait_for(writer.drain(), 2)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await asyncio.wait_for(read_frame(reader), _HELLO_TIMEOUT)
        if first is None:
            return
        hello = from_wire(first)
        if not isinstance(hello, Hello):
            raise ProtocolError(ErrorCode.NOT_READY, "the first message must be hello")
        writer.write(encode_frame(to_wire(await self._hello())))
        await writer.drain()
        if hello.proto_major != PROTOCOL_VERSION[0]:
            raise ProtocolError(
                ErrorCode.VERSION_MISMATCH,
                f"this agent speaks Corral protocol {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}, "
                f"the peer {hello.proto_major}.{hello.proto_minor}: upgrade the older side",
            )
        sockname = writer.get_extra_info("sockname")
        local_host = str(sockname[0]) if sockname else self.host
        while True:
            frame = await read_frame(reader)
            if frame is None:
                return
            try:
                msg = from_wire(frame)
                reply = await self._handle(msg, writer, local_host)
            except ProtocolError as exc:
                # framing is intact: answer and keep the connection
                reply = ErrorReply(req=_req_of(frame), code=int(exc.code), message=exc.message)
            writer.write(encode_frame(to_wire(reply)))
            await writer.drain()

    async def _hello(self) -> Hello:
        probe = await self._probe()
        return Hello(
            role="agent",
            proto_major=PROTOCOL_VERSION[0],
            proto_minor=PROTOCOL_VERSION[1],
            corral_version=corral.__version__,
            llama_version=str(probe.build.get("llama_cpp_python", "")),
            llama_commit=str(probe.build.get("ggml_commit", "")),
            rpc_proto=str(probe.build.get("rpc_proto", "")),
            features=("rpc-tunnel-plain",),
            agent_id=self.agent_id,
            hostname=inventory.hostname(),
        )

    async def _probe(self) -> inventory.GgmlProbe:
        assert self._ggml is not None
        return await asyncio.shield(self._ggml)

    async def _handle(self, msg: Message, writer: asyncio.StreamWriter, local_host: str) -> Message:
        if isinstance(msg, Ping):
            return Pong(req=msg.req)
        if isinstance(msg, InventoryRequest):
            return await self._inventory(msg.req, local_host)
        if isinstance(msg, StartRpc):
            if msg.threads < 0:
                return ErrorReply(msg.req, int(ErrorCode.BAD_MESSAGE), "threads must be >= 0")
            known = {d.name for d in (await self._probe()).devices}
            unknown = [d for d in msg.devices if d not in known]
            if unknown:
                return ErrorReply(
                    msg.req,
                    int(ErrorCode.UNKNOWN_DEVICE),
                    f"no device {', '.join(unknown)} on {inventory.hostname()}; "
                    f"it has {', '.join(sorted(known)) or 'none'}",
                )
            try:
                state = await self.supervisor.start(msg.devices, msg.threads, msg.cache)
            except WorkerStartError as exc:
                return ErrorReply(msg.req, int(ErrorCode.WORKER_FAILED), str(exc))
            return WorkerReply(req=msg.req, worker=replace_host(state, local_host))
        if isinstance(msg, StopRpc):
            return WorkerReply(req=msg.req, worker=await self.supervisor.stop())
        if isinstance(msg, Subscribe):
            self._subscribers.add(writer)
            return OkReply(req=msg.req)
        if isinstance(msg, CapabilityRequest):
            return await self._capabilities(msg)
        if isinstance(msg, Hello):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello was already exchanged")
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{type(msg).__name__} is not a request")

    async def _capabilities(self, msg: CapabilityRequest) -> Message:
        """Answers from this host's own backend, cached per llama.cpp build and device."""
        probe = await self._probe()
        if msg.device not in {d.name for d in probe.devices}:
            return ErrorReply(
                msg.req,
                int(ErrorCode.UNKNOWN_DEVICE),
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
                return ErrorReply(msg.req, int(ErrorCode.INTERNAL), str(exc))
            except ValueError as exc:
                return ErrorReply(msg.req, int(ErrorCode.BAD_MESSAGE), str(exc))
            cache.update(zip(missing, answers, strict=True))
        return CapabilityReply(
            req=msg.req, device=msg.device, answers=tuple(cache[k] for k in keys)
        )

    async def _inventory(self, req: int, local_host: str) -> Inventory:
        loop = asyncio.get_running_loop()
        gpus, nvml = await loop.run_in_executor(None, inventory.read_gpus)
        total, free = inventory.read_memory()
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
            devices=probe.devices,
            worker=replace_host(self.supervisor.state, local_host),
            system_info=str(probe.build.get("system_info", "")),
        )

    # ------------------------------------------------------------------ events

    def _worker_changed(self, kind: str, state: WorkerState, message: str) -> None:
        log.info("worker %s: %s", kind, message)
        for writer in list(self._subscribers):
            if writer.is_closing():
                self._subscribers.discard(writer)
                continue
            transport = writer.transport
            if transport.get_write_buffer_size() > _SUBSCRIBER_BACKLOG:
                log.warning("dropping a subscriber that stopped reading")
                self._subscribers.discard(writer)
                writer.close()
                continue
            sockname = writer.get_extra_info("sockname")
            host = str(sockname[0]) if sockname else self.host
            event = AgentEvent(kind=kind, worker=replace_host(state, host), message=message)
            writer.write(encode_frame(to_wire(event)))


def _req_of(frame: object) -> int:
    """The request number of a frame that failed validation, so the error reaches its caller."""
    if isinstance(frame, list) and len(frame) == 2 and isinstance(frame[1], dict):
        req = frame[1].get("req", 0)
        if type(req) is int:
            return req
    return 0
