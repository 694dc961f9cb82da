"""A chat session against one model split across agents' RPC workers (or local only).

Order matters, because llama.cpp aborts on anything unexpected: connect to every agent,
compare RPC protocol versions, start the workers, say HELLO to every worker endpoint
ourselves, and only then let the inference child register them and load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.engine.ggml.loadlog import compact_ranges
from corral.engine.ggml.probe import RpcProbeError, probe_rpc
from corral.engine.protocol import AgentEvent, WorkerState

from .agent_client import AgentClient
from .errors import (
    AgentUnreachable,
    InferenceCrashed,
    RuntimeFailure,
    WorkerUnavailable,
)
from .inference import InferenceProcess

_CRASH_EVENT_WAIT = 2.0  # how long to wait for an agent to report the worker that died


@dataclass(frozen=True, slots=True)
class LoadSettings:
    model: Path
    n_ctx: int = 2048
    n_threads: int = 0
    n_gpu_layers: int = -1
    tensor_split: tuple[float, ...] = ()
    flash_attn: bool = False
    worker_threads: int = 0


@dataclass(frozen=True, slots=True)
class DevicePlacement:
    """Where llama.cpp put layers: one device, the host behind it, and its layers."""

    device: str  # llama.cpp's device name: RPC0, RPC1, CPU, CUDA0
    host: str  # the agent's name, or "local"
    endpoint: str  # RPC endpoint, empty for local devices
    layers: tuple[int, ...]

    def describe(self) -> str:
        where = f"{self.host} via {self.endpoint}" if self.endpoint else self.host
        return f"{self.device:<6} {where:<40} layers {compact_ranges(list(self.layers)) or '-'}"


@dataclass(frozen=True, slots=True)
class LoadResult:
    placements: tuple[DevicePlacement, ...]
    n_layer: int
    n_ctx: int
    load_s: float
    buffers: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def _proto(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return -1, -1


class ChatSession:
    """Agents, their workers and the inference child for one loaded model; keeps the history."""

    def __init__(self, agents: list[str]) -> None:
        self.clients = [AgentClient(a, on_event=self._on_event) for a in agents]
        self.child = InferenceProcess()
        self.history: list[dict[str, str]] = []
        self.workers: list[WorkerState] = []
        self.result: LoadResult | None = None
        self._events: list[tuple[float, AgentClient, AgentEvent]] = []
        self._event_arrived = asyncio.Event()

    # ------------------------------------------------------------------ open

    async def open(self, settings: LoadSettings) -> LoadResult:
        child_start = asyncio.ensure_future(self.child.start())
        try:
            await self._connect_agents()
            build = await child_start
        except BaseException:
            child_start.cancel()
            raise
        warnings = self._check_versions(build.get("build", {}))
        states = await asyncio.gather(
            *(self._start_worker(c, settings.worker_threads) for c in self.clients)
        )
        self.workers = list(states)
        endpoints = [s.endpoint for s in states]
        await self._probe_endpoints(endpoints)
        loaded = await self.child.load(
            model=str(settings.model),
            rpc=endpoints,
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers,
            tensor_split=list(settings.tensor_split) or None,
            flash_attn=settings.flash_attn,
        )
        self.result = self._placements(loaded, warnings)
        return self.result

    async def _connect_agents(self) -> None:
        results = await asyncio.gather(*(c.connect() for c in self.clients), return_exceptions=True)
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        if errors:
            raise AgentUnreachable("; ".join(errors))

    def _check_versions(self, build: dict[str, Any]) -> tuple[str, ...]:
        ours = str(build.get("rpc_proto", ""))
        warnings = []
        for c in self.clients:
            assert c.hello is not None
            theirs = c.hello.rpc_proto
            (maj, minor), (their_maj, their_minor) = _proto(ours), _proto(theirs)
            # ggml's client aborts unless majors are equal and the server's minor <= ours
            if their_maj != maj or their_minor > minor:
                raise WorkerUnavailable(
                    f"agent {c.name} runs ggml RPC protocol {theirs or 'unknown'}, this desktop "
                    f"{ours}: install llama-cpp-python {build.get('llama_cpp_python', '')} there"
                )
            if c.hello.llama_commit and c.hello.llama_commit != build.get("ggml_commit"):
                warnings.append(
                    f"agent {c.name} runs llama.cpp {c.hello.llama_commit}, this desktop "
                    f"{build.get('ggml_commit')}: kernels may differ"
                )
        return tuple(warnings)

    async def _start_worker(self, client: AgentClient, threads: int) -> WorkerState:
        await client.subscribe()
        return await client.start_rpc(threads=threads)

    async def _probe_endpoints(self, endpoints: list[str]) -> None:
        loop = asyncio.get_running_loop()

        async def one(client: AgentClient, endpoint: str) -> None:
            try:
                await loop.run_in_executor(None, probe_rpc, endpoint, 5.0)
            except RpcProbeError as exc:
                raise WorkerUnavailable(f"the RPC worker of agent {client.name}: {exc}") from None

        await asyncio.gather(*(one(c, e) for c, e in zip(self.clients, endpoints, strict=True)))

    def _placements(self, loaded: dict[str, Any], warnings: tuple[str, ...]) -> LoadResult:
        by_endpoint = {w.endpoint: c.name for c, w in zip(self.clients, self.workers, strict=True)}
        layers: dict[str, list[int]] = {}
        for layer, dev in loaded.get("layers", {}).items():
            layers.setdefault(dev, []).append(int(layer))
        placements = []
        for d in loaded.get("devices", []):
            name = d["name"]
            endpoint = d["description"] if name.startswith("RPC") else ""
            host = by_endpoint.get(endpoint, endpoint) if endpoint else "local"
            if name in layers or endpoint:
                placements.append(
                    DevicePlacement(name, host, endpoint, tuple(sorted(layers.pop(name, []))))
                )
        for name, ls in layers.items():  # a device the listing missed
            placements.append(DevicePlacement(name, "local", "", tuple(sorted(ls))))
        return LoadResult(
            placements=tuple(placements),
            n_layer=int(loaded.get("n_layer", 0)),
            n_ctx=int(loaded.get("n_ctx", 0)),
            load_s=float(loaded.get("load_s", 0.0)),
            buffers=loaded.get("buffers", {}),
            warnings=warnings,
        )

    # ------------------------------------------------------------------ chat

    async def ask(
        self,
        text: str,
        *,
        max_tokens: int = 256,
        temp: float = 0.0,
        seed: int = -1,
        ignore_eos: bool = False,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream the reply to a user message; the exchange joins the history when done."""
        messages = [*self.history, {"role": "user", "content": text}]
        try:
            async for frame in self.child.generate(
                messages=messages,
                max_tokens=max_tokens,
                temp=temp,
                seed=seed,
                ignore_eos=ignore_eos,
            ):
                if frame["op"] == "done":
                    self.history = [*messages, {"role": "assistant", "content": frame["content"]}]
                yield frame
        except InferenceCrashed as crash:
            raise await self.explain(crash) from None

    def cancel(self) -> None:
        self.child.cancel()

    # ------------------------------------------------------------------ failures

    def _on_event(self, client: AgentClient, event: AgentEvent) -> None:
        self._events.append((time.monotonic(), client, event))
        self._event_arrived.set()

    async def explain(self, crash: InferenceCrashed) -> RuntimeFailure:
        """Turn a dead child into a message naming the host whose worker failed, if one did."""
        since = time.monotonic() - 10
        deadline = time.monotonic() + _CRASH_EVENT_WAIT
        while True:
            crashed = [
                (c, e) for t, c, e in self._events if t >= since and e.kind in ("crashed", "failed")
            ]
            lost = [c for c in self.clients if c.closed_reason]
            if crashed or lost or time.monotonic() >= deadline:
                break
            self._event_arrived.clear()
            try:
                await asyncio.wait_for(self._event_arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        if crashed:
            client, event = crashed[-1]
            msg = (
                f"the RPC worker on {client.name} died ({event.worker.last_exit}) and took the "
                f"model down ({crash.exit_text}); the agent is restarting it: load the model again"
            )
        elif lost:
            msg = (
                f"lost agent {lost[0].name} ({lost[0].closed_reason}) and the model with it "
                f"({crash.exit_text}): check that host, then load again"
            )
        else:
            msg = f"{crash} — llama.cpp's last lines: " + " | ".join(crash.log_tail[-4:])
        return InferenceCrashed(msg, crash.exit_text, crash.log_tail)

    async def close(self, stop_workers: bool = False) -> None:
        await self.child.close()
        for c in self.clients:
            if stop_workers:
                try:
                    await c.stop_rpc()
                except RuntimeFailure:
                    pass
            await c.close()
