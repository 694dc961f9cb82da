"""Plans: the layer map, the tensor_split that produces it, and memory per device.

Pure functions over frozen data. Weights and KV are exact (tensor bytes, the KV formula);
the compute buffer is an analytic estimate from the graph's largest live tensors, good for
the UI. Before a deploy, `apply_dry_run` replaces it with llama.cpp's own simulated
allocation (engine.runtime), which is what the go/no-go decision uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from corral.engine.model.spec import LayerSpec, ModelSpec

from .kvtypes import row_bytes
from .placement import HOST, assign_layers, split_for_counts, split_for_weights

MiB = 1 << 20
N_CTX_ALIGN = 256  # llama.cpp pads n_ctx to this; llama-cpp-python keeps the unpadded size
STRATEGIES = ("balanced", "fewest", "speed")


def pad_ctx(n_ctx: int) -> int:
    """The context size llama.cpp will really use."""
    return max(N_CTX_ALIGN, -(-n_ctx // N_CTX_ALIGN) * N_CTX_ALIGN)


class PlanError(ValueError):
    """Settings the planner cannot work with (bad --layers, no devices...)."""


@dataclass(frozen=True, slots=True)
class Device:
    """One device llama.cpp will see, in its order (RPC devices first, then local GPUs)."""

    name: str  # as llama.cpp will name it: RPC0, RPC1, CUDA0
    host: str  # the agent's name, or "local"
    endpoint: str  # RPC endpoint, "" for local devices
    free: int
    total: int
    speed: float = 1.0  # relative tokens/s, for the speed strategy


@dataclass(frozen=True, slots=True)
class Settings:
    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    reserve: int = 256 * MiB  # kept free on every device (driver, fragmentation, others)
    swa_full: bool = True  # sliding-window layers keep the whole context (llama.cpp's default)
    n_seq: int = 1  # sequences decoded together (slots), each with its own n_ctx / n_seq cells

    @property
    def n_ctx_padded(self) -> int:
        return pad_ctx(self.n_ctx)


@dataclass(frozen=True, slots=True)
class Usage:
    weights: int = 0
    kv: int = 0
    compute: int = 0
    output: int = 0  # host only: the logits buffer
    extra: int = 0  # host only: weights copied into llama.cpp's extra CPU buffers (AMX, REPACK)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.output + self.extra


@dataclass(frozen=True, slots=True)
class Plan:
    devices: tuple[Device, ...]
    settings: Settings
    strategy: str
    tensor_split: tuple[float, ...]
    layer_device: tuple[int, ...]  # per layer 0..n_layer (n_layer = output); HOST = -1
    usage: tuple[Usage, ...]  # per device
    host: Usage  # the desktop's own memory: embeddings, layers left on the CPU, buffers
    compute_source: str = "analytic"  # or "dry run"
    host_free: int = 0  # what the desktop can still allocate (0: unknown, not checked)

    def layers_of(self, device: int) -> list[int]:
        return [il for il, d in enumerate(self.layer_device) if d == device]

    def short(self) -> list[tuple[int, str]]:
        """(device index, what is missing) for every device that would run out of memory;
        HOST (-1) for the desktop's own memory, where its free memory is known."""
        out = []
        reserve = self.settings.reserve
        pairs = zip(self.devices, self.usage, strict=True)
        needs = [(i, dev.free, use) for i, (dev, use) in enumerate(pairs)]
        if self.host_free > 0:
            needs.append((HOST, self.host_free, self.host))
        for i, free, use in needs:
            budget = free - reserve
            if use.total > budget:
                out.append(
                    (
                        i,
                        f"does not fit: needs {use.total / MiB:.0f} MiB, has "
                        f"{max(budget, 0) / MiB:.0f} MiB free after the "
                        f"{reserve / MiB:.0f} MiB reserve "
                        f"(short by {(use.total - budget) / MiB:.0f} MiB)",
                    )
                )
        return out

    def where(self, i: int) -> tuple[str, str]:
        """(host, device) of device index `i`, HOST included."""
        if i == HOST:
            return "this desktop", "host memory"
        return self.devices[i].host, self.devices[i].name

    def shortfalls(self) -> list[str]:
        """One line per device that would run out of memory, naming the missing amount."""
        out = []
        for i, why in self.short():
            host, device = self.where(i)
            out.append(f"{device} on {host}: {why}")
        return out

    @property
    def fits(self) -> bool:
        return not self.shortfalls()


# ------------------------------------------------------------------ memory


def swa_cells(spec: ModelSpec, s: Settings) -> int:
    """Cells of the sliding-window layers' cache: the whole context, or with a windowed
    cache (swa_full off) the window and one ubatch, padded to 256 (llama_kv_cache_iswa)."""
    n = s.n_ctx_padded
    if s.swa_full or not spec.n_swa:
        return n
    return pad_ctx(min(n, spec.n_swa + s.n_ubatch))


def kv_bytes(spec: ModelSpec, layers: Sequence[int], s: Settings) -> int:
    """Exact KV cache bytes for these layers (docs/LLAMACPP.md's formula; windowed layers hold
    swa_cells)."""
    n, windowed = s.n_ctx_padded, swa_cells(spec, s)
    return sum(
        (windowed if spec.layers[il].is_swa else n)
        * (
            row_bytes(s.type_k, spec.layers[il].n_embd_k_gqa)
            + row_bytes(s.type_v, spec.layers[il].n_embd_v_gqa)
        )
        for il in layers
        if il < spec.n_layer
    )


def weight_bytes(spec: ModelSpec, layers: Sequence[int]) -> int:
    """Exact weight bytes: the blocks, plus output (and its norm) for the output layer."""
    total = 0
    for il in layers:
        if il < spec.n_layer:
            total += spec.layers[il].weight_bytes
        else:
            total += spec.output_bytes + spec.output_norm_bytes
    return total


def compute_bytes(
    spec: ModelSpec, layers: Sequence[int], s: Settings, host: bool, own_gpus: bool = False
) -> int:
    """Analytic compute-buffer estimate: the largest set of tensors alive at once, per token
    of a ubatch.

    The KQ mask lives through the whole graph (8 bytes per context cell with flash attention,
    16 without; an interleaved sliding-window model has a second mask over the window's
    cells); without flash attention the scores and their softmax add 4 x n_head bytes per
    cell; the FFN stage holds 3 x ffn_width floats (a mixture of experts: the experts a token
    uses); the device with the output layer also holds the logits (n_vocab floats). The
    n_embd multiples were fitted to llama.cpp's own dry-run sizes on the CPU backend over
    6 shapes x 8 settings (bench/plan_accuracy.py reports the error).

    An interleaved sliding-window model keeps two caches, each with its own write indices,
    and a query wider than n_embd (gemma3's 8 x 128 heads over 512) widens the attention
    stage: both are added where they apply. `own_gpus`: the devices are this process's own
    GPUs, not RPC workers (`_own_gpu_per_token`).
    """
    if not layers and not host:
        return 0
    ub, e = s.n_ubatch, spec.n_embd
    if host and spec.n_layer in layers and len(layers) == spec.n_layer + 1:
        return ub * _one_device_per_token(spec, s)
    if own_gpus and not (host and any(il < spec.n_layer for il in layers)):
        return ub * _own_gpu_per_token(spec, layers, s, host)
    blocks = [spec.layers[il] for il in layers if il < spec.n_layer]
    ctx = _mask_cells(spec, s, blocks if blocks else spec.layers)
    kvw = _kv_width(spec)
    mask = 8 if s.flash_attn else 16
    ffn = 12 * _ffn_width(spec)
    # without flash attention the V cache's write indices (one int64 per value: V is stored
    # transposed) and the K and V rows stay alive through the layer: 32 bytes per K/V value
    # (per cache, where the host makes both caches' indices); a query wider than n_embd widens
    # the attention stage
    idx = 0 if s.flash_attn else 32 * kvw
    wide = 0 if s.flash_attn else 4 * max(0, _q_width(spec) - e)
    second = 0 if s.flash_attn else 32 * kvw * (_caches(spec) - 1)
    if host:
        per = mask * ctx + 20 * e + idx + second
    else:
        per = 0
    if blocks:
        n_head = max(layer.n_head for layer in blocks)
        iswa = _caches(spec) == 2
        if s.flash_attn:
            # the FFN stage: 3 x ffn_width floats and 24 x n_embd; on the device that holds
            # layer 0 (every device of a sliding-window model) the allocator keeps 4 x n_embd
            # more beside an FFN wider than 2 x n_embd, 8 x n_embd beside one of 4 x n_embd
            step = _ffn_step(spec) if iswa or 0 in layers else 0
            stage = mask * ctx + max(ffn + 24 * e + step, 40 * e)
        else:
            scored = max(swa_cells(spec, s) if b.is_swa else s.n_ctx_padded for b in blocks)
            # the device that holds layer 0 keeps the embeddings it was sent alive through
            # the first attention (4 x n_embd more than a device further down the chain)
            attn = 4 * n_head * scored + (32 if 0 in layers else 28) * e
            stage = mask * ctx + idx + max(attn + (0 if iswa else 2 * wide), ffn + 24 * e)
            stage += wide if iswa else 0
            stage += second if len({b.is_swa for b in blocks}) == 2 else 0
        per = max(per, stage)
    if spec.n_layer in layers:
        # fitted on dry runs, less the 16 x n_embd per token that llama.cpp's dry run expects
        # on this device but does not allocate (engine.runtime.planning.exact_plan)
        if blocks:
            per = max(per, 4 * spec.n_vocab + mask * ctx + 24 * e)
        else:  # the output layer alone: no mask, and only its norm before the logits
            per = 4 * spec.n_vocab + 20 * e
    return int(ub * per)


def _mask_cells(spec: ModelSpec, s: Settings, blocks: Sequence[LayerSpec]) -> int:
    """Cells of the attention masks these layers read: the context for full-attention
    layers, and for an interleaved sliding-window model's windowed layers their own mask
    over swa_cells (two masks when a device holds both kinds)."""
    windowed = any(b.is_swa for b in blocks)
    full = any(not b.is_swa for b in blocks) or not blocks
    return (s.n_ctx_padded if full else 0) + (swa_cells(spec, s) if windowed else 0)


def _ffn_width(spec: ModelSpec) -> int:
    return spec.ffn_width or spec.n_ff


def _ffn_step(spec: ModelSpec) -> int:
    """With flash attention, what ggml's allocator keeps beside a dense FFN wider than
    2 x n_embd (4 x n_embd more; 8 x n_embd from 4 x n_embd on), on the device that holds
    layer 0: measured on 26 shapes (ffn / n_embd 1.3 to 4), not derived."""
    ffw, e = _ffn_width(spec), spec.n_embd
    if spec.n_expert > 1 or ffw <= 2 * e:
        return 0
    return 4 * e if ffw < 4 * e else 8 * e


def _kv_share(spec: ModelSpec) -> float:
    """KV heads per query head (of the first layer): the GQA ratio the estimates scale by."""
    first = spec.layers[0] if spec.layers else None
    return first.n_head_kv / first.n_head if first and first.n_head else 1.0


def _caches(spec: ModelSpec) -> int:
    """KV caches llama.cpp keeps: two for an interleaved sliding-window model (windowed and
    full layers), else one."""
    kinds = {layer.is_swa for layer in spec.layers}
    return 2 if len(kinds) == 2 else 1


def _kv_width(spec: ModelSpec) -> int:
    return max((layer.n_embd_v_gqa for layer in spec.layers), default=0)


def _q_width(spec: ModelSpec) -> int:
    """Width of the attention's query (n_head x head_dim), which may exceed n_embd."""
    return max((layer.n_head * layer.head_dim_k for layer in spec.layers), default=spec.n_embd)


def _own_gpu_per_token(spec: ModelSpec, layers: Sequence[int], s: Settings, host: bool) -> int:
    """Compute bytes per ubatch token on this process's own GPUs (CUDA0…, no RPC) and in the
    pinned host buffer beside them, fitted to llama.cpp's loads on an H200 over 15 shapes
    (dense, sliding window, experts, head dims 64-256, vocabularies 320-152k) x context
    512/4096 x flash attention off/on (docs/PLANNER-results-h200-local.md).

    The graph's inputs live in host memory and are copied once to the GPU, where they stay
    for the whole graph: the masks (f32; f16 with flash attention), and without flash
    attention the V cache's write indices, one int64 per value, since V is stored
    transposed (per cache). The host buffer holds those inputs and the token embeddings
    (8 x n_embd). On the GPU, the attention stage (scores n_head x cells f32 without flash
    attention) or the FFN stage (3 x ffn_width floats) adds to them; the logits stage comes
    after the inputs are freed."""
    e, cells = spec.n_embd, _mask_cells(spec, s, spec.layers)
    mask = 2 if s.flash_attn else 4
    inputs = mask * cells + 32 + (0 if s.flash_attn else 8 * _kv_width(spec) * _caches(spec))
    if host:
        return inputs + 8 * e
    blocks = [spec.layers[il] for il in layers if il < spec.n_layer]
    per = 0
    if blocks:
        qw = _q_width(spec)
        stage = 12 * _ffn_width(spec) + 8 * e + 4 * qw
        if not s.flash_attn:
            scored = max(swa_cells(spec, s) if b.is_swa else s.n_ctx_padded for b in blocks)
            n_head = max(b.n_head for b in blocks)
            stage = max(stage, 4 * n_head * scored + 8 * e + 8 * qw)
        per = inputs + stage
    if spec.n_layer in layers:
        per = max(per, 4 * spec.n_vocab + 4 * e)
    return per


def _one_device_per_token(spec: ModelSpec, s: Settings) -> int:
    """Compute bytes per ubatch token when one CPU device runs the whole graph (a local
    load): ggml's allocator reuses memory across the graph, so the peak is the largest
    stage alone. Fitted to llama.cpp's dry runs of 8 shapes × context 512/4096 × flash
    attention off/on (bench/plan_accuracy.py --splits local): attention holds the scores
    (n_head f32 per cell) and the f32 mask without flash attention, the FFN holds 3 × n_ff
    floats (and the f16 mask with it), the output its logits."""
    ctx, e = s.n_ctx_padded, spec.n_embd
    cells = _mask_cells(spec, s, spec.layers)
    n_head = max((layer.n_head for layer in spec.layers), default=1)
    kvw = _kv_width(spec)
    ffn = 12 * _ffn_width(spec) + 12 * e
    if s.flash_attn:
        stages = [ffn + 2 * cells + _ffn_step(spec)]
    else:
        wide = 8 * max(0, _q_width(spec) - e)
        stages = [
            4 * n_head * ctx + 4 * cells + 20 * e + 8 * kvw + wide + 20,
            ffn + 4 * cells + 8 * kvw,
        ]
    stages.append(4 * spec.n_vocab + 8 * e)  # the logits
    return max(stages)


def estimate(
    spec: ModelSpec,
    devices: Sequence[Device],
    s: Settings,
    strategy: str,
    tensor_split: Sequence[float],
) -> Plan:
    """Memory per device and on the host for one tensor_split."""
    layer_device = (
        assign_layers(spec.n_layer, tensor_split) if devices else [HOST] * (spec.n_layer + 1)
    )
    by_device: dict[int, list[int]] = {}
    for il, dev in enumerate(layer_device):
        by_device.setdefault(dev, []).append(il)
    # only this process's GPUs (no RPC device): llama.cpp's graph is laid out differently
    own = bool(devices) and all(not d.endpoint for d in devices)
    usage = []
    for d in range(len(devices)):
        layers = by_device.get(d, [])
        usage.append(
            Usage(
                weight_bytes(spec, layers),
                kv_bytes(spec, layers, s),
                compute_bytes(spec, layers, s, host=False, own_gpus=own),
            )
        )
    on_host = by_device.get(HOST, [])
    # tied embeddings: llama.cpp's output layer on the host uses token_embd itself, not a copy
    # (a copy only where the output goes to another buffer type: a device, or an extra CPU
    # buffer, which host_extra_bytes counts)
    reused = spec.output_bytes if spec.tied_embeddings and spec.n_layer in on_host else 0
    host = Usage(
        weights=spec.token_embd_bytes + spec.other_bytes + weight_bytes(spec, on_host) - reused,
        kv=kv_bytes(spec, on_host, s),
        compute=compute_bytes(spec, on_host, s, host=True, own_gpus=own),
        output=spec.n_vocab * 4,
    )
    return Plan(
        tuple(devices), s, strategy, tuple(tensor_split), tuple(layer_device), tuple(usage), host
    )


# ------------------------------------------------------------------ strategies


def make_plan(
    spec: ModelSpec,
    devices: Sequence[Device],
    settings: Settings = Settings(),
    strategy: str = "balanced",
    layers: Sequence[int] | None = None,
) -> Plan:
    """Place every layer (and the output layer) on the devices, by strategy or by hand."""
    devices = tuple(devices)
    if not devices:
        return estimate(spec, devices, settings, "local", ())
    if layers is not None:
        if len(layers) != len(devices):
            raise PlanError(
                f"--layers gives {len(layers)} counts for {len(devices)} devices "
                f"({', '.join(d.name for d in devices)})"
            )
        if any(c < 0 for c in layers) or sum(layers) != spec.n_layer + 1:
            raise PlanError(
                f"--layers must add up to {spec.n_layer + 1} ({spec.n_layer} layers and the "
                f"output layer), got {sum(layers)}"
            )
        return estimate(spec, devices, settings, "manual", split_for_counts(layers))
    budgets = [max(d.free - settings.reserve, 0) for d in devices]
    if strategy == "balanced":
        return estimate(spec, devices, settings, strategy, split_for_weights(spec.n_layer, budgets))
    if strategy == "speed":
        return estimate(
            spec,
            devices,
            settings,
            strategy,
            split_for_weights(spec.n_layer, [d.speed for d in devices]),
        )
    if strategy == "fewest":
        return _fewest(spec, devices, settings, budgets)
    raise PlanError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


def _fewest(spec: ModelSpec, devices: tuple[Device, ...], s: Settings, budgets: list[int]) -> Plan:
    """The fewest hosts that fit: every extra RPC hop costs generation speed."""
    hosts: dict[str, int] = {}
    for d, b in zip(devices, budgets, strict=True):
        hosts[d.host] = hosts.get(d.host, 0) + b
    order = sorted(hosts, key=lambda h: -hosts[h])

    def with_hosts(n: int) -> Plan:
        chosen = set(order[:n])
        weights = [b if d.host in chosen else 0 for d, b in zip(devices, budgets, strict=True)]
        if sum(weights) <= 0:
            weights = [1 if d.host in chosen else 0 for d in devices]
        return estimate(spec, devices, s, "fewest", split_for_weights(spec.n_layer, weights))

    # More hosts (largest first) only add room, so the smallest count that fits is found by
    # bisection: a handful of estimates even for 64 hosts.
    low, high = 1, len(order)
    if not with_hosts(high).fits:
        return with_hosts(high)  # nothing fits: the plan that comes closest, with shortfalls
    while low < high:
        mid = (low + high) // 2
        if with_hosts(mid).fits:
            high = mid
        else:
            low = mid + 1
    return with_hosts(low)


def what_fits(spec: ModelSpec, plan: Plan) -> list[str]:
    """For a plan that does not fit: settings that would (the largest context, a quantized
    KV cache), as command-line options, from the analytic estimate with the same devices,
    split and host memory. Empty when neither would.

    Where `plan` holds llama.cpp's dry run, the estimate is corrected by it first: each
    device's analytic compute buffer is scaled up by how much the dry run found more at
    these settings (never down), so a family the estimate underrates (see docs/PLANNER.md)
    gets suggestions that still fit."""
    s = plan.settings
    scale = [1.0] * (len(plan.devices) + 1)  # per device, the host last
    if plan.compute_source == "dry run":
        at_plan = estimate(spec, plan.devices, s, plan.strategy, plan.tensor_split)
        pairs = zip((*plan.usage, plan.host), (*at_plan.usage, at_plan.host), strict=True)
        scale = [
            max(1.0, real.compute / est.compute) if est.compute else 1.0 for real, est in pairs
        ]

    # the estimate is a few percent off either way: what it suggests must fit with 5 % to spare
    devices = tuple(dataclasses.replace(d, free=d.free * 19 // 20) for d in plan.devices)

    def fits(settings: Settings) -> bool:
        p = estimate(spec, devices, settings, plan.strategy, plan.tensor_split)
        usage = tuple(
            dataclasses.replace(u, compute=round(u.compute * k))
            for u, k in zip(p.usage, scale[:-1], strict=True)
        )
        host = dataclasses.replace(
            p.host, extra=plan.host.extra, compute=round(p.host.compute * scale[-1])
        )
        return dataclasses.replace(
            p, usage=usage, host=host, host_free=plan.host_free * 19 // 20
        ).fits

    tips = []
    if s.n_ctx_padded > N_CTX_ALIGN and fits(dataclasses.replace(s, n_ctx=N_CTX_ALIGN)):
        low, high = 1, s.n_ctx_padded // N_CTX_ALIGN - 1  # in units of 256; low fits
        while low < high:
            mid = (low + high + 1) // 2
            if fits(dataclasses.replace(s, n_ctx=mid * N_CTX_ALIGN)):
                low = mid
            else:
                high = mid - 1
        tips.append(f"--ctx {low * N_CTX_ALIGN}")
    for kv in ("q8_0", "q4_0"):  # a quantized V cache needs flash attention
        quantized = dataclasses.replace(s, type_k=kv, type_v=kv if s.flash_attn else s.type_v)
        if kv != s.type_k and fits(quantized):
            tips.append(f"--cache-type-k {kv}" + (f" --cache-type-v {kv}" if s.flash_attn else ""))
            break
    return tips


def host_extra_bytes(
    spec: ModelSpec, layer_device: Sequence[int], factors: Mapping[int, float]
) -> int:
    """Bytes llama.cpp copies into its extra CPU buffers for the layers left on the host.

    The mapped file still holds these weights: the copies come on top. `factors` is, per
    ggml type, the extra buffer's bytes per byte of weight that the CPU-kernel self-test
    measured on this host (1.0 for CPU_REPACK's interleaving; AMX pads); a type without an
    entry stays where it is. The output layer's matrix (token_embd's copy when tied) counts
    when the output layer is on the host."""
    if not factors:
        return 0
    total = 0.0
    for il, dev in enumerate(layer_device):
        if dev != HOST:
            continue
        if il < spec.n_layer:
            total += sum(b * factors.get(t, 0.0) for t, b in spec.layers[il].matmuls)
        else:
            total += spec.output_bytes * factors.get(spec.output_type, 0.0)
    return round(total)


def apply_dry_run(
    plan: Plan, compute_by_device: Sequence[int], host_compute: int, host_extra: int = 0
) -> Plan:
    """The same plan with llama.cpp's simulated compute buffers instead of the estimate, and
    the host's extra CPU buffers (which the dry run logs as empty: see host_extra_bytes)."""
    usage = tuple(
        dataclasses.replace(u, compute=c)
        for u, c in zip(plan.usage, compute_by_device, strict=True)
    )
    return dataclasses.replace(
        plan,
        usage=usage,
        compute_source="dry run",
        host=dataclasses.replace(plan.host, compute=host_compute, extra=host_extra),
    )
