"""Desktop-side planning glue: devices from agents, buffers back to devices, plan vs actual.

The planner (engine.planner) is pure; this module turns what agents and llama.cpp report
into its inputs and reads llama.cpp's buffer lines back onto the plan's devices.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from corral.engine.ggml.devices import GgmlDevice, pick_worker_devices
from corral.engine.ggml.kernelcheck import is_extra_buffer
from corral.engine.model.spec import ModelSpec
from corral.engine.planner.plan import (
    Device,
    MiB,
    Plan,
    Usage,
    apply_dry_run,
    estimate,
    host_extra_bytes,
)
from corral.engine.protocol import DeviceInfo, Inventory

from .childproto import DryRunReport

_RPC_BUFFER = re.compile(r"RPC(\d+)\[(.+)\]$")


def served_devices(inv: Inventory) -> list[DeviceInfo]:
    """The devices an agent's RPC worker serves, in the worker's order."""
    by_name = {d.name: d for d in inv.devices}
    names = list(inv.worker.devices) or pick_worker_devices((d.name, d.type) for d in inv.devices)
    return [by_name.get(n, DeviceInfo(name=n)) for n in names]


def local_gpus(local: Sequence[GgmlDevice]) -> list[GgmlDevice]:
    """The desktop's own GPUs among the devices its inference child listed."""
    return [d for d in local if d.type in ("gpu", "igpu") and not d.name.startswith("RPC")]


def names_by_place(before: Sequence[Device], after: Sequence[Device]) -> dict[str, str]:
    """The same devices in another agent order: each name in `after` → its name in
    `before` (llama.cpp names RPC devices by position; a device is its host and its place
    among that host's devices)."""

    def places(devices: Sequence[Device]) -> dict[tuple[str, int], str]:
        seen: dict[str, int] = {}
        out = {}
        for d in devices:
            k = seen[d.host] = seen.get(d.host, -1) + 1
            out[(d.host, k)] = d.name
        return out

    old = places(before)
    return {name: old[place] for place, name in places(after).items() if place in old}


def devices_from_agents(
    names: Sequence[str],
    inventories: Sequence[Inventory],
    endpoints: Sequence[str],
    local: Sequence[GgmlDevice] = (),
) -> list[Device]:
    """Devices in llama.cpp's order: each agent's worker devices (RPC0, RPC1, ... across
    agents, in registration order), then the desktop's own GPUs."""
    out: list[Device] = []
    for name, inv, endpoint in zip(names, inventories, endpoints, strict=True):
        for d in served_devices(inv):
            out.append(Device(f"RPC{len(out)}", name, endpoint, d.memory_free, d.memory_total))
    for d in local_gpus(local):
        out.append(Device(d.name, "local", "", d.memory_free, d.memory_total))
    return out


def _device_of_buffer(buffer: str, devices: Sequence[Device]) -> int | None:
    m = _RPC_BUFFER.match(buffer)
    if m:
        index, endpoint = int(m.group(1)), m.group(2)
        same = [i for i, d in enumerate(devices) if d.endpoint == endpoint]
        return same[index] if index < len(same) else None
    for i, d in enumerate(devices):
        if not d.endpoint and d.name == buffer:
            return i
    return None  # CPU, CPU_Mapped, CPU_REPACK, CUDA_Host: the desktop's memory


def usage_from_buffers(
    buffers: Mapping[str, Mapping[str, float]], devices: Sequence[Device]
) -> tuple[list[Usage], Usage]:
    """What llama.cpp logged after a load, per device and for the host."""
    per = [dict(weights=0, kv=0, compute=0, output=0) for _ in devices]
    host = dict(weights=0, kv=0, compute=0, output=0, extra=0)
    field = {"model": "weights", "KV": "kv", "compute": "compute", "output": "output"}
    for kind, by_buffer in buffers.items():
        for buffer, mib in by_buffer.items():
            i = _device_of_buffer(buffer, devices)
            target = host if i is None else per[i]
            name = field[kind]
            if i is None and kind == "model" and is_extra_buffer(buffer):
                name = "extra"
            target[name] += round(mib * MiB)
    return [Usage(**u) for u in per], Usage(**host)


def overcounted_devices(plan: Plan) -> list[int]:
    """The devices whose dry-run compute buffer llama.cpp overstates.

    Measured: the expectation exceeds the allocation by exactly 16 x n_embd x n_ubatch bytes
    on every device that takes its input from another device — all but the first in layer
    order (CPU workers: the second RPC device, 192 of 192 rows; H200 with RPC0, RPC1 and the
    local CUDA0: RPC1 and CUDA0, 64 of 64 rows) — except a device that holds only the
    output layer, where it is allocated (CPU and H200: 3.0 MiB for n_embd 384, 4.0 for 512).
    """
    n_layer = len(plan.layer_device) - 1
    blocks = {d for d in plan.layer_device[:n_layer] if d >= 0}
    order = list(dict.fromkeys(d for d in plan.layer_device if d >= 0))
    return [d for d in order[1:] if d in blocks]


def spec_after_dry_run(spec: ModelSpec, dry: DryRunReport) -> ModelSpec:
    """The spec with llama.cpp's own sliding-window layers and window, as its dry run
    logged them (the architecture table in engine.model.spec may not know this one)."""
    swa = set(dry.swa_layers)
    n_swa = dry.n_swa if swa else 0
    if swa == {layer.index for layer in spec.layers if layer.is_swa} and n_swa == spec.n_swa:
        return spec
    layers = tuple(dataclasses.replace(layer, is_swa=layer.index in swa) for layer in spec.layers)
    return dataclasses.replace(spec, layers=layers, swa=bool(swa), n_swa=n_swa)


def exact_plan(plan: Plan, spec: ModelSpec, dry: DryRunReport) -> Plan:
    """The plan for `spec` (spec_after_dry_run's) with the compute buffers from llama.cpp's
    dry run, less its overcount."""
    fresh = estimate(spec, plan.devices, plan.settings, plan.strategy, plan.tensor_split)
    plan = dataclasses.replace(plan, usage=fresh.usage, host=fresh.host)
    usage, host = usage_from_buffers({"compute": dry.log.buffers.get("compute", {})}, plan.devices)
    compute = [u.compute for u in usage]
    for dev in overcounted_devices(plan):
        compute[dev] = max(0, compute[dev] - 16 * spec.n_embd * plan.settings.n_ubatch)
    # the extra CPU buffers the child will use (the self-test's factors; none when off)
    factors = dict(dry.cpu_extra)
    extra = host_extra_bytes(spec, plan.layer_device, factors)
    return apply_dry_run(plan, compute, host.compute, extra)


@dataclass(frozen=True, slots=True)
class Comparison:
    """Planned vs what llama.cpp reported, per device and for the host (bytes)."""

    names: tuple[str, ...]
    planned: tuple[Usage, ...]
    actual: tuple[Usage, ...]

    def rows(self) -> list[tuple[str, int, int, float]]:
        out = []
        for name, p, a in zip(self.names, self.planned, self.actual, strict=True):
            err = (p.total - a.total) / a.total if a.total else 0.0
            out.append((name, p.total, a.total, err))
        return out


def compare(plan: Plan, buffers: Mapping[str, Mapping[str, float]]) -> Comparison:
    usage, host = usage_from_buffers(buffers, plan.devices)
    names = (*(f"{d.name} {d.host}" for d in plan.devices), "host")
    return Comparison(names, (*plan.usage, plan.host), (*usage, host))


def layer_map_matches(plan: Plan, logged: Mapping[str, str]) -> list[str]:
    """Layers whose device in llama.cpp's log differs from the plan (empty when equal)."""
    wrong = []
    for il, d in enumerate(plan.layer_device):
        want = plan.devices[d].name if d >= 0 else "CPU"
        got = logged.get(str(il))
        if got != want:
            wrong.append(f"layer {il}: planned {want}, llama.cpp {got}")
    return wrong
