"""Pre-flight validation: every rule that, broken, would crash a worker or the client.

Pure: facts in, verdicts out. Errors refuse the load; warnings are shown and allowed. Each
verdict names the host, the device and the setting, and says what to do instead.
See docs/VALIDATION.md for why each rule exists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from corral.engine.model.spec import ModelSpec

from .kvtypes import KV_TYPES
from .plan import Plan, Settings

Answer = tuple[str, str, int, bool]  # (type_k, type_v, head_dim, flash_attn)
_QUANTIZED = {name for name, (_, block, _) in KV_TYPES.items() if block > 1}


@dataclass(frozen=True, slots=True)
class Verdict:
    level: str  # "error" refuses the load; "warning" is shown
    host: str
    device: str
    setting: str
    message: str
    fix: str

    def __str__(self) -> str:
        where = " ".join(x for x in (self.host, self.device) if x)
        return f"{where + ': ' if where else ''}{self.message} ({self.setting}); {self.fix}"


@dataclass(frozen=True, slots=True)
class BuildFacts:
    host: str  # "this desktop" or the agent's name
    llama_version: str
    llama_commit: str
    rpc_proto: str
    system_info: str = ""


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    host: str
    device: str  # llama.cpp's name for it on the desktop (RPC0, CUDA0)
    backend: str  # the backend that runs it on its host (CUDA, Metal, CPU, ...)
    system_info: str = ""
    answers: Mapping[Answer, bool] = field(default_factory=dict)  # from the device itself


def questions(spec: ModelSpec, s: Settings) -> list[Answer]:
    """What to ask every device before this load."""
    dims = sorted(
        {layer.head_dim_k for layer in spec.layers} | {layer.head_dim_v for layer in spec.layers}
    )
    return [(s.type_k, s.type_v, d, s.flash_attn) for d in dims]


def _proto(text: str) -> tuple[int, int]:
    try:
        major, minor, *_ = (int(x) for x in text.split("."))
        return major, minor
    except ValueError:
        return -1, -1


def check_builds(desktop: BuildFacts, hosts: Sequence[BuildFacts]) -> list[Verdict]:
    """Every host must run the desktop's llama.cpp build: the RPC handshake aborts on a
    protocol mismatch, and different builds disagree on kernels mid-run."""
    out = []
    for h in hosts:
        if _proto(h.rpc_proto) != _proto(desktop.rpc_proto):
            why = (
                f"runs ggml RPC protocol {h.rpc_proto or 'unknown'}, this desktop "
                f"{desktop.rpc_proto}; ggml's client aborts at the handshake"
            )
            fix = ""
        elif h.llama_commit != desktop.llama_commit or h.llama_version != desktop.llama_version:
            why = (
                f"runs llama.cpp {h.llama_commit or '?'} (llama-cpp-python "
                f"{h.llama_version or '?'}), this desktop {desktop.llama_commit} "
                f"({desktop.llama_version})"
            )
            fix = ", the same build as this desktop"
        else:
            continue
        fix = f"install llama-cpp-python {desktop.llama_version} on {h.host}{fix}"
        out.append(Verdict("error", h.host, "", "llama.cpp build", why, fix))
    return out


def _fa_quants(system_info: str) -> set[tuple[str, str]] | None:
    m = re.search(r"FA_QUANTS = ([\w\-,]+)", system_info)
    if not m:
        return None
    pairs = set()
    for item in m.group(1).split(","):
        k, _, v = item.partition("-")
        pairs.add((k, v))
    return pairs


def check_cache(spec: ModelSpec, s: Settings, devices: Sequence[DeviceFacts]) -> list[Verdict]:
    """KV cache types, flash attention and head sizes against llama.cpp and each device."""
    out = []
    kv = f"--cache-type-k {s.type_k} --cache-type-v {s.type_v}"
    fa = f"--flash-attn {'on' if s.flash_attn else 'off'}"
    if s.type_v in _QUANTIZED and not s.flash_attn:
        out.append(
            Verdict(
                "error",
                "",
                "",
                f"--cache-type-v {s.type_v} {fa}",
                "a quantized V cache needs flash attention (llama.cpp cannot "
                "create the context without it)",
                "turn flash attention on (--flash-attn on), or use --cache-type-v f16",
            )
        )
    # A quantized cache is stored in 32-element blocks per head: a head size that is not a
    # multiple of 32 makes llama.cpp fail to create the context (with flash attention) or
    # abort outright (without: measured SIGABRT with a q8_0 K cache and head size 80).
    for which, cache, dims in (
        ("K", s.type_k, {layer.head_dim_k for layer in spec.layers}),
        ("V", s.type_v, {layer.head_dim_v for layer in spec.layers}),
    ):
        block = KV_TYPES[cache][1]
        bad = sorted(d for d in dims if d % block)
        if bad:
            out.append(
                Verdict(
                    "error",
                    "",
                    "",
                    f"--cache-type-{which.lower()} {cache}",
                    f"a {cache} {which} cache needs head sizes divisible by {block}; "
                    f"this model's are {', '.join(map(str, bad))} (llama.cpp would "
                    "abort or refuse the context)",
                    f"use --cache-type-{which.lower()} f16 (or bf16) for this model",
                )
            )
    for d in devices:
        refused = sorted(a for a, ok in d.answers.items() if not ok)
        if refused:
            heads = ", ".join(str(a[2]) for a in refused)
            out.append(
                Verdict(
                    "error",
                    d.host,
                    d.device,
                    f"{kv} {fa}",
                    f"the {d.backend} backend there cannot run this cache "
                    f"{'with flash attention ' if s.flash_attn else ''}for head "
                    f"size {heads} (asked the device); the worker would abort",
                    "use --cache-type-k q8_0 --cache-type-v q8_0, or f16/f16",
                )
            )
            continue
        pairs = _fa_quants(d.system_info) if d.backend == "CUDA" else None
        if s.flash_attn and pairs is not None and (s.type_k, s.type_v) not in pairs:
            out.append(
                Verdict(
                    "warning",
                    d.host,
                    d.device,
                    f"{kv} {fa}",
                    f"this CUDA build has no flash-attention kernel for "
                    f"{s.type_k}/{s.type_v}; it converts to f16 and runs slowly",
                    f"use one of {', '.join(f'{k}/{v}' for k, v in sorted(pairs))}",
                )
            )
    return out


def check_context(spec: ModelSpec, s: Settings) -> list[Verdict]:
    """A context (each slot's, with --parallel) longer than the model was trained for."""
    each = s.n_ctx // max(1, s.n_seq)
    if spec.n_ctx_train and each > spec.n_ctx_train:
        return [
            Verdict(
                "warning",
                "",
                "",
                f"--ctx {s.n_ctx}",
                f"longer than the model was trained for ({spec.n_ctx_train})"
                + (f" in each of the {s.n_seq} slots" if s.n_seq > 1 else "")
                + "; output degrades past it",
                f"use --ctx {spec.n_ctx_train * max(1, s.n_seq)} or less",
            )
        ]
    return []


MAX_PARALLEL = 64  # llama.cpp's limit on sequences in one context (LLAMA_MAX_SEQ)


def check_parallel(s: Settings) -> list[Verdict]:
    """Slots share the context: each holds n_ctx / n_seq cells, at least 256 (llama.cpp's
    padding), and llama.cpp takes at most MAX_PARALLEL sequences."""

    def refused(why: str, fix: str) -> list[Verdict]:
        return [Verdict("error", "", "", f"--parallel {s.n_seq}", why, fix)]

    if not 1 <= s.n_seq <= MAX_PARALLEL:
        return refused(
            f"llama.cpp decodes 1 to {MAX_PARALLEL} sequences together",
            f"use --parallel 1 to {MAX_PARALLEL}",
        )
    each = s.n_ctx_padded // s.n_seq
    if each < 256:
        return refused(
            f"each of the {s.n_seq} slots would hold {each} tokens of the "
            f"{s.n_ctx_padded}-token context (at least 256 each)",
            f"use --ctx {256 * s.n_seq} or more, or --parallel {max(1, s.n_ctx_padded // 256)}",
        )
    return []


def check_plan(plan: Plan, tips: Sequence[str] = ()) -> list[Verdict]:
    """An error per device (and for the host's own memory) that would run out of memory;
    `tips` (plan.what_fits) are settings that would fit."""
    fix = "use more hosts, a smaller --ctx, a quantized cache, or a smaller --reserve"
    if tips:
        fix = f"by the estimate this fits with {' or '.join(tips)}; or use more hosts"
    return [Verdict("error", *plan.where(i), "memory", why, fix) for i, why in plan.short()]


def check_strategy(plan: Plan) -> list[Verdict]:
    """A warning when the speed strategy has no speeds to go by: nothing measures a
    device's speed yet, so every device counts 1.0 and gets the same share of layers,
    whatever its memory (balanced splits by free memory)."""
    if plan.strategy != "speed" or not plan.devices:
        return []
    if any(d.speed != 1.0 for d in plan.devices):
        return []
    return [
        Verdict(
            "warning",
            "",
            "",
            "--strategy speed",
            "no device speeds are measured yet, so speed gives every device the same share "
            "of layers, whatever its memory",
            "use --strategy balanced (by free memory), or --layers to choose the counts",
        )
    ]


def errors(verdicts: Sequence[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.level == "error"]
