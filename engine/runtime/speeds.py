"""Measuring what decides a split's speed: each device's time per layer and per step, and
each host's link (docs/PLANNER.md, "Placement by measured speed").

A device is timed on probes: random-weight llama models of the model's own layer shape
(n_embd, heads, head size, FFN width) and weight types (`probe_types`: the probe's layers
have the model's layers' types in the model's proportions, and the output its type: on the
H100 host's CPU worker the model's Q6_K output layer took about five times what a pure-Q4_K
probe said), one of 1 layer and one of `probe_layers`
(the model's own blocks' bytes, up to PROBE_BYTES) with a 320-token vocabulary, and the
second again with the model's own vocabulary. Each is loaded in the inference child with
every layer on that one device, through its real worker and tunnel, and TimeSteps gives the
mean time of a generated token as a reply makes it (the child's own scheduler step) and the
median of a PROBE_BATCH-token prompt batch; the probes are timed in passes until they settle
(`settled`), and each keeps the median of its passes (`centre`).

The difference of the two probes over their difference in block bytes is the time a byte
of blocks takes, and one of the model's average blocks takes its bytes' worth (decoding is
bound by reading weights). The large probe reads what the model reads, so it runs from
memory where the model does and from a cache where the model does; the 1-layer probe is
the intercept (its layer may run from a cache: that overstates a layer by at most a
layer's time over the large probe's layers less one). Probes of other sizes did worse: a
pair of 1 and 2 layers ran from a 300 MiB cache and called a layer half what the model
took; a pair of 8 and 16 layers, where the 8 partly ran from a cache, called it 30 % more.
What is left of the 1-layer probe, less its block's bytes' worth and the desktop's own part
(the same probes on its CPU alone), is the device's fixed cost per step: its "hop"; what
the vocabulary probe takes beyond the large one is the output layer with its logits.

Figures are kept per agent, device, llama.cpp build, GPU driver, worker threads and probe
shape in speeds.json (the cache dir), and measured again when any of those change. A link
(round trip, bytes a second through the agent's TLS channel: the path its RPC tunnel takes)
is measured at every plan: it is quick and changes with the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import platformdirs

from corral.engine.model.spec import ModelSpec, read_model_spec
from corral.engine.planner.placement import split_for_counts
from corral.engine.planner.speed import DeviceSpeed, LinkSpeed, layer_bytes
from corral.engine.protocol.messages import GpuInfo

from .childproto import LoadParams

log = logging.getLogger(__name__)

# weights a token of the large probe reads, at most (the model's own blocks, if fewer)
PROBE_BYTES = 512 << 20
PROBE_BATCH = 64  # prompt tokens of a timed prompt batch
PROBE_VOCAB = 320
REPS = 15  # decodes of each size per probe (the median)
ECHO = 1 << 20  # bytes an agent sends back to time the link's bandwidth
# the probe's base type: the model's most common matrix type (ggml type: llama.cpp file type,
# quantized "pure", every matrix that type), else the file type nearest in bits per weight;
# each weight then takes the model's own type where it is one of these (`probe_types`)
_OF_TYPE = {
    1: "f16",
    2: "q4_0",
    3: "q4_1",
    6: "q5_0",
    7: "q5_1",
    8: "q8_0",
    10: "q2_k",
    11: "q3_k_s",
    12: "q4_k_s",
    13: "q5_k_s",
    14: "q6_k",
    30: "bf16",
}
# bits per weight of llama.cpp's file types (k-quants: their usual mix)
_BPW = (
    ("f16", 16.0),
    ("q8_0", 8.5),
    ("q6_k", 6.56),
    ("q5_k_m", 5.7),
    ("q4_k_m", 4.85),
    ("q4_0", 4.5),
    ("q3_k_m", 3.9),
    ("q2_k", 2.96),
)


def cache_dir() -> Path:
    override = os.environ.get("CORRAL_SPEEDS_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("corral")) / "speeds"


def _params(spec: ModelSpec) -> float:
    """Weights of an average block (what a token's decode reads)."""
    first = spec.layers[0]
    q = first.n_head * first.head_dim_k
    kv = 2 * first.n_embd_k_gqa
    return spec.n_embd * (2 * q + kv) + 3 * spec.n_embd * (spec.ffn_width or spec.n_ff)


def probe_shape(spec: ModelSpec) -> tuple[dict[str, int], str]:
    """The probes' hyper-parameters and weight type for this model."""
    first = spec.layers[0]
    bpw = 8 * layer_bytes(spec) / max(_params(spec), 1.0)
    by_type: dict[int, int] = {}
    for layer in spec.layers:
        for kind, n in layer.matmuls:
            by_type[kind] = by_type.get(kind, 0) + n
    common = max(by_type, key=lambda k: by_type[k]) if by_type else -1
    ftype = _OF_TYPE.get(common) or min(_BPW, key=lambda t: abs(t[1] - bpw))[0]
    shape = {
        "n_embd": spec.n_embd,
        "n_head": first.n_head,
        "n_head_kv": first.n_head_kv,
        "head_dim": first.head_dim_k,
        "n_ff": spec.ffn_width or spec.n_ff,
    }
    return shape, ftype


def probe_layers(spec: ModelSpec) -> int:
    """Layers of the large probe: the model's own, or as many as read PROBE_BYTES of its
    blocks a token if fewer, and at least 2."""
    fill = -(-PROBE_BYTES // max(int(layer_bytes(spec)), 1))
    return max(2, min(spec.n_layer, fill))


def _mix(spec: ModelSpec, k: int) -> list[tuple[tuple[str, int], ...]]:
    """k of the model's layers' weight types, in the model's proportions as nearly as k
    allows (largest remainders)."""
    kinds: dict[tuple[tuple[str, int], ...], int] = {}
    for layer in spec.layers:
        kinds[layer.weight_types] = kinds.get(layer.weight_types, 0) + 1
    share = {kind: n * k / spec.n_layer for kind, n in kinds.items()}
    seats = {kind: int(x) for kind, x in share.items()}
    for kind in sorted(share, key=lambda kd: seats[kd] - share[kd])[: k - sum(seats.values())]:
        seats[kind] += 1
    return [kind for kind in kinds for _ in range(seats[kind])]


def probe_types(spec: ModelSpec, n_layer: int) -> tuple[tuple[str, int], ...]:
    """(a regular expression of a tensor's name, ggml type) for each 2-D weight of a probe of
    `n_layer` layers: the model's mix (`_mix`), so a probe reads what the model reads
    (llama.cpp's Q4_K_M gives ffn_down and attn_v Q6_K in about half the layers, and a CPU
    may read those slower a byte). A type the quantizer cannot make without an importance matrix
    (IQ*) keeps the probe's base type."""
    out = []
    for j, kind in enumerate(_mix(spec, n_layer)):
        for name, ggml_type in kind:
            if ggml_type in _OF_TYPE:
                out.append((rf"^blk\.{j}\.{re.escape(name)}$", ggml_type))
    return tuple(out)


def probe_output_type(spec: ModelSpec) -> int:
    """The ggml type the vocabulary probe's output takes: the model's (its output.weight, or
    its token embeddings where they are tied), else -1 (the base type)."""
    return spec.output_type if spec.output_type in _OF_TYPE else -1


def probe_key(spec: ModelSpec) -> str:
    shape, ftype = probe_shape(spec)
    large = probe_layers(spec)
    types = [probe_types(spec, n) for n in (1, large)]
    mix = hashlib.sha256(repr((types, probe_output_type(spec))).encode()).hexdigest()[:8]
    return "-".join(f"{v}" for v in shape.values()) + f"-{ftype}-{large}-{mix}-v6"


def probe_files(spec: ModelSpec, directory: Path | None = None) -> tuple[Path, ...]:
    """The probes for this model's shape, built once (in a child process: llama.cpp's
    quantizer runs there, never in the desktop's own process): 1 layer, the large
    (`probe_layers`), and the large with the model's own vocabulary (its output layer and
    logits)."""
    directory = directory or cache_dir() / "probes"
    directory.mkdir(parents=True, exist_ok=True)
    sweep_partial_probes(directory)
    key = probe_key(spec)
    large = probe_layers(spec)
    counts = (1, large, large)
    vocabs = (PROBE_VOCAB, PROBE_VOCAB, max(spec.n_vocab, PROBE_VOCAB))
    paths = tuple(
        directory / (f"{key}-{n}.gguf" if v == PROBE_VOCAB else f"{key}-{n}-v{v}.gguf")
        for n, v in zip(counts, vocabs, strict=True)
    )
    for n_layer, n_vocab, path in zip(counts, vocabs, paths, strict=True):
        if not path.exists():
            write_probe(spec, n_layer, n_vocab, path)
    return paths


# A probe is written in a folder of its own beside its final place, locked (flock) by the
# desktop writing it; a desktop killed mid-write leaves the folder (for the 7.24B, some 15 GB
# of f16 source) and, with its process, the lock.
_PARTIAL = "writing-"


def sweep_partial_probes(directory: Path) -> int:
    """Remove what killed writers left in `directory`: every unlocked _PARTIAL folder (a
    writer still at work holds its lock; a folder whose lock is not made yet is a writer
    just starting). Returns how many went."""
    removed = 0
    for folder in directory.glob(_PARTIAL + "*"):
        try:
            fd = os.open(folder / ".lock", os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a writer holds it
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


def write_probe(spec: ModelSpec, n_layer: int, n_vocab: int, path: Path) -> None:
    """A probe of this model's shape with `n_layer` layers and `n_vocab` tokens at `path`
    (built in a child process: llama.cpp's quantizer runs there)."""
    shape, ftype = probe_shape(spec)
    code = (
        "import sys, json, os\n"
        "from corral.engine.procs import die_with_parent\n"
        "die_with_parent()\n"  # a desktop killed mid-build takes its writer with it
        "from corral.engine.model.synthetic import TinyLlama, write_tiny_llama\n"
        "from corral.engine.ggml.quantize import quantize\n"
        "a = json.loads(sys.stdin.read())\n"  # per-layer types: can outgrow an argument
        "src = sys.argv[1] + '.f16'\n"
        "write_tiny_llama(src, TinyLlama(n_layer=a['n_layer'], n_embd=a['n_embd'],"
        " n_head=a['n_head'], n_head_kv=a['n_head_kv'], head_dim=a['head_dim'],"
        " n_ff=a['n_ff'], n_vocab=a['n_vocab'], tied_embeddings=False, dtype='f16'))\n"
        "if a['ftype'] == 'f16':\n"
        "    os.replace(src, sys.argv[1])\n"
        "else:\n"
        "    quantize(src, sys.argv[1], a['ftype'], pure=True, types=a['types'],"
        " output_type=a['output_type'])\n"
        "    os.unlink(src)\n"
    )
    args = dict(
        shape,
        n_layer=n_layer,
        n_vocab=n_vocab,
        ftype=ftype,
        types=probe_types(spec, n_layer),
        output_type=probe_output_type(spec),
    )
    with tempfile.TemporaryDirectory(prefix=_PARTIAL, dir=path.parent) as tmp:
        lock = os.open(os.path.join(tmp, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held until the probe is in place, or we die
            part = Path(tmp) / path.name
            done = subprocess.run(
                [sys.executable, "-c", code, str(part)],
                input=json.dumps(args),
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"could not build the speed probe {path.name}: {tail[0]}")
            os.replace(part, path)
        finally:
            os.close(lock)


class Chain(NamedTuple):
    """What each device after the first costs a step beyond the devices' own figures
    (Speeds.switch), in seconds: a generated token, a prompt batch, and how far the probe's
    passes leave the first uncertain."""

    switch: float
    switch_batch: float
    noise: float


def chain_key(device_keys: Sequence[str]) -> str:
    """speeds.json's key of a chain: its devices' keys, in order."""
    return ";".join(device_keys)


def chain_counts(k: int, n: int) -> list[int]:
    """The large probe's `k` blocks over `n` devices (n <= k), as evenly as can be (the
    first take the rest), in layers as llama.cpp counts them: the output layer on the last."""
    counts = [k // n + (1 if i < k % n else 0) for i in range(n)]
    counts[-1] += 1
    return counts


def switch_cost(
    hops: Sequence[float],
    layers: Sequence[float],
    counts: Sequence[int],
    output: float,
    base: float,
    measured: float,
) -> float:
    """Seconds a step of a probe split over several devices (`counts` layers each, the
    output layer in the last's) took beyond what their own figures add up to (the base,
    each device's hop and its blocks x `layers` (a probe block's time there), the last's
    `output`), per device after the first; never below 0 (a split that ran faster than its
    parts is charged nothing, not credited)."""
    n = len(counts)
    blocks = [c - (i == n - 1) for i, c in enumerate(counts)]
    parts = base + sum(h + b * t for h, t, b in zip(hops, layers, blocks, strict=True))
    return max(measured - parts - output, 0.0) / max(n - 1, 1)


def chain_of(
    figures: Sequence[DeviceSpeed | None],
    counts: Sequence[int],
    block_scale: float,
    out_scale: float,
    base: tuple[float, float],
    gen: float,
    batch: float,
    spread: float,
) -> Chain:
    """What passing between devices costs, from the vocabulary probe split over them
    (`counts` each; timed `gen` and `batch`, its generated steps spread `spread` between
    passes) and the devices' own figures: a probe block takes `block_scale` of a model
    layer's time there (its bytes over a model layer's), and the model's output layer
    `out_scale` times the probe's (`probe_bytes`)."""
    if any(f is None for f in figures):
        raise ValueError("a device of the chain was not measured")
    figs = [f for f in figures if f is not None]

    def cost(column: bool, base: float, measured: float) -> float:
        cols = [f.column(column) for f in figs]
        hops, layers = [c[0] for c in cols], [c[1] * block_scale for c in cols]
        return switch_cost(hops, layers, counts, cols[-1][2] / out_scale, base, measured)

    return Chain(
        cost(False, base[0], gen), cost(True, base[1], batch), spread / max(len(figs) - 1, 1)
    )


class SpeedCache:
    """speeds.json: measured devices by key (agent, device, build, threads, probe); what
    passing between devices costs, by the devices' keys in order (`chain_key`); and each
    split's measured / predicted - 1, by placement."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "speeds.json"
        self.entries: dict[str, dict[str, float]] = {}
        self.chains: dict[str, Chain] = {}
        self.errors: dict[str, float] = {}
        # read once; a file that is not what save() writes counts as empty (measured again),
        # and a damaged chains section as no chains (a file from before them has none)
        damaged = (OSError, ValueError, TypeError, AttributeError, KeyError)
        with contextlib.suppress(*damaged):
            loaded = json.loads(self.path.read_text())
            self.entries = {
                str(k): {str(f): float(x) for f, x in v.items()}
                for k, v in loaded.get("devices", {}).items()
            }
            self.errors = {str(k): float(v) for k, v in loaded.get("errors", {}).items()}
            with contextlib.suppress(*damaged):
                self.chains = {
                    str(k): Chain(*(float(v[f]) for f in Chain._fields))
                    for k, v in loaded.get("chains", {}).items()
                }

    def get(self, key: str) -> DeviceSpeed | None:
        found = self.entries.get(key)
        if not found:
            return None
        try:
            return DeviceSpeed(**{k: (int(v) if k == "batch" else v) for k, v in found.items()})
        except TypeError:
            return None

    def put(self, key: str, speed: DeviceSpeed) -> None:
        self.entries[key] = {k: float(v) for k, v in asdict(speed).items()}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part = self.path.with_suffix(".part")
        chains = {k: c._asdict() for k, c in self.chains.items()}
        body = {"devices": self.entries, "chains": chains, "errors": self.errors}
        part.write_text(json.dumps(body, indent=1))
        os.replace(part, self.path)


def split_device_key(key: str) -> tuple[str, str, str, str, str] | None:
    """(agent, device, build hash, threads, probe shape) of a device_key; None if not one."""
    fields = key.split("|")
    if len(fields) != 5:
        return None
    agent, device, built, threads, probe = fields
    return agent, device, built, threads.removeprefix("t"), probe


def host_driver(gpus: Sequence[GpuInfo]) -> str:
    """The GPU driver versions of a host's GPUs, as device_key takes them ("" for none)."""
    return ",".join(sorted({g.driver for g in gpus if g.driver}))


def device_key(
    agent_id: str, device: str, build: str, threads: int, probe: str, driver: str = ""
) -> str:
    """speeds.json's key: agent, its device's index, a hash of llama.cpp's build line and
    the host's GPU driver version (a rebuilt or updated worker, or a new driver, is measured
    again), threads, probe shape."""
    facts = build + (f"|driver {driver}" if driver else "")
    built = hashlib.sha256(facts.encode()).hexdigest()[:12]
    return f"{agent_id}|{device}|{built}|t{threads}|{probe}"


def probe_bytes(spec: ModelSpec, probes: Sequence[Path]) -> tuple[tuple[int, int], float]:
    """The block bytes of the 1-layer and the large probe, and the model's output matrix's
    bytes over the vocabulary probe's (what the output layer's time scales by)."""
    small, large = (read_model_spec(p).weight_bytes for p in probes[:2])
    out = read_model_spec(probes[2]).output_bytes
    return (small, large), (spec.output_bytes / out if out else 1.0)


def probe_params(
    probe: Path, rpc: Sequence[str], device: int, n_devices: int, threads: int
) -> LoadParams:
    """Every layer of the probe on device `device` (-1: the desktop's CPU alone)."""
    split = tuple(1.0 if i == device else 0.0 for i in range(n_devices))
    return _probe_load(probe, rpc, split if device >= 0 else (), threads)


def chain_params(
    probe: Path, rpc: Sequence[str], counts: Sequence[int], n_devices: int, threads: int
) -> LoadParams:
    """The probe's layers split over the first devices, `counts` each (`chain_counts`)."""
    split = split_for_counts([*counts, *([0] * (n_devices - len(counts)))])
    return _probe_load(probe, rpc, tuple(split), threads)


def _probe_load(
    probe: Path, rpc: Sequence[str], split: tuple[float, ...], threads: int
) -> LoadParams:
    return LoadParams(
        model=str(probe),
        rpc=tuple(rpc),
        n_ctx=256,
        n_batch=PROBE_BATCH,
        n_ubatch=PROBE_BATCH,
        n_threads=threads,
        n_gpu_layers=-1 if split else 0,
        tensor_split=split,
        type_k="f16",
        type_v="f16",
        flash_attn=False,
        swa_full=True,
        n_seq=1,
    )


SETTLED = 0.04  # the prediction's spread from the probes' timings: within this share, settled
MAX_PASSES = 6
GEN_REPS = 40  # generated-token steps timed per probe and pass (short: a GPU's take ~1 ms)


def sensitivity(
    blocks: tuple[int, int], scale: tuple[float, float], n_layer: int, n: int
) -> tuple[tuple[float, ...], ...]:
    """How the predicted steps that use one device move with each of its `n` probes' times
    (the 1-layer, the large, the vocabulary probe; see `derive`): one weight vector per view
    a plan takes of the device. k of the model's layers on it take g0 + F (g1 - g0), F = k's
    blocks beyond the 1-layer probe's over the large probe's beyond it, and as the last
    device the output layer too, + S (g2 - g1) (S the output's scale). F is large where the
    large probe has a few of many layers (the 7.24B: 5 of its 32 blocks, F = 7.75), so their
    noise counts nearly eightfold. The relative move is largest at an end of F's range or
    where F = 1, so the views are one layer, the whole model and, where it lies between, the
    large probe's own count (the 1.1B's probe is the whole model: its large probe's weight
    in the whole model's step, with the output layer, is 0, yet every split's layer is
    read from it); each with and without the output layer."""
    span = max(blocks[1] - blocks[0], 1)
    first = (scale[0] - blocks[0]) / span
    whole = (n_layer * scale[0] - blocks[0]) / span
    counts = dict.fromkeys(
        [first, whole] + ([1.0] if min(first, whole) < 1.0 < max(first, whole) else [])
    )
    s = scale[1] if n > 2 else 0.0
    views = []
    for f in counts:
        views.append((1 - f, f, 0.0)[:n])
        if s:
            views.append((1 - f, f - s, s))
    return tuple(dict.fromkeys(views))


async def time_device(
    child: object,
    params: Sequence[LoadParams],
    views: Sequence[Sequence[float]] | None = None,
) -> tuple[list[float], list[float], list[float]]:
    """(generated-token step, prompt-batch step, the generated steps' spread between passes)
    seconds of each probe, loaded with each of `params` (one per probe; the same probe twice
    is timed once): the probes are timed in turn, twice, and again (`another_pass`) until
    settled; each keeps its `centre`. `views`: the probes' weights in the predictions
    (`sensitivity`); without them, each probe must settle on its own. A host still noisy
    when the passes stop leaves its spreads in the figures' noise (`derive`), which the plan
    shows beside its prediction. A worker still settling after a load, or busy with
    something else for a moment, once made the bigger probe look faster than the smaller;
    on a busy 2-core VM a vocabulary probe timed in a slow spell put a worker's output layer
    at 9 ms, where other runs put it at 1-3; and on an H100 a probe pair whose timings each
    agreed within 10 % left the prediction of all 33 of the 7.24B's layers on the GPU
    moving from -8 % to +17 % between runs (its layer is their difference, times 7.75)."""
    distinct = list(dict.fromkeys(params))
    runs: dict[LoadParams, list[tuple[float, float]]] = {p: [] for p in distinct}
    noises: list[float] = []  # each pass's, the larger of both columns' (another_pass)
    generated = float("inf")  # the generated column's, as the log says it
    while another_pass(noises):
        for p in distinct:
            await child.load(p)  # type: ignore[attr-defined]
            (g,) = await child.time_steps((1,), GEN_REPS, True)  # type: ignore[attr-defined]
            (b,) = await child.time_steps((PROBE_BATCH,), REPS)  # type: ignore[attr-defined]
            runs[p].append((g, b))
        timings = [runs[p] for p in params]
        generated = noise(timings, views, 0)
        noises.append(max(generated, noise(timings, views, 1)))
    log.info(
        "probes timed in %d passes, generated-token steps (ms): %s",
        len(runs[distinct[0]]),
        "; ".join(
            f"{Path(p.model).name}: " + " ".join(f"{1e3 * g:.3f}" for g, _ in runs[p])
            for p in distinct
        ),
    )
    gen = {p: centre([g for g, _ in runs[p]]) for p in distinct}
    batch = {p: centre([b for _, b in runs[p]])[0] for p in distinct}
    log.info(
        "the probes' passes leave a step on the device uncertain by up to %.1f %%",
        1e2 * generated,
    )
    return [gen[p][0] for p in params], [batch[p] for p in params], [gen[p][1] for p in params]


def centre(values: Sequence[float]) -> tuple[float, float]:
    """A probe's figure from its passes and how far they spread: their median, and the
    range of the passes less the one farthest from it (from three passes on), so one pass
    out of line either way counts for nothing. Before the fifth H100 host run (12-06) a
    probe kept its fastest pass: on that noisy host one fast pass of the CPU worker's large
    probe (9.6 ms, the other five 10.2-11.8) made its layer 1.91 ms where the median's made
    it 2.33, and four of seven splits were predicted 13-23 % too fast; from the median, the
    same timings predict all seven within 10.3 % (bench/replay_probes.py)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no timings")
    mid = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    if n >= 3:
        far = max(ordered, key=lambda v: abs(v - mid))
        ordered.remove(far)
    return mid, (ordered[-1] - ordered[0]) if n >= 2 else float("inf")


def noise(
    timings: Sequence[Sequence[tuple[float, float]]],
    views: Sequence[Sequence[float]] | None = None,
    column: int = 0,
) -> float:
    """How far the probes' passes leave a prediction from them uncertain, as a share (see
    `centre` for a probe's figure and spread), from one column of their (generated, batch)
    timings, one list per probe: with `views` (`sensitivity`), the most any view's step
    moves with the probes' spreads, over the largest view's step (the whole model on the
    device: a view of a few layers is a small part of a plan that holds the rest elsewhere,
    and over its own step one layer with the output layer, the difference of two large
    probes, would never settle); without, the largest probe's spread over its figure.
    Infinite before a probe has two passes."""
    if any(len(probe) < 2 for probe in timings):
        return float("inf")
    fig = [centre([t[column] for t in probe]) for probe in timings]
    if views is None:
        return max(spread / mid if mid > 0 else float("inf") for mid, spread in fig)
    steps = [sum(x * mid for x, (mid, _) in zip(w, fig, strict=True)) for w in views]
    moved = [sum(abs(x) * sp for x, (_, sp) in zip(w, fig, strict=True)) for w in views]
    scale = max([*steps, min(mid for mid, _ in fig)])
    return max(moved) / scale if scale > 0 else float("inf")


def another_pass(noises: Sequence[float]) -> bool:
    """Whether to time the probes again, given each pass's `noise` so far (the larger of its
    two columns'): until two passes, then until the noise is within SETTLED, at most
    MAX_PASSES, and from the third pass on only while the last pass narrowed it. On a host
    busy with other work the spread does not narrow, and every pass more cost time without
    making the figures surer (CI's own tests on this VM, 12-06: the probes of a window's
    speed plan ran all six passes and took over two minutes); the plan states what is left
    (DeviceSpeed's noise)."""
    if len(noises) < 2:
        return True
    if noises[-1] <= SETTLED or len(noises) >= MAX_PASSES:
        return False
    return len(noises) < 3 or noises[-1] < noises[-2]


def derive(
    blocks: tuple[int, int],
    scale: tuple[float, float],
    gen: Sequence[float],
    batch: Sequence[float],
    base: tuple[float, float],
    spread: Sequence[float] = (),
) -> DeviceSpeed:
    """A device's speed from its probes' step times (1 layer, the large probe, the large
    with the model's vocabulary; `blocks`: the block bytes of the first two) and the
    desktop's own base (gen, batch): a byte of blocks takes the difference of the two probes
    over their difference in bytes, and a layer the model's average block's bytes of that
    (`scale`: those bytes, then the output's scale); per step what the 1-layer probe took
    beyond its block and the base; the output layer what the vocabulary probe took beyond
    the large one (its logits come back through the real tunnel), scaled by the model's
    output bytes over the probe's. Where the 1-layer probe took less than its block's worth
    (its block ran from a cache), see `_line`. `spread`: each probe's generated steps'
    spread between passes (`centre`), which the same arithmetic carries into the figures'
    noise (each term's spreads added, a bound: the probes' errors may cancel)."""
    per_byte, hop, cached = _line(blocks, gen, base[0])
    per_byte_b, hop_b, _ = _line(blocks, batch, base[1])
    noise_hop = noise_layer = noise_output = 0.0
    if len(spread) >= 2:
        span = max(blocks[1] - blocks[0], 1)
        if not cached:
            noise_hop = base_noise(blocks, spread)
            noise_layer = (spread[0] + spread[1]) / span * scale[0]
        else:  # the large probe alone (_line)
            noise_layer = spread[1] / max(blocks[1], 1) * scale[0]
        if len(spread) > 2:
            noise_output = (spread[1] + spread[2]) * scale[1]
    return DeviceSpeed(
        hop=hop,
        layer=per_byte * scale[0],
        hop_batch=hop_b,
        layer_batch=per_byte_b * scale[0],
        batch=PROBE_BATCH,
        output=max(gen[2] - gen[1], 0.0) * scale[1] if len(gen) > 2 else 0.0,
        output_batch=max(batch[2] - batch[1], 0.0) * scale[1] if len(batch) > 2 else 0.0,
        noise_hop=noise_hop,
        noise_layer=noise_layer,
        noise_output=noise_output,
    )


def _line(
    blocks: tuple[int, int], times: Sequence[float], base: float
) -> tuple[float, float, bool]:
    """(seconds a byte of blocks, the hop, whether the large probe alone gave them) from the
    1-layer and the large probe's times. Where
    the 1-layer probe took less than its block's worth beyond the base (its one block ran
    from a cache: on this VM the 1.1B's 24 MiB block did), the line through the two probes
    has a negative hop; cut to zero, as it was until the sixth session of 12-06, it charged
    every split that much too much (all three workers of the 1.1B's set-ups had a hop of 0,
    and the predictions ran 8-18 % slow). Then the large probe alone, which reads what the
    model reads, gives the byte's time over the base, and the hop is zero: the whole model on
    the device is predicted as its large probe took."""
    per_byte = _per_byte(blocks, times)
    hop = times[0] - per_byte * blocks[0] - base
    if hop >= 0:
        return per_byte, hop, False
    return max(times[1] - base, 0.0) / max(blocks[1], 1), 0.0, True


def _per_byte(blocks: tuple[int, int], times: Sequence[float]) -> float:
    """Seconds a byte of blocks: the two probes' difference over their bytes'."""
    return max(times[1] - times[0], 0.0) / max(blocks[1] - blocks[0], 1)


def base_noise(blocks: tuple[int, int], spread: Sequence[float]) -> float:
    """Seconds the 1-layer and the large probe's spreads leave a step's fixed part (the
    desktop's base, or a device's hop) uncertain: the 1-layer probe's time less its block's
    share of their difference (`base_of`), each spread added."""
    return spread[0] + (spread[0] + spread[1]) * blocks[0] / max(blocks[1] - blocks[0], 1)


def base_of(
    blocks: tuple[int, int], gen: Sequence[float], batch: Sequence[float]
) -> tuple[float, float]:
    """The desktop's own part of a step: the 1-layer probe on its CPU less its block's
    bytes' worth (from both probes); the vocabulary probe is not timed there."""
    return (
        max(gen[0] - _per_byte(blocks, gen) * blocks[0], 0.0),
        max(batch[0] - _per_byte(blocks, batch) * blocks[0], 0.0),
    )


async def link_speed(client: object, n: int = 5) -> LinkSpeed:
    """Round trip (the median of `n` pings) and bandwidth (ECHO bytes sent back, less a
    round trip) through the agent's control channel."""
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.ping_echo(0)  # type: ignore[attr-defined]
        rtts.append(time.perf_counter() - t0)
    rtt = sorted(rtts)[n // 2]
    big = []
    for _ in range(3):
        t0 = time.perf_counter()
        got = await client.ping_echo(ECHO)  # type: ignore[attr-defined]
        big.append(time.perf_counter() - t0)
        if got != ECHO:  # an agent without echo: bandwidth unknown
            return LinkSpeed(rtt, 0.0)
    spent = sorted(big)[1] - rtt
    return LinkSpeed(rtt, ECHO / spent if spent > 0 else 0.0)


async def gather_links(clients: Sequence[object]) -> list[LinkSpeed]:
    return list(await asyncio.gather(*(link_speed(c) for c in clients)))


def describe_placement(key: str) -> str:
    """A placement as speeds.json keys it, in words: "agent 1a2b3c4d device 0: 31 layers"."""
    parts = []
    for one in key.split(";"):
        device, _, count = one.rpartition("=")
        fields = split_device_key(device)
        if fields is None:
            parts.append(one)
            continue
        who = "this desktop" if fields[0] == "desktop" else f"agent {fields[0][:8]}"
        parts.append(f"{who} device {fields[1]}: {count} layers")
    return ", ".join(parts)


def slower_than_predicted(cache: SpeedCache, margin: float = 0.15) -> list[tuple[str, float]]:
    """Placements whose last measured reply ran more than `margin` slower than predicted:
    (placement in words, measured / predicted - 1), the slowest first."""
    slow = [(describe_placement(k), v) for k, v in cache.errors.items() if v < -margin]
    return sorted(slow, key=lambda kv: kv[1])
