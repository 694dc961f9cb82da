"""Control-protocol messages: frozen, slotted dataclasses in a numbered registry.

On the wire a message is ``[type_number, {field: value}]``. Numbers are never reused.
Unknown fields are ignored and missing fields take their defaults, so an older reader
tolerates a newer writer within one protocol major.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .errors import ErrorCode, ProtocolError

# major: incompatible change (closes the connection); minor: additive fields or messages.
# 2.0: control connections are TLS 1.3 with pinned certificates; RPC goes through them.
# 2.1: OpenTunnel.relay / TunnelOpen: the native relay for RPC bytes (TLS records remain).
# 2.2: WorkerState.process: a worker that is alive but not running (stopped, stuck in the kernel).
# 2.3: GpuInfo.driver: the NVIDIA driver's version (a new driver's speeds are measured again).
PROTOCOL_VERSION = (2, 3)


class Message:
    """Base of every wire message; TYPE is its registry number."""

    __slots__ = ()
    TYPE: ClassVar[int]


_HINTS: dict[type, dict[str, Any]] = {}
M = TypeVar("M", bound=type[Message])


class Registry:
    """A numbered set of messages: the agent's control protocol is one, the inference
    child's channel (engine.runtime.childproto) another. Numbers are never reused."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.types: dict[int, type[Message]] = {}

    def register(self, number: int) -> typing.Callable[[M], M]:
        def deco(cls: M) -> M:
            if number in self.types:
                raise RuntimeError(f"{self.name}: message number {number} is used twice")
            cls.TYPE = number
            self.types[number] = cls
            return cls

        return deco

    def from_wire(self, obj: Any) -> Message:
        """Validate and build a message from a decoded frame; ProtocolError if not one."""
        if not (isinstance(obj, list) and len(obj) == 2 and type(obj[0]) is int):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message is [type, {fields}]")
        cls = self.types.get(obj[0])
        if cls is None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown {self.name} message type {obj[0]}")
        result: Message = _decode(cls, obj[1], cls.__name__)
        return result


CONTROL_MESSAGES = Registry("control")
_register = CONTROL_MESSAGES.register


# ----------------------------------------------------------------- nested records


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One NVIDIA GPU as NVML reports it (-1 where NVML has no reading)."""

    index: int
    name: str
    uuid: str = ""
    memory_total: int = 0
    memory_free: int = 0
    utilization_pct: int = -1
    temperature_c: int = -1
    power_w: float = -1.0
    compute_capability: str = ""  # "9.0" for an H100/H200
    corral_used: int = 0  # bytes held by this agent's RPC worker (the rest of used: others)
    driver: str = ""  # the NVIDIA driver's version ("580.159.04"), "" where NVML has none


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One ggml backend device as llama.cpp on the agent sees it."""

    name: str
    description: str = ""
    backend: str = ""
    type: str = ""  # cpu | gpu | igpu | accel
    memory_free: int = 0
    memory_total: int = 0


@dataclass(frozen=True, slots=True)
class WorkerState:
    """The agent's RPC worker: what runs, where the desktop reaches it, how it last ended."""

    state: str = "stopped"  # stopped | starting | running | crashed | backoff | failed
    endpoint: str = ""  # host:port the desktop registers with llama.cpp
    devices: tuple[str, ...] = ()
    threads: int = 0
    pid: int = 0
    restarts: int = 0
    last_exit: str = ""  # e.g. "killed by SIGKILL", "exit code 1"
    log_tail: tuple[str, ...] = ()
    # the worker process as the kernel sees it, when that is not plain running or waiting:
    # "stopped by a signal", "stuck in the kernel (uninterruptible sleep)", "exited"
    process: str = ""


@dataclass(frozen=True, slots=True)
class CapabilityQuestion:
    """Can a device write this K/V cache and (with flash_attn) run attention over it?"""

    type_k: str
    type_v: str
    head_dim: int
    flash_attn: bool


# ----------------------------------------------------------------- messages


@_register(1)
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First frame each way: versions and features; a major mismatch closes the connection."""

    role: str  # "agent" | "desktop"
    proto_major: int
    proto_minor: int
    corral_version: str = ""
    llama_version: str = ""  # llama-cpp-python version
    llama_commit: str = ""  # ggml commit the build vendors
    rpc_proto: str = ""  # ggml RPC protocol, "major.minor.patch"
    features: tuple[str, ...] = ()
    agent_id: str = ""
    hostname: str = ""


@_register(2)
@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """A request failed; req 0 means the error is about the connection itself."""

    req: int
    code: int
    message: str

    @classmethod
    def of(cls, req: int, code: ErrorCode, message: str) -> ErrorReply:
        """The refusal of request `req` (the one way the agent builds them)."""
        return cls(req=req, code=int(code), message=message)


@_register(3)
@dataclass(frozen=True, slots=True)
class OkReply(Message):
    req: int


@_register(4)
@dataclass(frozen=True, slots=True)
class Ping(Message):
    req: int
    echo: int = 0  # bytes the Pong carries back (at most ECHO_MAX): a link's bandwidth


ECHO_MAX = 1 << 20


@_register(5)
@dataclass(frozen=True, slots=True)
class Pong(Message):
    req: int
    pad: bytes = b""


@_register(6)
@dataclass(frozen=True, slots=True)
class InventoryRequest(Message):
    req: int


@_register(7)
@dataclass(frozen=True, slots=True)
class Inventory(Message):
    """What a host has: GPUs (NVML), ggml devices, RAM and CPU, and its worker."""

    req: int
    agent_id: str
    hostname: str
    cpu_model: str = ""
    cpu_count: int = 0
    ram_total: int = 0
    ram_free: int = 0
    gpus: tuple[GpuInfo, ...] = ()
    nvml: str = ""  # "ok", or why there is no GPU report (e.g. "no NVIDIA driver")
    devices: tuple[DeviceInfo, ...] = ()
    worker: WorkerState = field(default_factory=WorkerState)
    system_info: str = ""  # llama.cpp's feature line (e.g. CUDA FA_QUANTS, CPU AVX2)
    in_use_by: str = ""  # another desktop whose session holds the workers ("" if none)


@_register(8)
@dataclass(frozen=True, slots=True)
class StartRpc(Message):
    """Start (or restart with new settings) the RPC worker on the named ggml devices."""

    req: int
    devices: tuple[str, ...] = ()  # empty: every GPU, or the CPU when there is none
    threads: int = 0  # 0: the agent's rpc_threads, else procs.default_worker_threads
    cache: bool = True  # let the worker keep a tensor cache in the agent's state dir


@_register(9)
@dataclass(frozen=True, slots=True)
class WorkerReply(Message):
    """Answer to StartRpc / StopRpc: the worker as it is now."""

    req: int
    worker: WorkerState


@_register(10)
@dataclass(frozen=True, slots=True)
class StopRpc(Message):
    req: int


@_register(11)
@dataclass(frozen=True, slots=True)
class Subscribe(Message):
    """Ask for AgentEvent pushes on this connection."""

    req: int


@_register(12)
@dataclass(frozen=True, slots=True)
class AgentEvent(Message):
    """Pushed by the agent: the worker changed state (started, crashed, restarted, stopped)."""

    kind: str
    worker: WorkerState
    message: str = ""


@_register(13)
@dataclass(frozen=True, slots=True)
class CapabilityRequest(Message):
    """Ask the agent's own ggml backend about one device (answers are cached per build)."""

    req: int
    device: str
    questions: tuple[CapabilityQuestion, ...]


@_register(14)
@dataclass(frozen=True, slots=True)
class CapabilityReply(Message):
    req: int
    device: str
    answers: tuple[bool, ...]


@_register(15)
@dataclass(frozen=True, slots=True)
class PairStart(Message):
    """desktop → agent on a connection without a client certificate: SPAKE2 message A."""

    req: int
    name: str  # the desktop's name, shown in the agent's list of paired desktops
    cert: bytes  # the desktop's certificate (DER), pinned when the exchange succeeds
    spake: bytes


@_register(16)
@dataclass(frozen=True, slots=True)
class PairChallenge(Message):
    """agent → desktop: SPAKE2 message B and the agent's key confirmation."""

    req: int
    spake: bytes
    confirm: bytes


@_register(17)
@dataclass(frozen=True, slots=True)
class PairConfirm(Message):
    """desktop → agent: the desktop's key confirmation (proves it knew the code)."""

    req: int
    confirm: bytes


@_register(18)
@dataclass(frozen=True, slots=True)
class PairDone(Message):
    req: int
    agent_id: str
    hostname: str


@_register(19)
@dataclass(frozen=True, slots=True)
class OpenTunnel(Message):
    """desktop → agent: from the reply on, this connection carries raw ggml RPC bytes to the
    worker. Only for the desktop holding the lease (taken by StartRpc). `relay` is the
    desktop's 32-byte key share when it can run the native relay (empty: TLS records)."""

    req: int
    relay: bytes = b""


@_register(25)
@dataclass(frozen=True, slots=True)
class TunnelOpen(Message):
    """agent → desktop, the answer to OpenTunnel: from here on the connection carries RPC
    bytes. With `relay` (the agent's 32-byte share) both ends switch from TLS records to the
    native relay's AES-GCM records under keys derived from both shares; empty: TLS stays."""

    req: int
    relay: bytes = b""


@_register(20)
@dataclass(frozen=True, slots=True)
class Unpair(Message):
    """Forget a peer. Desktop → agent over a paired connection: forget me. Local admin →
    agent: forget the desktops `who` names (fingerprint prefix or name)."""

    req: int
    who: str = ""


@_register(21)
@dataclass(frozen=True, slots=True)
class PairCodeRequest(Message):
    """Local admin → agent (owner-only unix socket): make a new pairing code, or set `code`."""

    req: int
    code: str = ""
    ttl: float = 0.0  # seconds the code is valid; 0 or more than 300: 300


@_register(22)
@dataclass(frozen=True, slots=True)
class PairCodeReply(Message):
    req: int
    code: str
    expires_in: float


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A paired desktop, as the agent's owner sees it."""

    fingerprint: str
    name: str
    paired_at: float = 0.0
    connected: bool = False
    lease: bool = False


@_register(23)
@dataclass(frozen=True, slots=True)
class PeersRequest(Message):
    req: int


@_register(24)
@dataclass(frozen=True, slots=True)
class Peers(Message):
    req: int
    peers: tuple[PeerInfo, ...] = ()


# ----------------------------------------------------------------- conversion


def to_wire(msg: Message) -> list[Any]:
    """The msgpack-ready form of a message."""
    return [msg.TYPE, _encode(msg)]


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def from_wire(obj: Any) -> Message:
    """Validate and build a control-protocol message; ProtocolError if it is not one."""
    return CONTROL_MESSAGES.from_wire(obj)


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _bad(where: str, what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, f"{where}: {what}")


def _decode(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise _bad(where, "expected a map")
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _decode(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _bad(where, f"missing field {f.name!r}")
        return tp(**kwargs)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, list):
            raise _bad(where, "expected an array")
        args = typing.get_args(tp)
        if Ellipsis in args:  # tuple[X, ...]
            (item,) = [a for a in args if a is not Ellipsis]
            return tuple(_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):  # tuple[X, Y]: exactly these
            raise _bad(where, f"expected {len(args)} items, got {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_decode(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _bad(where, "expected a map")
        return {
            _decode(key_type, k, f"{where} key"): _decode(value_type, v, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where)
    if tp is float:
        if type(value) in (int, float):
            return float(value)
        raise _bad(where, "expected a number")
    if tp in (int, str, bool, bytes):
        if type(value) is not tp:
            raise _bad(where, f"expected {tp.__name__}, got {type(value).__name__}")
        return value
    raise TypeError(f"unsupported field type {tp!r} at {where}")  # a bug in this module
