"""A chat session against one model split across agents' RPC workers (or local only).

Order matters, because llama.cpp aborts on anything unexpected: connect to every agent,
compare RPC protocol versions, start the workers, say HELLO to every worker endpoint
ourselves, and only then let the inference child register them and load.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import subprocess
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from corral.engine.agent.inventory import read_gpus
from corral.engine.aio import within
from corral.engine.ggml.devices import GgmlDevice
from corral.engine.ggml.kernelcheck import crash_hint, is_extra_buffer, known_extra_factors
from corral.engine.ggml.loadlog import compact_ranges
from corral.engine.ggml.probe import RpcProbeError, probe_rpc
from corral.engine.hostmem import host_available_memory
from corral.engine.model.spec import ModelError, ModelSpec, read_model_spec
from corral.engine.planner.plan import (
    Device,
    MiB,
    Plan,
    PlanError,
    Settings,
    host_extra_bytes,
    make_plan,
    pad_ctx,
    what_fits,
)
from corral.engine.planner.speed import (
    DeviceSpeed,
    Prediction,
    Speeds,
    describe_speed,
    layer_bytes,
    predict,
    speed_plan,
    step_time,
    with_speeds,
    without_each,
)
from corral.engine.planner.validate import (
    BuildFacts,
    DeviceFacts,
    Verdict,
    check_builds,
    check_cache,
    check_context,
    check_parallel,
    check_plan,
    check_strategy,
    errors,
    questions,
)
from corral.engine.protocol import AgentEvent, CapabilityQuestion, Inventory, WorkerState
from corral.engine.security.tunnel import TUNNEL_HOST, DesktopTunnel

from .agent_client import AgentClient
from .childproto import Done, Embeddings, Event, Generate, Loaded, LoadParams
from .errors import (
    AgentUnreachable,
    InferenceCrashed,
    ModelUnreadable,
    PlanRefused,
    ReplyStalled,
    RuntimeFailure,
    WorkerUnavailable,
    WouldUnload,
)
from .inference import STOP_GRACE, InferenceProcess
from .kvstatus import ReplyMeter
from .planning import (
    Comparison,
    compare,
    devices_from_agents,
    exact_plan,
    layer_map_matches,
    local_gpus,
    names_by_place,
    served_devices,
    spec_after_dry_run,
)
from .speeds import (
    SpeedCache,
    base_noise,
    base_of,
    chain_counts,
    chain_key,
    chain_of,
    chain_params,
    derive,
    device_key,
    gather_links,
    host_driver,
    probe_bytes,
    probe_files,
    probe_key,
    probe_layers,
    probe_params,
    sensitivity,
    time_device,
)
from .stall import StallWatch

RECOVER_TRIES = 3  # loads tried after the model was lost...
RECOVER_PAUSE = 1.0  # ...this many seconds apart
_CRASH_EVENT_WAIT = 2.0  # how long to wait for an agent to report the worker that died


DEFAULT_CTX = 2048  # tokens of context when the user names none (`corral serve`: 4096)
MIN_CTX = 256  # llama.cpp sizes the cache in blocks of 256 cells (planner.plan.pad_ctx)
MAX_CTX = 1 << 24  # 16M tokens: beyond every released model, and KV counts stay in range


class _Order(NamedTuple):
    """An agent order speed tried (ChatSession._speed_order)."""

    rate: float  # predicted tokens/s (a split timed before: as measured)
    rank: int  # 0: the order given, then -1, -2, ... (ties keep the earlier)
    order: tuple[int, ...]  # the agents' indices in this order
    devices: list[Device]
    speeds: Speeds  # the figures renamed to this order's device names
    keys: dict[str, str]  # the speed keys likewise
    plan: Plan


@dataclass(frozen=True, slots=True)
class LoadSettings:
    model: Path
    n_ctx: int = DEFAULT_CTX
    n_threads: int = 0
    flash_attn: bool = False
    worker_threads: int = 0
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    strategy: str = "balanced"
    layers: tuple[int, ...] | None = None  # manual layer counts per device
    reserve_mib: int = 256
    swa_full: bool = True  # sliding-window layers: whole context (True) or the window
    parallel: int = 1  # replies decoded together, each slot with n_ctx / parallel cells
    remeasure: bool = False  # time every device again (speed planning), not from speeds.json

    def plan_settings(self) -> Settings:
        return Settings(
            n_ctx=self.n_ctx,
            n_batch=self.n_batch,
            n_ubatch=self.n_ubatch,
            type_k=self.type_k,
            type_v=self.type_v,
            flash_attn=self.flash_attn,
            reserve=self.reserve_mib * MiB,
            swa_full=self.swa_full,
            n_seq=self.parallel,
        )

    def load_params(
        self, rpc: Sequence[str] = (), tensor_split: Sequence[float] = ()
    ) -> LoadParams:
        """What the inference child loads (or dry-runs) with: these settings, the workers'
        endpoints in registration order and the plan's tensor_split (empty: llama.cpp's
        own). The context is padded here, once (plan.pad_ctx)."""
        return LoadParams(
            model=str(self.model),
            rpc=tuple(rpc),
            n_ctx=pad_ctx(self.n_ctx),
            n_batch=self.n_batch,
            n_ubatch=self.n_ubatch,
            n_threads=self.n_threads,
            n_gpu_layers=-1,  # every layer on a device: the plan decides which
            tensor_split=tuple(tensor_split),
            type_k=self.type_k,
            type_v=self.type_v,
            flash_attn=self.flash_attn,
            swa_full=self.swa_full,
            n_seq=self.parallel,
        )


@dataclass(frozen=True, slots=True)
class DevicePlacement:
    """Where llama.cpp put layers: one device, the host behind it, and its layers."""

    device: str  # llama.cpp's device name: RPC0, RPC1, CPU, CUDA0
    host: str  # the agent's name, or "local"
    endpoint: str  # RPC endpoint, empty for local devices
    layers: tuple[int, ...]

    def describe(self) -> str:
        where = self.host
        if self.endpoint.startswith(f"{TUNNEL_HOST}:"):  # a Unix socket's label, not an address
            where += " via its tunnel"
        elif self.endpoint:
            where += f" via {self.endpoint}"
        return f"{self.device:<6} {where:<40} layers {compact_ranges(list(self.layers)) or '-'}"


@dataclass(frozen=True, slots=True)
class LoadResult:
    placements: tuple[DevicePlacement, ...]
    n_layer: int
    n_ctx: int
    load_s: float
    warnings: tuple[str, ...] = ()
    plan: Plan | None = None  # with llama.cpp's dry-run compute buffers
    analytic: Plan | None = None  # the instant estimate, for comparison
    comparison: Comparison | None = None  # planned vs what llama.cpp reported
    cpu_kernels: str = ""  # the CPU-kernel self-test's verdict this load followed
    cpu_buffers: tuple[str, ...] = ()  # the extra CPU buffers it used (AMX, CPU_REPACK)

    def cpu_note(self) -> str:
        """The CPU kernels this load used, for the load report ("" where a warning says it)."""
        if not self.cpu_kernels or any(w.startswith("CPU kernels") for w in self.warnings):
            return ""
        used = ", ".join(self.cpu_buffers) or "none"
        return f"CPU kernels: {self.cpu_kernels}; this load uses: {used}"


TRUSTED_NETWORK_ENV = "CORRAL_TRUSTED_NETWORK"


def trusted_network_setting() -> bool:
    """CORRAL_TRUSTED_NETWORK: 1 lets this desktop use an agent's direct RPC; unset or 0 not."""
    value = os.environ.get(TRUSTED_NETWORK_ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise RuntimeFailure(f"{TRUSTED_NETWORK_ENV}={value!r} is not a setting: use 1 or 0")


class ChatSession:
    """Agents, their workers and the inference child for one loaded model; keeps the history."""

    def __init__(self, agents: list[str], trusted_network: bool | None = None) -> None:
        # direct, unauthenticated RPC to an agent's worker needs both owners to opt in: the
        # agent's (--trusted-network) and this desktop's (CORRAL_TRUSTED_NETWORK=1), or a
        # paired agent could take this desktop's RPC traffic out of the tunnel
        self.trusted_network = (
            trusted_network_setting() if trusted_network is None else trusted_network
        )
        self.clients = [self._client(a) for a in agents]
        self.child = InferenceProcess()
        self.history: list[dict[str, str]] = []
        self.workers: list[WorkerState] = []
        self.result: LoadResult | None = None
        self._replacing = False  # open() is under way: the loaded model goes anyway
        self._child_had_model = False  # a model (or its dry run) went through this child
        self._events: list[tuple[float, AgentClient, AgentEvent]] = []
        self.local_devices: list[GgmlDevice] = []
        self.inventories: list[Inventory] = []
        self._worker_threads = 0  # connect's, for a worker started again (_reach_agents)
        self.warnings: tuple[str, ...] = ()
        self.verdicts: list[Verdict] = []
        self.desktop_build: BuildFacts | None = None
        self.spec: ModelSpec | None = None
        self.settings: LoadSettings | None = None
        self.dropped: list[str] = []  # agents left out by a reload
        self.tunnels: dict[str, DesktopTunnel] = {}  # by agent address
        self._event_arrived = asyncio.Event()
        self._stop_timer: asyncio.TimerHandle | None = None
        self._stopped_by_kill = ""  # why the child was killed to stop a reply
        self._replying = 0  # replies under way (up to the loaded model's slots)
        self._chat_rid = -1  # the request number of the reply `ask` streams
        self.stall = StallWatch()  # the pace of this load's replies
        self.speeds: Speeds | None = None  # measured device and link speeds (speed planning)
        self.prediction: Prediction | None = None  # the exact plan's predicted tokens/s
        self.leave_out: list[tuple[str, float | None]] = []  # per host: tok/s change without it
        self._speed_keys: dict[str, str] = {}  # device name: its key in speeds.json
        self._speed_cache: SpeedCache | None = None  # speeds.json as this plan read it
        # measured / predicted - 1 of this plan's split at its last measured reply (if any)
        self.measured_before: float | None = None
        self.order_note = ""  # where speed put the agents in another order, why
        # speed's agent orders tried: (hosts in order, predicted tokens/s, layer counts)
        self.orders: list[tuple[tuple[str, ...], float, tuple[int, ...]]] = []

    def _client(self, address: str) -> AgentClient:
        return AgentClient(address, on_event=self._on_event, on_lost=self._on_lost)

    def _on_lost(self, client: AgentClient) -> None:
        """An agent's control connection ended (closed, or silent past the heartbeat): its
        tunnel goes too, so llama.cpp, perhaps waiting on that worker, fails now instead of
        waiting for TCP to give up (many minutes on a dropped link)."""
        tunnel = self.tunnels.pop(client.address, None)
        if tunnel is not None:
            tunnel.close()

    # ------------------------------------------------------------------ open

    async def connect(self, worker_threads: int = 0) -> None:
        """Agents, the inference child, version checks, workers up and answering HELLO."""
        child_start = asyncio.ensure_future(self.child.start())
        try:
            await self._connect_agents()
            ready = await child_start
        except BaseException:
            child_start.cancel()
            raise
        self.local_devices = list(ready.devices)
        build = ready.build
        self.desktop_build = BuildFacts(
            "this desktop",
            build.llama_cpp_python,
            build.ggml_commit,
            build.rpc_proto,
            build.system_info,
        )
        self._worker_threads = worker_threads
        # before any worker starts, so a mismatched build is never asked to connect
        self._check_builds(self.clients)
        states = await asyncio.gather(
            *(self._start_worker(c, worker_threads) for c in self.clients)
        )
        self.workers = list(states)
        await self._probe_endpoints(self.clients, self.endpoints)
        self.inventories = list(await asyncio.gather(*(c.inventory() for c in self.clients)))

    def _check_builds(self, clients: Sequence[AgentClient]) -> None:
        """PlanRefused where an agent's llama.cpp is not this desktop's."""
        assert self.desktop_build is not None
        mismatched = check_builds(
            self.desktop_build,
            [
                BuildFacts(c.name, c.hello.llama_version, c.hello.llama_commit, c.hello.rpc_proto)
                for c in clients
                if c.hello is not None
            ],
        )
        if mismatched:
            self.verdicts = mismatched
            raise PlanRefused("; ".join(str(v) for v in mismatched))

    async def _reach_agents(self) -> None:
        """Before the inference child is handed any worker's endpoint: an agent whose
        connection ended since (restarted, its host rebooted, heartbeats missed) is
        connected again, its worker started and a new tunnel opened, with the checks
        `connect` makes; ggml-rpc aborts the child on an endpoint that refuses ("Failed to
        connect to 127.0.0.1:PORT"). AgentUnreachable, naming the agent, where it cannot
        be reached; PlanRefused where it came back with another llama.cpp."""
        for i, old in enumerate(self.clients):
            if not old.closed_reason:
                continue
            why = old.closed_reason
            client = self._client(old.address)
            try:
                await client.connect()
                self._check_builds([client])
                worker = await self._start_worker(client, self._worker_threads)
                await self._probe_endpoints([client], [worker.endpoint])
                inventory = await client.inventory()
            except RuntimeFailure as exc:
                await client.close()
                tunnel = self.tunnels.pop(client.address, None)
                if tunnel is not None:
                    tunnel.close()
                if isinstance(exc, PlanRefused):
                    raise
                raise AgentUnreachable(
                    f"lost agent {old.name} ({why}) and cannot reach it again: {exc} (or "
                    "plan without that host)"
                ) from None
            await old.close()
            self.clients[i], self.workers[i], self.inventories[i] = client, worker, inventory
            self._warn(f"agent {client.name} was lost ({why}) and is connected again")

    @property
    def endpoints(self) -> list[str]:
        return [w.endpoint for w in self.workers]

    async def _device_facts(self, spec: ModelSpec, s: Settings) -> list[DeviceFacts]:
        """Ask every device (through its agent, or the child for local GPUs) about this cache."""
        asked = questions(spec, s)
        wire = tuple(CapabilityQuestion(*q) for q in asked)
        jobs: list[tuple[str, str, str, str, Awaitable[Sequence[bool]]]] = []
        for client, inv in zip(self.clients, self.inventories, strict=True):
            for dev in served_devices(inv):
                jobs.append(
                    (
                        client.name,
                        dev.name,
                        dev.backend,
                        inv.system_info,
                        client.capabilities(dev.name, wire),
                    )
                )
        for d in local_gpus(self.local_devices):
            jobs.append(
                ("this desktop", d.name, d.backend, "", self.child.capabilities(d.name, list(wire)))
            )
        answers = await asyncio.gather(*(j[4] for j in jobs))
        facts = []
        k = 0
        for (host, name, backend, info, _), got in zip(jobs, answers, strict=True):
            shown = name
            if host != "this desktop":
                shown, k = f"RPC{k} ({name})", k + 1
            facts.append(
                DeviceFacts(host, shown, backend, info, dict(zip(asked, got, strict=True)))
            )
        return facts

    async def plan(self, settings: LoadSettings) -> tuple[Plan, Plan]:
        """(analytic plan, exact plan): placement by strategy, then llama.cpp's dry run.

        Validation verdicts land in `self.verdicts`; with an error among them there is no
        dry run (llama.cpp would refuse or abort on it) and the exact plan is the analytic.
        """
        loop = asyncio.get_running_loop()
        try:
            spec = await loop.run_in_executor(None, read_model_spec, settings.model)
        except ModelError as exc:
            raise ModelUnreadable(str(exc)) from None
        self.spec = spec
        await self._reach_agents()
        devices = devices_from_agents(
            [c.name for c in self.clients], self.inventories, self.endpoints, self.local_devices
        )
        self.speeds, self.prediction, self.leave_out = None, None, []
        self.order_note, self.orders = "", []
        self.measured_before = None
        if devices:
            # speed measures what it lacks; the others show a prediction where all is known
            self.speeds = await self.measure_speeds(
                spec, devices, settings, settings.strategy == "speed" or settings.remeasure
            )
        try:
            if settings.strategy == "speed" and settings.layers is None and devices:
                assert self.speeds is not None
                devices, chosen = self._speed_order(spec, devices, settings)
                try:
                    analytic = chosen or speed_plan(
                        spec,
                        with_speeds(devices, self.speeds),
                        settings.plan_settings(),
                        self.speeds,
                        self._measured_splits(spec, devices, self.speeds),
                    )
                except ValueError:  # nothing fits by the capacity estimate: say so below
                    analytic = make_plan(spec, devices, settings.plan_settings(), "balanced")
            else:
                analytic = make_plan(
                    spec, devices, settings.plan_settings(), settings.strategy, settings.layers
                )
        except PlanError as exc:
            raise PlanRefused(str(exc)) from None
        # the desktop's own memory is checked too (what its memory cgroup allows, if less),
        # with the copies llama.cpp will make into its extra CPU buffers, as far as known
        # (file reads and a hash of the CPU backend: off the loop)
        factors, host_free = await loop.run_in_executor(
            None, lambda: (known_extra_factors(), host_available_memory())
        )
        extra = host_extra_bytes(spec, analytic.layer_device, factors)
        analytic = dataclasses.replace(
            analytic, host_free=host_free, host=dataclasses.replace(analytic.host, extra=extra)
        )
        facts = await self._device_facts(spec, analytic.settings)
        self.verdicts = [
            *check_cache(spec, analytic.settings, facts),
            *check_context(spec, analytic.settings),
            *check_strategy(analytic),
            *check_parallel(analytic.settings),
        ]
        if errors(self.verdicts):
            return analytic, analytic
        try:
            self._child_had_model = True
            dry = await self.child.dry_run(
                settings.load_params(self.endpoints, analytic.tensor_split)
            )
        except ReplyStalled as stall:  # a worker stopped answering llama.cpp's questions
            raise await self._stalled(stall, "the dry run") from None
        wrong = layer_map_matches(analytic, dry.log.layers)
        if wrong:  # the planner and llama.cpp disagree: trust llama.cpp, say so loudly
            self._warn("plan differs from llama.cpp: " + "; ".join(wrong[:3]))
        spec = self.spec = spec_after_dry_run(spec, dry)
        exact = exact_plan(analytic, spec, dry)
        self.verdicts += check_plan(exact, what_fits(spec, exact) if not exact.fits else ())
        if self.speeds is not None:
            self.prediction = predict(spec, exact, self.speeds)
            self.leave_out = without_each(spec, exact, exact.settings, self.speeds)
            assert self._speed_cache is not None  # read by measure_speeds
            self.measured_before = self._speed_cache.errors.get(self._placement(exact))
        return analytic, exact

    def speed_lines(self) -> list[str]:
        """The plan's measured speeds and prediction in words (planner.speed.describe_speed),
        as corral plan and the window show them."""
        lines = describe_speed(
            self.speeds,
            self.prediction,
            self.leave_out,
            self.measured_before,
            layer_bytes(self.spec) if self.spec else 0.0,
        )
        return [*lines, self.order_note] if self.order_note else lines

    def _speed_order(
        self, spec: ModelSpec, devices: list[Device], settings: LoadSettings
    ) -> tuple[list[Device], Plan | None]:
        """speed's agent order. llama.cpp runs the devices in order and puts the output layer
        (and the logits' trip back) on the last one in use, so the agents that hold layers
        in the order given are tried last in turn (every agent, where nothing fits as
        given), the others keeping their order; the order whose speed plan predicts the
        most tokens/s is taken (ties: as given), and the agents' lists are put in it. A
        loaded model keeps its order (its kept figures name devices by place). The
        devices, in the order taken, and speed's plan over them (None where no order was
        searched or none fits: the caller plans, and says why)."""
        speeds = self.speeds
        assert speeds is not None
        n = len(self.clients)
        if n < 2 or (self.result is not None and not self._replacing):
            return devices, None
        tried: list[_Order] = []
        lasts = [n - 1]  # the agent tried last; more join after the order given (rank 0)
        rank = -1
        while rank + 1 < len(lasts):
            rank += 1
            last = lasts[rank]
            order = (*(i for i in range(n) if i != last), last)
            devs = devices_from_agents(
                [self.clients[i].name for i in order],
                [self.inventories[i] for i in order],
                [self.workers[i].endpoint for i in order],
                self.local_devices,
            )
            was = names_by_place(devices, devs)
            sp = dataclasses.replace(
                speeds,
                devices={a: speeds.devices[b] for a, b in was.items() if b in speeds.devices},
            )
            keys = {"": self._speed_keys[""]}
            keys.update({a: self._speed_keys[b] for a, b in was.items() if b in self._speed_keys})
            measured = self._measured_splits(spec, devs, sp, keys)
            try:
                plan = speed_plan(
                    spec, with_speeds(devs, sp), settings.plan_settings(), sp, measured
                )
            except (ValueError, PlanError):
                plan = None
            found = predict(spec, plan, sp) if plan is not None else None
            if plan is not None and found is not None:
                # a split a reply was timed on counts at its measured step, as in speed_plan
                step = measured.get(tuple(len(plan.layers_of(i)) for i in range(len(devs))))
                rate = 1.0 / step if step else found.tokens_per_s
                tried.append(_Order(rate, -rank, order, devs, sp, keys, plan))
            if rank == 0:  # the others to try last: those that hold layers as given
                hosts = {devs[i].host for i in range(len(devs)) if plan and plan.layers_of(i)}
                lasts += [i for i in range(n - 1) if plan is None or self.clients[i].name in hosts]
        self.orders = [
            (
                tuple(self.clients[i].name for i in t.order),
                t.rate,
                tuple(len(t.plan.layers_of(i)) for i in range(len(t.devices))),
            )
            for t in tried
        ]
        if not tried:
            return devices, None
        rate, _, order, devs, sp, keys, plan = max(tried, key=lambda t: (t.rate, t.rank))
        if order != tuple(range(n)):
            given = next((t.rate for t in tried if t.rank == 0), 0.0)
            names = ", ".join(c.name for c in self.clients)
            self.clients = [self.clients[i] for i in order]
            self.workers = [self.workers[i] for i in order]
            self.inventories = [self.inventories[i] for i in order]
            self.speeds, self._speed_keys = sp, keys
            why = (
                f"{100 * (rate / given - 1):+.1f} % tokens/s over the order given ({names})"
                if given > 0
                else f"the order given ({names}) does not fit"
            )
            self.order_note = f"{self.clients[-1].name} goes last, with the output layer: {why}"
        return devs, plan

    def _measured_splits(
        self,
        spec: ModelSpec,
        devices: Sequence[Device],
        speeds: Speeds,
        keys: Mapping[str, str] | None = None,
    ) -> dict[tuple[int, ...], float]:
        """Splits of these devices a reply was timed on before (speeds.json's kept ratios):
        layer counts per device → the seconds a step measured (its prediction now over
        measured / predicted). `keys`: the devices' speed keys by name, where they are not
        this session's (another agent order)."""
        keys = self._speed_keys if keys is None else keys
        names = {key: name for name, key in keys.items() if name}
        index = {d.name: i for i, d in enumerate(devices)}
        out: dict[tuple[int, ...], float] = {}
        assert self._speed_cache is not None  # read by measure_speeds
        for placement, ratio in self._speed_cache.errors.items():
            counts = [0] * len(devices)
            place = -1  # a placement names its devices in their order: the same order only
            for one in placement.split(";"):
                key, _, n = one.rpartition("=")
                name = names.get(key)
                if name is None or name not in index or not n.isdigit():
                    break
                if index[name] <= place:
                    break
                place = index[name]
                counts[index[name]] = int(n)
            else:
                if ratio > -1 and any(counts):
                    step, _ = step_time(spec, devices, counts, speeds)
                    out[tuple(counts)] = step / (1 + ratio)
        return out

    def _placement(self, plan: Plan) -> str:
        """A split as speeds.json keys its measured/predicted ratio: each device's key and
        its layer count."""
        return ";".join(
            f"{self._speed_keys.get(d.name, d.name)}={len(plan.layers_of(i))}"
            for i, d in enumerate(plan.devices)
            if plan.layers_of(i)
        )

    def note_speed(self, done: Done) -> tuple[float, float] | None:
        """A reply's measured tokens/s beside the loaded plan's prediction, (measured,
        predicted); the ratio is kept in speeds.json under this placement (devices and
        their layer counts), so a later plan, or a look at the file, can tell a device or
        link that got slower. None without a prediction or with too short a reply."""
        if self.prediction is None or self.result is None or done.gen_s <= 0:
            return None
        if done.n_tokens < 8:
            return None
        measured = done.n_tokens / done.gen_s  # one decode a token, the last one's too
        plan = self.result.plan
        if plan is None:
            return None
        cache = SpeedCache()
        cache.errors[self._placement(plan)] = measured / self.prediction.tokens_per_s - 1.0
        with contextlib.suppress(OSError):
            cache.save()
        return measured, self.prediction.tokens_per_s

    async def measure_speeds(
        self, spec: ModelSpec, devices: Sequence[Device], settings: LoadSettings, measure: bool
    ) -> Speeds | None:
        """Every device's speed (from speeds.json, or with `measure` timed now on probes of
        this model's shape) and every host's link (timed now): None where a device is not
        known and `measure` is off."""
        cache = self._speed_cache = SpeedCache()
        probe = probe_key(spec)
        threads = settings.n_threads
        build = self.desktop_build.system_info if self.desktop_build else ""
        keys = {"": device_key("desktop", "CPU", build, threads, probe)}
        by_host = {
            c.name: (c, inv, w)
            for c, inv, w in zip(self.clients, self.inventories, self.workers, strict=True)
        }
        seen: dict[str, int] = {}
        local = ""  # this desktop's GPU driver, read only where it has a GPU in the plan
        if any(not d.endpoint for d in devices):
            gpus, _ = await asyncio.get_running_loop().run_in_executor(None, read_gpus)
            local = host_driver(gpus)
        for d in devices:
            if d.endpoint:
                _, inv, worker = by_host[d.host]
                k = seen[d.host] = seen.get(d.host, -1) + 1
                keys[d.name] = device_key(
                    inv.agent_id,
                    f"{k}",
                    inv.system_info,
                    worker.threads,
                    probe,
                    host_driver(inv.gpus),
                )
            else:
                keys[d.name] = device_key("desktop", d.name, build, threads, probe, local)
        self._speed_keys = keys
        known = {name: None if settings.remeasure else cache.get(key) for name, key in keys.items()}
        missing = [name for name, sp in known.items() if sp is None]
        # what passing between devices costs: the vocabulary probe split over the first of them
        large = probe_layers(spec)
        chained = list(devices[: min(len(devices), large)]) if len(devices) >= 2 else []
        ckey = chain_key([keys[d.name] for d in chained]) if chained else ""
        chain = None if settings.remeasure or not ckey else cache.chains.get(ckey)
        unchained = bool(ckey) and chain is None
        if (missing or unchained) and not measure:
            return None
        if (missing or unchained) and self.result is not None and not self._replacing:
            what = [n or "this desktop's CPU" for n in missing]
            said = ", ".join(what + (["passing between the devices"] if unchained else []))
            raise WouldUnload(
                f"--strategy speed would time {said} on probes, which run in the loaded "
                "model's place: planning would unload it. Deploy (or Apply) to measure and "
                "load the new plan, or Unload first"
            )
        if missing or unchained:
            self.result = None  # the probes take the loaded model's place in the child
            if self._child_had_model:
                # probes in a fresh child, so the model (or what its dry run left) is gone
                # for sure. (The H100 host's aborts once blamed on a probe after a model were
                # the bench's: its loop stalled writing probes, the agents were dropped with
                # their tunnels, and ggml-rpc "Failed to connect"; _reach_agents now.)
                await self._new_child()
                await self.child.start()
            loop = asyncio.get_running_loop()
            try:
                probes = await loop.run_in_executor(None, probe_files, spec, None)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                raise PlanRefused(f"--strategy speed: {exc}") from None
            blocks, out_scale = await loop.run_in_executor(None, probe_bytes, spec, probes)
            scale = (layer_bytes(spec), out_scale)
            names = [d.name for d in devices]
            eps = self.endpoints

            async def timed(index: int) -> tuple[list[float], list[float], list[float]]:
                # the desktop's own base needs no vocabulary probe
                used = probes if index >= 0 else probes[:2]
                return await time_device(
                    self.child,
                    [probe_params(p, eps, index, len(devices), threads) for p in used],
                    sensitivity(blocks, scale, spec.n_layer, len(used)),
                )

            where = "this desktop's CPU"
            try:
                base_gen, base_batch, base_spread = await timed(-1)
                base = base_of(blocks, base_gen, base_batch)
                noise = base_noise(blocks, base_spread)
                cache.put(keys[""], DeviceSpeed(base[0], 0.0, base[1], 0.0, 0, noise_hop=noise))
                for name in missing:
                    if name:
                        where = f"{name} ({devices[names.index(name)].host})"
                        gen, batch, spread = await timed(names.index(name))
                        cache.put(keys[name], derive(blocks, scale, gen, batch, base, spread))
                if unchained:
                    where = f"{', '.join(d.name for d in chained)} together"
                    figures = [cache.get(keys[d.name]) for d in chained]
                    counts = chain_counts(large, len(chained))
                    load = chain_params(probes[-1], eps, counts, len(devices), threads)
                    gen, batch, spread = await time_device(self.child, [load])
                    chain = chain_of(
                        figures,
                        counts,
                        blocks[1] / large / scale[0],
                        scale[1],
                        base,
                        gen[0],
                        batch[0],
                        spread[0],
                    )
                    cache.chains[ckey] = chain
            except InferenceCrashed as crash:
                raise await self.explain(
                    crash,
                    "the speed strategy's probe on it",
                    "plan again, or plan with --strategy balanced",
                ) from None
            except ReplyStalled as stall:
                raise await self._stalled(stall, f"timing {where}") from None
            except RuntimeFailure as exc:  # a probe that would not load there (its memory)
                raise PlanRefused(
                    f"--strategy speed could not time {where} on its probe: {exc}; plan with "
                    "--strategy balanced, or free memory there"
                ) from None
            cache.save()
            known = {name: cache.get(key) for name, key in keys.items()}
        desk = known[""]
        assert desk is not None
        links = await gather_links([c for c, _, _ in by_host.values()])
        return Speeds(
            base=desk.hop,
            devices={name: sp for name, sp in known.items() if name and sp is not None},
            links=dict(zip(by_host, links, strict=True)),
            base_batch=desk.hop_batch,
            base_noise=desk.noise_hop,
            switch=chain.switch if chain else 0.0,
            switch_batch=chain.switch_batch if chain else 0.0,
            switch_noise=chain.noise if chain else 0.0,
        )

    async def open(
        self, settings: LoadSettings, on_progress: Callable[[float], None] | None = None
    ) -> LoadResult:
        """Connect, plan, refuse what would not fit, load, and compare plan with reality."""
        self.settings = settings
        await self.connect(settings.worker_threads)
        return await self.open_after_connect(settings, on_progress)

    def add_agent(self, address: str) -> None:
        """Take another agent into the next `reload` (a host that came back, or a new one)."""
        self.clients.append(self._client(address))

    async def reload(self, on_progress: Callable[[float], None] | None = None) -> LoadResult:
        """After a crash: load again, re-planned over the agents that still answer.

        The history stays; agents whose connection is gone and cannot be reopened are left
        out (the plan then says whether the model still fits on the rest).
        """
        if self.settings is None:
            raise RuntimeFailure("nothing was loaded yet to load again: load a model first")
        await self._new_child()  # started by open's connect
        for tunnel in self.tunnels.values():
            tunnel.close()
        self.tunnels.clear()
        kept = []
        for c in self.clients:
            if c.closed_reason:
                await c.close()
                c = self._client(c.address)
                try:
                    await c.connect()
                except RuntimeFailure:
                    self.dropped.append(c.address)
                    continue
            kept.append(c)
        self.clients = kept
        self._events.clear()
        # The dead child's handles (asyncio's subprocess transports and pipes) and the crash
        # with its traceback sit in reference cycles, holding ~0.6 MiB a reload until a full
        # collection, which a mostly idle desktop seldom reaches: the soak counted it as
        # growth. One collection per reload (milliseconds, beside a load of seconds).
        gc.collect()
        return await self.open(self.settings, on_progress)

    async def _new_child(self) -> None:
        """Close the inference child and put an unstarted one in its place."""
        await self.child.close()
        self.child = InferenceProcess()
        self._child_had_model = False

    def _warn(self, *texts: str) -> None:
        """Add warnings, each once: a reload plans and loads again, and says nothing twice."""
        self.warnings = tuple(dict.fromkeys((*self.warnings, *texts)))

    async def open_after_connect(
        self, settings: LoadSettings, on_progress: Callable[[float], None] | None = None
    ) -> LoadResult:
        """`open` for a session whose `connect` has run; `on_progress(fraction)` hears the
        load (tensors read and sent to every device)."""
        self.settings = settings  # what reload and recover load again
        self._replacing = True
        try:
            analytic, exact = await self.plan(settings)
        finally:
            self._replacing = False
        if settings.remeasure:  # measured now: a reload after a crash need not again
            self.settings = dataclasses.replace(settings, remeasure=False)
        refused = errors(self.verdicts)
        if refused:
            raise PlanRefused("refused before loading: " + "; ".join(str(v) for v in refused))
        self._warn(*(str(v) for v in self.verdicts))
        await self._reach_agents()  # one lost during the dry run
        try:
            self._child_had_model = True
            loaded = await self.child.load(
                settings.load_params(self.endpoints, exact.tensor_split), on_progress
            )
        except InferenceCrashed as crash:  # a worker or agent died while tensors went out
            raise await self.explain(crash) from None
        except ReplyStalled as stall:  # a worker stopped answering while tensors went out
            raise await self._stalled(stall, "the load") from None
        kernels = loaded.cpu_kernels
        if kernels.degraded:
            self._warn(f"CPU kernels: {kernels.summary}; `corral doctor` says more")
        self.stall = StallWatch()  # another load, another pace
        result = self._placements(loaded, self.warnings)
        self.result = dataclasses.replace(
            result,
            plan=exact,
            analytic=analytic,
            comparison=compare(exact, loaded.log.buffers),
            cpu_kernels=kernels.summary,
            cpu_buffers=tuple(
                name for name in loaded.log.buffers.get("model", {}) if is_extra_buffer(name)
            ),
        )
        return self.result

    async def _connect_agents(self) -> None:
        waiting = [c for c in self.clients if c.hello is None]
        results = await asyncio.gather(*(c.connect() for c in waiting), return_exceptions=True)
        failures = [str(r) for r in results if isinstance(r, BaseException)]
        if failures:
            raise AgentUnreachable("; ".join(failures))

    async def _start_worker(self, client: AgentClient, threads: int) -> WorkerState:
        """Start the worker (taking the agent's lease) and give it an endpoint for llama.cpp:
        a loopback tunnel through the authenticated channel, or, where the agent's owner
        opted into --trusted-network, its direct address."""
        await client.subscribe()
        state = await client.start_rpc(threads=threads)
        offered = client.hello is not None and "rpc-direct" in client.hello.features
        if offered and state.endpoint and self.trusted_network:
            return state
        if offered:  # the agent's owner opted in, this desktop did not: the tunnel it is
            note = (
                f"agent {client.name} offers its RPC worker unauthenticated "
                "(--trusted-network); this desktop uses the authenticated tunnel unless it opts "
                f"in too ({TRUSTED_NETWORK_ENV}=1)"
            )
            self._warn(note)
        old = self.tunnels.pop(client.address, None)
        if old is not None:
            old.close()
        tunnel = client.open_tunnel()
        self.tunnels[client.address] = tunnel
        return dataclasses.replace(state, endpoint=tunnel.endpoint)

    async def _probe_endpoints(
        self, clients: Sequence[AgentClient], endpoints: Sequence[str]
    ) -> None:
        loop = asyncio.get_running_loop()

        async def one(client: AgentClient, endpoint: str) -> None:
            tunnel = self.tunnels.get(client.address)
            try:
                if tunnel is not None and tunnel.endpoint == endpoint:
                    await loop.run_in_executor(None, tunnel.probe, 5.0)
                else:  # the agent's direct endpoint (--trusted-network)
                    await loop.run_in_executor(None, probe_rpc, endpoint, 5.0)
            except RpcProbeError as exc:
                why = tunnel.last_error if tunnel is not None and tunnel.last_error else str(exc)
                raise WorkerUnavailable(f"the RPC worker of agent {client.name}: {why}") from None

        await asyncio.gather(*(one(c, e) for c, e in zip(clients, endpoints, strict=True)))

    def _placements(self, loaded: Loaded, warnings: tuple[str, ...]) -> LoadResult:
        by_endpoint = {w.endpoint: c.name for c, w in zip(self.clients, self.workers, strict=True)}
        layers: dict[str, list[int]] = {}
        for layer, dev in loaded.log.layers.items():
            layers.setdefault(dev, []).append(int(layer))
        placements = []
        for d in loaded.log.devices:
            name = d.name
            endpoint = d.description if name.startswith("RPC") else ""
            host = by_endpoint.get(endpoint, endpoint) if endpoint else "local"
            if name in layers or endpoint:
                placements.append(
                    DevicePlacement(name, host, endpoint, tuple(sorted(layers.pop(name, []))))
                )
        for name, ls in layers.items():  # a device the listing missed
            placements.append(DevicePlacement(name, "local", "", tuple(sorted(ls))))
        return LoadResult(
            placements=tuple(placements),
            n_layer=loaded.n_layer,
            n_ctx=loaded.log.n_ctx,
            load_s=loaded.load_s,
            warnings=warnings,
        )

    # ------------------------------------------------------------------ chat

    async def ask(
        self, text: str, *, system: str = "", **sampling: Any
    ) -> AsyncGenerator[Event, None]:
        """Stream the reply to a user message; the exchange joins the history when done.
        `sampling`: childproto.Generate's fields (max_tokens, temp, seed, ...), whose
        defaults are the only ones."""
        if system and not self.history:
            self.history = [{"role": "system", "content": system}]
        messages = [*self.history, {"role": "user", "content": text}]

        def mine(rid: int) -> None:
            self._chat_rid = rid

        try:
            async with contextlib.aclosing(
                self.complete(messages, on_rid=mine, **sampling)
            ) as frames:
                async for frame in frames:
                    if isinstance(frame, Done):
                        self.history = [
                            *messages,
                            {"role": "assistant", "content": frame.content},
                        ]
                    yield frame
        finally:
            self._chat_rid = -1

    def reply_meter(self) -> ReplyMeter:
        """A meter for the next reply, sizing the KV cache per device by the loaded plan."""
        return ReplyMeter(self.result.plan if self.result else None)

    def take_back(self) -> str:
        """Drop the last exchange and return its user message, to be answered again."""
        if len(self.history) < 2 or self.history[-1]["role"] != "assistant":
            raise RuntimeFailure("nothing to regenerate yet: ask something first")
        *earlier, last_user, _ = self.history
        self.history = earlier
        return last_user["content"]

    async def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        on_rid: Callable[[int], None] | None = None,
        **sampling: Any,
    ) -> AsyncGenerator[Event, None]:
        """Stream a reply to these messages (the history is the caller's: the HTTP API).
        A consumer that may leave early closes it (`contextlib.aclosing`): the rest of the
        reply is then stopped and its slot freed. Up to `slots` run at once. `prompt` in
        `sampling`: a raw prompt instead of the messages (no chat template)."""
        prompt = sampling.pop("prompt", None)
        request = (
            Generate(prompt=prompt, **sampling)
            if prompt is not None
            else Generate.chat(messages, **sampling)
        )
        # a reply beside others keeps its own pace (they share the steps), from this load's
        watch = self.stall if not self._replying else self.stall.fork()
        self._replying += 1
        try:
            async with contextlib.aclosing(self.child.generate(request, watch, on_rid)) as frames:
                async for frame in frames:
                    yield frame
        except ReplyStalled as stall:
            if self._stop_timer is not None:  # the user had asked it to stop: no fault
                why = await self._why_stuck()
                raise InferenceCrashed(
                    f"the reply did not stop after the cancel; {stall}: {why}", "killed", []
                ) from None
            raise await self._stalled(stall, "the reply") from None
        except InferenceCrashed as crash:
            if self._stopped_by_kill:
                raise InferenceCrashed(
                    f"{self._stopped_by_kill}: {await self._why_stuck()}",
                    crash.exit_text,
                    crash.log_tail,
                ) from None
            raise await self.explain(crash) from None
        finally:
            self._replying -= 1
            if not self._replying:
                if self._stop_timer is not None:
                    self._stop_timer.cancel()
                self._stop_timer = None
                self._stopped_by_kill = ""

    async def embed(self, texts: list[str]) -> Embeddings:
        """Embeddings of `texts` by the loaded model, each of length 1."""
        try:
            return await self.child.embed(texts)
        except InferenceCrashed as crash:
            raise await self.explain(crash) from None

    @property
    def slots(self) -> int:
        """Replies the loaded model decodes together (LoadSettings.parallel)."""
        return self.child.slots

    def cancel(self) -> None:
        """Stop the chat's reply (`ask`'s; else every reply): at its next token, or, when it
        has not stopped STOP_GRACE s later or on a second cancel, by killing the inference
        process (llama.cpp blocked on a worker that stopped answering never looks at a
        cancel). Call it on the engine's loop; without a reply under way it does nothing."""
        if not self._replying:
            return
        if self._stop_timer is None:
            # the chat's own reply where one runs (replies to the API go on), else every one
            self.child.cancel(self._chat_rid)
            self._stop_timer = asyncio.get_running_loop().call_later(
                STOP_GRACE,
                self._stop_now,
                f"the reply did not stop within {STOP_GRACE:g} s of the cancel, so the inference "
                "process was killed",
            )
        else:
            self._stop_now("a second cancel killed the inference process at once")

    async def _stalled(self, stall: ReplyStalled, what: str) -> InferenceCrashed:
        """A reply, load or dry run that stopped moving (its child killed), as a crash that
        names the worker it waited on, where its agent can tell."""
        why = await self._why_stuck()
        stuck = why.split(": load the model again")[0] if why.startswith("the RPC") else ""
        cause = f"{what} stalled for {stall.after:.0f} s" + (f" ({stuck})" if stuck else "")
        return InferenceCrashed(f"{stall}: {why}", "killed", [], cause)

    async def _why_stuck(self) -> str:
        """Which worker a reply that would not stop was waiting on, as its agent sees it."""

        async def one(client: AgentClient) -> str:
            try:
                inv = await within(client.inventory(), 3)
            except (RuntimeFailure, TimeoutError):
                return ""  # a lost agent is explained by its connection's end, not here
            process = inv.worker.process
            return f"the RPC worker on {client.name} is {process}" if process else ""

        stuck = [s for s in await asyncio.gather(*(one(c) for c in self.clients)) if s]
        if stuck:
            return "; ".join(stuck) + ": load the model again once it runs"
        return (
            "llama.cpp was waiting on an RPC worker that stopped answering, or was still busy "
            "with a long step (`corral agents` shows the workers); load the model again"
        )

    def _stop_now(self, why: str) -> None:
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        if self.child.kill():
            self._stopped_by_kill = why

    # ------------------------------------------------------------------ failures

    def _on_event(self, client: AgentClient, event: AgentEvent) -> None:
        self._events.append((time.monotonic(), client, event))
        self._event_arrived.set()

    async def explain(
        self, crash: InferenceCrashed, lost: str = "the model", again: str = "load the model again"
    ) -> RuntimeFailure:
        """Turn a dead child into a message naming the host whose worker failed, if one did;
        `lost` is what went down with it, `again` what to do once the agent restarted it."""
        since = time.monotonic() - 10
        deadline = time.monotonic() + _CRASH_EVENT_WAIT
        while True:
            crashed = [
                (c, e) for t, c, e in self._events if t >= since and e.kind in ("crashed", "failed")
            ]
            gone = [c for c in self.clients if c.closed_reason]
            if crashed or gone or time.monotonic() >= deadline:
                break
            self._event_arrived.clear()
            try:
                await within(self._event_arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        cause = ""
        if crashed:
            client, event = crashed[-1]
            cause = f"the RPC worker on {client.name} died ({event.worker.last_exit})"
            msg = (
                f"the RPC worker on {client.name} died ({event.worker.last_exit}) and took "
                f"{lost} down ({crash.exit_text}); the agent is restarting it: {again}"
            )
            hint = crash_hint(event.worker.last_exit, [], doctor="corral-agent doctor")
            if hint:  # a native crash in the worker: that host's kernels, not the link
                msg += f". On {client.name}, {hint}"
        elif gone:
            cause = f"lost agent {gone[0].name} ({gone[0].closed_reason})"
            msg = (
                f"lost agent {gone[0].name} ({gone[0].closed_reason}) and {lost} with it "
                f"({crash.exit_text}): check that host, then {again}"
            )
        else:
            msg = f"{crash} — llama.cpp's last lines: " + " | ".join(crash.log_tail[-4:])
            cause = f"the inference process died ({crash.exit_text})"
        return InferenceCrashed(msg, crash.exit_text, crash.log_tail, cause)

    async def recover(
        self, cause: str = "", on_progress: Callable[[float], None] | None = None
    ) -> str:
        """Load again after the model was lost (a worker or an agent died, a reply stalled),
        on what answers now, keeping the history: a worker the agent restarted (or that was
        stopped: starting it again restarts it) is used again, an agent that cannot be
        reached is left out and the plan re-made without it. Tries RECOVER_TRIES times
        (a worker the agent is still restarting answers a moment later). Returns one line
        saying what happened; RuntimeFailure when nothing can load, PlanRefused when the
        model no longer fits on what is left."""
        t0 = time.monotonic()
        failure: RuntimeFailure | None = None
        for attempt in range(RECOVER_TRIES):
            if attempt:
                await asyncio.sleep(RECOVER_PAUSE)
            try:
                result = await self.reload(on_progress)
                break
            except PlanRefused:
                raise
            except RuntimeFailure as exc:
                failure = exc
        else:
            raise RuntimeFailure(
                f"{cause + '; ' if cause else ''}could not load again after {RECOVER_TRIES} "
                f"tries: {failure}"
            )
        hosts = ", ".join(dict.fromkeys(p.host for p in result.placements if p.layers))
        line = f"reloaded over {hosts} in {time.monotonic() - t0:.1f} s"
        if self.dropped:
            line += f", without {', '.join(self.dropped)}"
        return f"{cause}; {line}" if cause else line

    async def close(self, stop_workers: bool = False) -> None:
        await self.child.close()
        for tunnel in self.tunnels.values():
            tunnel.close()
        self.tunnels.clear()
        for c in self.clients:
            if stop_workers:
                try:
                    await c.stop_rpc()
                except RuntimeFailure:
                    pass
            await c.close()
