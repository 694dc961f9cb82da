"""Tokens a second of a plan, predicted from measured device and link speeds, and the
`speed` strategy: the split that fits with the best predicted generation speed.

Pure functions over frozen data. The figures come from engine.runtime.speeds, which times a
probe (a few layers of the model's own shape and weight type) on every device through its
real worker and tunnel; docs/PLANNER.md says how.

The model of one step of `n` tokens (n = 1: a generated token; n = a ubatch: prompt reading):

    time = base + sum over devices that hold layers (hop_d + layers_d x layer_d)
                + the output layer on the last device (its bytes / a layer's bytes x layer_d)
                + the logits sent back from that device (n_vocab x 4 bytes x n / bandwidth)
                + switch x (devices that hold layers - 1)

`base` is the desktop's own part of a step (llama_decode's bookkeeping, the embeddings,
sampling); `hop_d` what a device costs a step whatever it holds (the round trips of ggml's
RPC to its worker: sending the activations in, the graph, reading the result back); `layer_d`
one layer's time on it; `switch` what each device after the first costs a step beyond its
own hop, measured on a probe split over the devices (on a 16-core host's three CPU workers
a split over three ran some 3 ms a device slower than its devices' probes added up:
docs/PLANNER.md, "Passing between devices"). Time is additive along the chain: llama.cpp
runs the devices one after another for one sequence.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from corral.engine.model.spec import ModelSpec

from .placement import split_for_counts
from .plan import Device, Plan, Settings, compute_bytes, estimate, kv_bytes, weight_bytes

# A prediction the devices' noise leaves more uncertain than this share is flagged in the plan
NOISY = 0.15

# At most this many devices are searched exhaustively (every subset); beyond, candidate sets
# are the k best devices by their cost per layer at an even share, for every k.
EXHAUSTIVE = 12


@dataclass(frozen=True, slots=True)
class DeviceSpeed:
    """One device's measured costs, in seconds: per step (`hop`) and per layer (`layer`),
    for a generated token and for a prompt batch of `batch` tokens."""

    hop: float
    layer: float
    hop_batch: float = 0.0
    layer_batch: float = 0.0
    batch: int = 0  # prompt tokens per batch the *_batch figures were timed with (0: none)
    # the output layer on this device with its logits sent back to the desktop, per step (0:
    # not measured: estimated from its bytes and the link's bandwidth)
    output: float = 0.0
    output_batch: float = 0.0
    # how far the probes' passes leave a generated token's figures uncertain, in seconds:
    # per step, per layer and for the output layer (engine.runtime.speeds.derive, from each
    # probe's spread between passes; 0: not known)
    noise_hop: float = 0.0
    noise_layer: float = 0.0
    noise_output: float = 0.0

    def column(self, batch: bool = False) -> tuple[float, float, float]:
        """(hop, layer, output) for a generated token, or with `batch` a prompt batch."""
        if batch:
            return self.hop_batch, self.layer_batch, self.output_batch
        return self.hop, self.layer, self.output


@dataclass(frozen=True, slots=True)
class LinkSpeed:
    """The desktop's link to a host: round trip (s) and bytes a second (0: not measured, or a
    local device: no link)."""

    rtt: float = 0.0
    bandwidth: float = 0.0


@dataclass(frozen=True, slots=True)
class Speeds:
    """What a prediction needs: the desktop's base step time, and per device (by name, as
    llama.cpp names them: RPC0, CUDA0) its speed and its host's link."""

    base: float
    devices: dict[str, DeviceSpeed]
    links: dict[str, LinkSpeed]  # by host name
    base_batch: float = 0.0
    base_noise: float = 0.0  # seconds: the desktop's own probes' (see DeviceSpeed.noise_hop)
    # seconds a step costs for each device after the first it passes through, beyond the
    # devices' own figures (a generated token, a prompt batch), and how far the probe's
    # passes leave it uncertain (0: one device, or not measured)
    switch: float = 0.0
    switch_batch: float = 0.0
    switch_noise: float = 0.0

    def knows(self, devices: Sequence[Device]) -> bool:
        return all(d.name in self.devices for d in devices)


@dataclass(frozen=True, slots=True)
class Share:
    """One part of a step's predicted time: a device's layers, or a hop to it."""

    what: str  # "RPC0 (host-a): 12 layers" / "hop to host-a"
    seconds: float


@dataclass(frozen=True, slots=True)
class Prediction:
    tokens_per_s: float  # generation
    prompt_per_s: float  # prompt reading (0: not measured)
    step: float  # seconds per generated token
    shares: tuple[Share, ...]  # of `step`, largest first
    # the share of `step` the probes' noise leaves uncertain (`uncertainty`), and the
    # device whose noise counts most in it
    uncertainty: float = 0.0
    noisiest: str = ""

    def bottleneck(self) -> Share | None:
        return self.shares[0] if self.shares else None


def _layer_ratio(spec: ModelSpec) -> float:
    """The output layer's bytes in units of an average block's: its time on a device, since
    decoding is bound by reading weights."""
    per = layer_bytes(spec) if spec.n_layer else 1.0
    return weight_bytes(spec, [spec.n_layer]) / per if per else 1.0


def _counts(plan: Plan) -> list[int]:
    counts = [0] * len(plan.devices)
    for d in plan.layer_device:
        if d >= 0:
            counts[d] += 1
    return counts


def _chain(counts: Sequence[int]) -> list[tuple[int, int, bool]]:
    """The devices a step runs through, in order: (index, its blocks, whether it is the last,
    which also holds the output layer), for these layer counts (the output layer counted in
    the last device's)."""
    used = [i for i, c in enumerate(counts) if c > 0]
    return [(i, counts[i] - (i == used[-1]), i == used[-1]) for i in used]


def step_time(
    spec: ModelSpec,
    devices: Sequence[Device],
    counts: Sequence[int],
    speeds: Speeds,
    batch: bool = False,
) -> tuple[float, list[Share]]:
    """Seconds of one step (a generated token, or with `batch` a prompt batch) for these
    layer counts (the output layer counted in the last device's), and its parts."""
    chain = _chain(counts)
    if not chain:
        return 0.0, []
    ratio = _layer_ratio(spec)
    total = speeds.base_batch if batch else speeds.base
    shares = [Share("this desktop", total)]
    for i, blocks, last in chain:
        dev, sp = devices[i], speeds.devices[devices[i].name]
        hop, layer, measured = sp.column(batch)
        output = 0.0
        if last:
            output = measured if measured > 0 else ratio * layer
        work = blocks * layer + output
        shares.append(Share(f"{dev.name} ({dev.host}): {counts[i]} layers", work))
        link = speeds.links.get(dev.host, LinkSpeed()) if dev.endpoint else LinkSpeed()
        back = 0.0
        if last and link.bandwidth > 0 and measured <= 0:
            # the logits come back over the link (measured with the output layer, if it was)
            back = 4.0 * spec.n_vocab / link.bandwidth
        shares.append(Share(f"hop to {dev.host}" if dev.endpoint else f"{dev.name}", hop + back))
        total += work + hop + back
    switch = (speeds.switch_batch if batch else speeds.switch) * (len(chain) - 1)
    if switch > 0:
        shares.append(Share(f"passing between {len(chain)} devices", switch))
        total += switch
    shares.sort(key=lambda s: -s.seconds)
    return total, shares


def predict(spec: ModelSpec, plan: Plan, speeds: Speeds) -> Prediction | None:
    """The plan's predicted speed, or None where a device it uses was not measured."""
    counts = _counts(plan)
    used = [plan.devices[i] for i, c in enumerate(counts) if c > 0]
    if not used or not speeds.knows(used):
        return None
    step, shares = step_time(spec, plan.devices, counts, speeds)
    prompt = 0.0
    batch = [speeds.devices[d.name].batch for d in used]
    if all(batch):
        t, _ = step_time(spec, plan.devices, counts, speeds, batch=True)
        prompt = min(batch) / t if t > 0 else 0.0
    by = uncertainty(spec, plan.devices, counts, speeds)
    noisiest = max(by, key=lambda d: by[d], default="")
    noise = speeds.base_noise + sum(by.values()) + speeds.switch_noise * (len(used) - 1)
    return Prediction(
        1.0 / step if step > 0 else 0.0,
        prompt,
        step,
        tuple(shares),
        noise / step if step > 0 else 0.0,
        noisiest,
    )


def uncertainty(
    spec: ModelSpec, devices: Sequence[Device], counts: Sequence[int], speeds: Speeds
) -> dict[str, float]:
    """Seconds of a generated token's predicted step that each device's probe noise leaves
    uncertain, by device name (as `step_time` adds the step up: a step's, each block's, and
    on the last device the output layer's)."""
    out = {}
    for i, blocks, last in _chain(counts):
        sp = speeds.devices[devices[i].name]
        u = sp.noise_hop + blocks * sp.noise_layer
        if last:
            u += sp.noise_output if sp.output > 0 else _layer_ratio(spec) * sp.noise_layer
        out[devices[i].name] = u
    return out


# ------------------------------------------------------------------ the search


def _capacity(
    spec: ModelSpec, devices: Sequence[Device], s: Settings
) -> tuple[list[int], list[int]]:
    """Layers each device can hold beside its compute buffer, (in the middle, last): free
    memory less the reserve, over an average block's weights and cache (the plan is checked
    exactly afterwards). The last device in use also holds the output layer and the logits
    (n_ubatch x n_vocab floats in its compute buffer: 100 MB for SmolLM2 at 512); one in
    the middle holds neither, so where memory is tight the middle ones take more."""
    n = spec.n_layer
    per = (weight_bytes(spec, range(n)) + kv_bytes(spec, range(n), s)) / max(n, 1)
    ratio = _layer_ratio(spec)
    # the compute buffer of a device holding every block (the estimate's own; the same for
    # every RPC device, and for every local GPU), without and with the output layer
    compute = {
        (local, last): compute_bytes(
            spec, range(n + 1) if last else range(n), s, host=False, own_gpus=local
        )
        for local in {not d.endpoint for d in devices}
        for last in (False, True)
    }
    middle: list[int] = []
    end: list[int] = []
    for d in devices:
        for last, out in ((False, middle), (True, end)):
            room = d.free - s.reserve - compute[(not d.endpoint, last)]
            cap = max(int(room // per), 0) if per > 0 else n + 1
            out.append(max(int(cap - ratio), 0) if last else cap)
    return middle, end


def _fill(
    n_blocks: int, subset: Sequence[int], layer: Sequence[float], cap: Sequence[int]
) -> list[int] | None:
    """Blocks per device of `subset` (each at least one) that minimize the sum of their
    layer times within the capacities: one each, then the rest to the fastest first."""
    if len(subset) > n_blocks or sum(cap[i] for i in subset) < n_blocks:
        return None
    if any(cap[i] < 1 for i in subset):
        return None
    counts = {i: 1 for i in subset}
    left = n_blocks - len(subset)
    for i in sorted(subset, key=lambda k: layer[k]):
        take = min(left, cap[i] - 1)
        counts[i] += take
        left -= take
        if not left:
            break
    return [counts.get(i, 0) for i in range(len(layer))]


def fastest(
    spec: ModelSpec, devices: Sequence[Device], s: Settings, speeds: Speeds
) -> tuple[list[int], float] | None:
    """Layer counts per device (the output layer in the last used device's) with the least
    predicted time per generated token among the splits that fit by the capacity estimate,
    and that time; None when nothing fits or a device was not measured."""
    if not devices or not speeds.knows(devices):
        return None
    n = spec.n_layer
    layer = [speeds.devices[d.name].layer for d in devices]
    cap, out_cap = _capacity(spec, devices, s)  # out_cap: the last used device's
    best: tuple[list[int], float] | None = None
    for subset in _candidates(devices, speeds, n):
        last = max(subset)
        caps = [out_cap[i] if i == last else cap[i] for i in range(len(devices))]
        counts = _fill(n, subset, layer, caps)
        if counts is None:
            continue
        counts[last] += 1  # the output layer
        t, _ = step_time(spec, devices, counts, speeds)
        if best is None or t < best[1]:
            best = (counts, t)
    return best


def _candidates(devices: Sequence[Device], speeds: Speeds, n: int) -> list[tuple[int, ...]]:
    idx = range(len(devices))
    if len(devices) <= EXHAUSTIVE:
        return [c for k in idx for c in itertools.combinations(idx, k + 1)]
    out = []
    for k in range(1, len(devices) + 1):
        share = max(n // k, 1)
        by = sorted(
            idx,
            key=lambda i: (
                speeds.devices[devices[i].name].hop + share * speeds.devices[devices[i].name].layer
            ),
        )
        out.append(tuple(sorted(by[:k])))
    return out


def speed_plan(
    spec: ModelSpec,
    devices: Sequence[Device],
    s: Settings,
    speeds: Speeds,
    measured: Mapping[tuple[int, ...], float] | None = None,
) -> Plan:
    """The fastest split that fits: the search's counts, checked against the exact memory
    estimate (a device short of memory gives up a layer to the next fastest until it fits),
    then layers moved one at a time from the slowest device in use to a faster one while
    that still fits (the capacity estimate is a layer or so cautious). `measured`: splits a
    reply was timed on before (layer counts per device → seconds a step measured); one that
    ran faster than the choice (as measured, where it was, else as predicted) and fits is
    taken instead: a measurement beats a prediction. Raises ValueError when no device was
    measured or nothing fits (the caller says why)."""
    found = fastest(spec, devices, s, speeds)
    if found is None:
        raise ValueError("no split fits by the measured speeds")
    counts = found[0]
    layer = [speeds.devices[d.name].layer for d in devices]
    plan = estimate(spec, devices, s, "speed", split_for_counts(counts))
    for _ in range(spec.n_layer + 1):
        short = [i for i, _ in plan.short() if i >= 0 and counts[i] > 1]
        if not short:
            break
        i = short[0]
        room = [k for k in range(len(devices)) if k != i and counts[k] > 0]
        if not room:
            return plan
        counts[i] -= 1
        counts[min(room, key=lambda k: layer[k])] += 1
        plan = estimate(spec, devices, s, "speed", split_for_counts(counts))
    if not plan.fits:
        return plan
    best = step_time(spec, devices, counts, speeds)[0]
    for _ in range(spec.n_layer + 1):
        used = [k for k in range(len(devices)) if counts[k] > 0]
        slow = max((k for k in used if counts[k] > 1), key=lambda k: layer[k], default=None)
        if slow is None:
            break
        for fast in sorted((k for k in used if layer[k] < layer[slow]), key=lambda k: layer[k]):
            trial = counts[:]
            trial[slow] -= 1
            trial[fast] += 1
            t = step_time(spec, devices, trial, speeds)[0]
            if t >= best:
                continue
            moved = estimate(spec, devices, s, "speed", split_for_counts(trial))
            if moved.fits:
                counts, plan, best = trial, moved, t
                break
        else:
            break
    return _measured_faster(spec, devices, s, plan, counts, best, measured or {})


def _measured_faster(
    spec: ModelSpec,
    devices: Sequence[Device],
    s: Settings,
    plan: Plan,
    counts: Sequence[int],
    best: float,
    measured: Mapping[tuple[int, ...], float],
) -> Plan:
    """The plan of the fastest split measured before that beats `counts` (its measured
    step where it has one, else `best`, its prediction) and fits; else `plan`."""
    mine = measured.get(tuple(counts), best)
    for known, step in sorted(measured.items(), key=lambda kv: kv[1]):
        if step >= mine:
            break
        if len(known) != len(devices) or sum(known) != sum(counts):
            continue
        try:
            trial = estimate(spec, devices, s, "speed", split_for_counts(known))
        except ValueError:
            continue
        if trial.fits:
            return trial
    return plan


def without_each(
    spec: ModelSpec, plan: Plan, s: Settings, speeds: Speeds
) -> list[tuple[str, float | None]]:
    """For each host the plan uses: the predicted change in tokens/s of the fastest split
    without it (-0.3: 30 % slower), or None where the model does not fit without it."""
    now = predict(spec, plan, speeds)
    if now is None:
        return []
    hosts = dict.fromkeys(d.host for d, c in zip(plan.devices, _counts(plan), strict=True) if c)
    out: list[tuple[str, float | None]] = []
    if len(hosts) < 2:
        return out
    for host in hosts:
        rest = [d for d in plan.devices if d.host != host]
        keep = [i for i, d in enumerate(plan.devices) if d.host != host]
        found = fastest(spec, rest, s, speeds)
        if found is None:
            out.append((host, None))
            continue
        counts = [0] * len(plan.devices)
        for k, c in zip(keep, found[0], strict=True):
            counts[k] = c
        trial = estimate(spec, plan.devices, s, "speed", split_for_counts(counts))
        if not trial.fits:
            out.append((host, None))
            continue
        out.append((host, (1.0 / found[1]) / now.tokens_per_s - 1.0))
    return out


def with_speeds(devices: Sequence[Device], speeds: Speeds) -> list[Device]:
    """The devices with their relative speed (1 / layer time) filled in, for display."""
    return [
        dataclasses.replace(d, speed=1.0 / speeds.devices[d.name].layer)
        if d.name in speeds.devices and speeds.devices[d.name].layer > 0
        else d
        for d in devices
    ]


def layer_bytes(spec: ModelSpec) -> float:
    """An average block's weight bytes: what a generated token reads per layer."""
    return weight_bytes(spec, range(spec.n_layer)) / spec.n_layer if spec.n_layer else 0.0


def host_summary(speeds: Speeds | None, devices: Sequence[Device], host: str) -> str:
    """One host's measured figures in a few words, as the window's hosts table shows them:
    its link, then each of its devices' time per layer ("" when nothing was measured)."""
    if speeds is None:
        return ""
    parts = []
    link = speeds.links.get(host)
    if link is not None:
        bw = f", {link.bandwidth / 1e6:.0f} MB/s" if link.bandwidth else ""
        parts.append(f"round trip {link.rtt * 1000:.2f} ms{bw}")
    for d in devices:
        sp = speeds.devices.get(d.name)
        if d.host == host and sp is not None:
            parts.append(f"{d.name} {sp.layer * 1000:.3f} ms a layer")
    return " · ".join(parts)


def describe_speed(
    speeds: Speeds | None,
    prediction: Prediction | None,
    leave_out: Sequence[tuple[str, float | None]] = (),
    measured_before: float | None = None,
    layer_bytes: float = 0.0,
) -> list[str]:
    """In words, as corral plan and the window show them: each link and device measured
    (with `layer_bytes`, a layer's weights, the rate it reads them at: a figure to hold
    against the device's memory bandwidth),
    the predicted speed (and, for a split a reply was measured on before, what it ran at),
    the largest shares of a token's time, and what leaving out each host would do."""
    if speeds is None:
        return ["speed: not measured for these devices (the speed strategy measures them once)"]
    lines = []
    for host, link in speeds.links.items():
        bw = f"{link.bandwidth / 1e6:.0f} MB/s" if link.bandwidth else "bandwidth unknown"
        lines.append(f"link to {host}: round trip {link.rtt * 1000:.2f} ms, {bw}")
    for name, dev in speeds.devices.items():
        rate = (
            f" (weights read at {layer_bytes / dev.layer / 1e9:.0f} GB/s)"
            if (layer_bytes and dev.layer > 0)
            else ""
        )
        lines.append(
            f"{name}: {dev.layer * 1000:.3f} ms a layer{rate}, {dev.hop * 1000:.2f} ms a step "
            f"(prompt: {dev.layer_batch * 1000:.2f} / {dev.hop_batch * 1000:.2f} ms per "
            f"{dev.batch}-token batch)"
        )
    if speeds.switch > 0:
        lines.append(
            f"passing between devices: {speeds.switch * 1000:.2f} ms a step for each device "
            "after the first"
        )
    if prediction is None:
        return lines
    p = prediction
    prompt = f", prompt {p.prompt_per_s:.0f} tok/s" if p.prompt_per_s else ""
    within = f" (± {100 * p.uncertainty:.0f} %)" if p.uncertainty >= 0.005 else ""
    lines.append(f"predicted: {p.tokens_per_s:.1f} tokens/s generating{within}{prompt}")
    if p.uncertainty > NOISY and p.noisiest in speeds.devices:
        lines.append(
            f"uncertain: {p.noisiest}'s probes did not repeat from pass to pass (a busy "
            f"host?), so this prediction may be off by {100 * p.uncertainty:.0f} %; plan "
            "again with --remeasure when that host is quiet"
        )
    if measured_before is not None:
        ran = p.tokens_per_s * (1 + measured_before)
        lines.append(
            f"this split's last measured reply: {ran:.1f} tokens/s "
            f"({100 * measured_before:+.0f} % from the prediction)"
        )
    parts = ", ".join(f"{s.what} {100 * s.seconds / p.step:.0f} %" for s in p.shares[:4])
    lines.append(f"a token's time: {parts}")
    for host, change in leave_out:
        if change is None:
            lines.append(f"leaving out {host}: the model would not fit")
        else:
            lines.append(f"leaving out {host}: {100 * change:+.0f} % tokens/s")
    return lines
