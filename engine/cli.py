"""`corral`: the headless command line (chat, agents, models, demo)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.discovery import Host, Hosts
from corral.engine.ggml.loadlog import compact_ranges
from corral.engine.model import ModelMissing, default_model_path, fetch_default_model
from corral.engine.planner.kvtypes import KV_TYPES
from corral.engine.planner.plan import STRATEGIES, MiB, Plan, Usage
from corral.engine.planner.speed import layer_bytes
from corral.engine.procs import cap_malloc_arenas
from corral.engine.runtime import history
from corral.engine.runtime.agent_client import AgentClient, parse_address
from corral.engine.runtime.childproto import Done, Token
from corral.engine.runtime.errors import (
    InferenceCrashed,
    PairingFailed,
    PlanRefused,
    RuntimeFailure,
)
from corral.engine.runtime.hosts import HostDirectory
from corral.engine.runtime.session import (
    DEFAULT_CTX,
    MAX_CTX,
    MIN_CTX,
    ChatSession,
    LoadResult,
    LoadSettings,
)
from corral.engine.runtime.speeds import SpeedCache, link_speed, split_device_key
from corral.engine.security.desktop import desktop_dir, desktop_keys
from corral.engine.security.files import SecurityFileError
from corral.engine.security.identity import short

EXIT_FAILURE = 1
EXIT_USAGE = 2


class _Out:
    """Human text, or one JSON object per line with --json."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def event(self, obj: dict[str, Any]) -> None:
        if self.json:
            print(json.dumps(obj, ensure_ascii=False), flush=True)

    def info(self, text: str) -> None:
        if not self.json:
            print(text, file=sys.stderr, flush=True)

    def error(self, text: str) -> int:
        if self.json:
            print(json.dumps({"type": "error", "message": text}), flush=True)
        else:
            print(f"corral: error: {text}", file=sys.stderr, flush=True)
        return EXIT_FAILURE


def _address(text: str) -> str:
    try:
        host, port = parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ctx(text: str) -> int:
    """--ctx: refused here, before anything starts, when llama.cpp could not use it."""
    value = _positive(text)
    if value < MIN_CTX:
        raise argparse.ArgumentTypeError(
            f"{value} is too small: llama.cpp sizes the cache in blocks of {MIN_CTX} tokens; "
            f"use --ctx {MIN_CTX} or more"
        )
    if value > MAX_CTX:
        raise argparse.ArgumentTypeError(
            f"{value} is more than Corral plans for ({MAX_CTX} tokens, beyond any released "
            "model's context); use a smaller --ctx"
        )
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def _model(text: str | None) -> Path:
    path = Path(text).expanduser() if text else default_model_path()
    if not path.exists():
        if text:
            raise ModelMissing(f"no model file at {path}")
        raise ModelMissing(f"the default model is not installed at {path}: run `make models`")
    if path.is_dir():
        raise ModelMissing(f"{path} is a folder; give the path of a .gguf file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelMissing(f"{path} is not a GGUF model file")
    return path


def describe_load(result: LoadResult, model: Path) -> list[str]:
    lines = [
        f"loaded {model.name} in {result.load_s:.1f} s: {result.n_layer} layers "
        f"(+ output layer), context {result.n_ctx}"
    ]
    lines += [f"  {p.describe()}" for p in result.placements]
    if result.cpu_note():
        lines.append(f"  {result.cpu_note()}")
    if result.comparison is not None:
        lines.append("  memory, planned before the load vs reported by llama.cpp after it:")
        for name, planned, actual, err in result.comparison.rows():
            lines.append(
                f"    {name:<36} {planned / MiB:8.1f} MiB  {actual / MiB:8.1f} MiB"
                f"  ({err * 100:+.1f}%)"
            )
    lines += [f"  warning: {w}" for w in result.warnings]
    return lines


def _devices_json(result: LoadResult) -> list[dict[str, Any]]:
    return [
        {"device": p.device, "host": p.host, "endpoint": p.endpoint, "layers": list(p.layers)}
        for p in result.placements
    ]


def _done_event(done: Done, result: LoadResult) -> dict[str, Any]:
    """The last JSON object of a reply: the text, where the layers are, and the cache."""
    return {
        "type": "done",
        "content": done.content,
        "stop": done.stop,
        "devices": _devices_json(result),
        "cpu_kernels": {"verdict": result.cpu_kernels, "buffers": list(result.cpu_buffers)},
        "kv": {"used": done.kv_used, "n_ctx": done.n_ctx, "shifts": done.shifts},
        "tokens": done.n_tokens,
        "gen_s": done.gen_s,
        "prompt_s": done.prompt_s,
        "shifts": done.shifts,
        "n_keep": done.n_keep,
        "kv_head": list(done.kv_head),
        "kv_pos_min": done.kv_pos_min,
    }


async def _reply(session: ChatSession, out: _Out, text: str, opts: argparse.Namespace) -> Done:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, session.cancel)
    meter = session.reply_meter()
    frames = session.ask(
        text,
        max_tokens=opts.max_tokens,
        temp=opts.temp,
        seed=opts.seed,
        ignore_eos=opts.ignore_eos,
        system=opts.system or "",
        n_keep=opts.n_keep,
    )
    try:
        async for frame in frames:
            update = meter.feed(frame)
            if isinstance(frame, Token):
                if out.json:
                    out.event({"type": "token", "text": frame.text, "id": frame.id})
                    out.event({"type": "kv", **update.kv.to_json()})
                else:
                    print(update.text, end="", flush=True)
            elif update.shift is not None:
                shift = update.shift
                out.event(
                    {
                        "type": "shift",
                        "n_keep": shift.n_keep,
                        "n_discard": shift.n_discard,
                        "shifts": shift.shifts,
                    }
                )
                out.info(
                    f"[context full: kept {shift.n_keep} tokens, dropped "
                    f"{shift.n_discard}; shift {shift.shifts}]"
                )
    finally:
        await frames.aclose()  # a reply left early (stdout closed) is stopped, not orphaned
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGINT)
        if meter.done is None and meter.tokens and not out.json:
            print(flush=True)  # a reply cut short: what is said next starts on its own line
    done = meter.finished()
    if not out.json:
        print(flush=True)
        out.info(
            f"[{done.n_tokens} tokens, {meter.rate:.1f} tok/s, stop: {done.stop}, "
            f"KV {done.kv_used}/{done.n_ctx} cells]"
        )
    against = session.note_speed(done)
    if against is not None:
        measured, predicted = against
        out.event({"type": "speed", "measured": measured, "predicted": predicted})
        out.info(
            f"[generating: measured {measured:.1f} tok/s, predicted {predicted:.1f} "
            f"({100 * (measured / predicted - 1):+.0f} %)]"
        )
    return done


def _load_settings(opts: argparse.Namespace, model: Path) -> LoadSettings:
    return LoadSettings(
        model=model,
        n_ctx=opts.ctx,
        n_threads=getattr(opts, "threads", 0),
        flash_attn=opts.flash_attn == "on",
        type_k=opts.cache_type_k,
        type_v=opts.cache_type_v,
        strategy=opts.strategy,
        layers=opts.layers,
        reserve_mib=opts.reserve,
        remeasure=getattr(opts, "remeasure", False),
        swa_full=opts.swa_cache == "full",
        parallel=getattr(opts, "parallel", 1),
    )


def _parallel_flag(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--parallel",
        type=int,
        default=default,
        metavar="N",
        help=f"replies decoded together, one slot each (default {default}); the context is "
        "shared: each slot holds CTX / N tokens, as llama-server's -np",
    )


def plan_table(plan: Plan, analytic: Plan | None = None) -> list[str]:
    """The layer map and the per-device memory table, as `corral plan` prints them."""
    lines = [
        f"strategy {plan.strategy}; tensor_split "
        f"{', '.join(f'{x:.3f}' for x in plan.tensor_split) or '(none: local)'}"
    ]
    head = (
        f"{'DEVICE':<7} {'HOST':<28} {'LAYERS':<12} {'WEIGHTS':>8} {'KV':>7} "
        f"{'COMPUTE':>8} {'TOTAL':>8} {'FREE':>9}"
    )
    if analytic is not None:
        head += f" {'ESTIMATE':>9}"
    lines.append(head)

    def mib(n: int) -> str:
        return f"{n / MiB:.0f}M"

    def row(name: str, host: str, layers: str, use: Usage, free: str, estimate: Usage) -> str:
        text = (
            f"{name:<7} {host[:28]:<28} {layers:<12} {mib(use.weights + use.extra):>8} "
            f"{mib(use.kv):>7} {mib(use.compute + use.output):>8} {mib(use.total):>8} "
            f"{free:>9}"
        )
        return text + (f" {mib(estimate.total):>9}" if analytic is not None else "")

    guess = analytic or plan
    for i, (dev, use) in enumerate(zip(plan.devices, plan.usage, strict=True)):
        lines.append(
            row(
                dev.name,
                dev.host,
                compact_ranges(plan.layers_of(i)) or "-",
                use,
                mib(max(dev.free - plan.settings.reserve, 0)),
                guess.usage[i],
            )
        )
    lines.append(
        row(
            "host",
            "this desktop",
            compact_ranges(plan.layers_of(-1)) or "embd",
            plan.host,
            mib(max(plan.host_free - plan.settings.reserve, 0)) if plan.host_free else "",
            guess.host,
        )
    )
    lines.append(
        f"compute buffers from: {plan.compute_source}; the output layer is layer "
        f"{len(plan.layer_device) - 1}; token embeddings stay in host memory"
    )
    if plan.host.extra:
        lines.append(
            f"the host's weights include {plan.host.extra / MiB:.1f} MiB that llama.cpp copies "
            "into its extra CPU buffers (AMX, CPU_REPACK) for faster kernels"
        )
    return lines


def _speed_json(session: ChatSession) -> dict[str, Any] | None:
    p, sp = session.prediction, session.speeds
    if sp is None:
        return None
    per_layer = layer_bytes(session.spec) if session.spec else 0.0
    return {
        "links": {h: dataclasses.asdict(link) for h, link in sp.links.items()},
        "devices": {
            n: dict(
                dataclasses.asdict(d),
                weights_read_per_s=per_layer / d.layer if d.layer > 0 else None,
            )
            for n, d in sp.devices.items()
        },
        "base_s": sp.base,
        # what each device after the first costs a step beyond its own figures
        "switch_s": sp.switch,
        "switch_batch_s": sp.switch_batch,
        "switch_noise_s": sp.switch_noise,
        "predicted": None
        if p is None
        else {
            "tokens_per_s": p.tokens_per_s,
            "prompt_tokens_per_s": p.prompt_per_s,
            "step_s": p.step,
            "shares": [{"what": s.what, "seconds": s.seconds} for s in p.shares],
            # the share of step_s the probes' noise leaves uncertain, and whose counts most
            "uncertainty": p.uncertainty,
            "noisiest": p.noisiest,
        },
        "leave_out": [{"host": h, "change": c} for h, c in session.leave_out],
        "measured_before": session.measured_before,
        # speed: each agent tried last (llama.cpp's output layer goes on the last device)
        "orders": [
            {"hosts": list(hosts), "tokens_per_s": rate, "layers": list(counts)}
            for hosts, rate, counts in session.orders
        ],
        "order_note": session.order_note,
    }


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "strategy": plan.strategy,
        "tensor_split": list(plan.tensor_split),
        "compute_source": plan.compute_source,
        "fits": plan.fits,
        "shortfalls": plan.shortfalls(),
        "devices": [
            {
                "device": d.name,
                "host": d.host,
                "endpoint": d.endpoint,
                "free": d.free,
                "layers": plan.layers_of(i),
                "weights": u.weights,
                "kv": u.kv,
                "compute": u.compute,
                "total": u.total,
            }
            for i, (d, u) in enumerate(zip(plan.devices, plan.usage, strict=True))
        ],
        "host": {
            "layers": plan.layers_of(-1),
            "weights": plan.host.weights,
            "kv": plan.host.kv,
            "compute": plan.host.compute,
            "output": plan.host.output,
            "extra": plan.host.extra,
            "total": plan.host.total,
            "free": plan.host_free,
        },
    }


async def _plan(opts: argparse.Namespace, out: _Out) -> int:
    model = _model(opts.model)
    session = ChatSession(opts.agent)
    try:
        await session.connect()
        analytic, exact = await session.plan(_load_settings(opts, model))
    finally:
        await session.close()
    if out.json:
        print(
            json.dumps(
                {
                    "type": "plan",
                    "model": str(model),
                    "exact": _plan_json(exact),
                    "analytic": _plan_json(analytic),
                    "speed": _speed_json(session),
                    "verdicts": [dataclasses.asdict(v) for v in session.verdicts],
                }
            ),
            flush=True,
        )
    else:
        print(
            f"{model.name}: {len(exact.layer_device) - 1} layers + output layer, context "
            f"{exact.settings.n_ctx_padded}, KV {opts.cache_type_k}/{opts.cache_type_v}, "
            f"flash attention {opts.flash_attn}"
        )
        for line in plan_table(exact, analytic):
            print(line)
        if exact.devices:
            for line in session.speed_lines():
                print(line)
        for w in session.warnings:
            print(f"warning: {w}")
        for v in session.verdicts:
            if v.level == "warning":
                print(f"warning: {v}")
    refused = [v for v in session.verdicts if v.level == "error"]
    for v in refused:
        print(f"corral: refused: {v}", file=sys.stderr)
    if not exact.fits and not any(v.setting == "memory" for v in refused):
        for reason in exact.shortfalls():
            print(f"corral: does not fit: {reason}", file=sys.stderr)
    if refused or not exact.fits:
        return EXIT_USAGE
    return 0


async def _serve(opts: argparse.Namespace, out: _Out) -> int:
    from corral.engine.runtime.serve import ApiServer

    if opts.queue < 1 or not 0 < opts.deadline <= 86400:  # before anything loads
        out.error("--queue must be at least 1, and --deadline above 0 and at most 86400 s")
        return EXIT_USAGE
    model = _model(opts.model)
    session = ChatSession(opts.agent)
    try:
        result = await session.open(_load_settings(opts, model))
        for line in describe_load(result, model):
            out.info(line)
        api = ApiServer(
            session, model.stem, opts.api_key or None, opts.queue, opts.deadline, tuple(opts.cors)
        )

        def reply_line(done: Done) -> None:
            # each finished reply, with every slot's KV use (what llama-server's log shows)
            rate = done.n_tokens / done.gen_s if done.gen_s > 0 else 0.0
            out.event(
                {
                    "type": "reply",
                    "slot": done.slot,
                    "prompt_tokens": done.prompt_tokens,
                    "cached_tokens": done.cached_tokens,
                    "completion_tokens": done.n_tokens,
                    "stop": done.stop,
                    "tokens_per_s": round(rate, 2),
                    "slots": [
                        {"slot": k, "kv_used": used, "kv_cells": cells}
                        for k, (used, cells) in sorted(api.slot_kv.items())
                    ],
                }
            )
            out.info(
                f"reply in slot {done.slot}: {done.prompt_tokens} prompt tokens "
                f"({done.cached_tokens} cached), {done.n_tokens} generated at {rate:.1f} tok/s, "
                f"{done.stop} | KV {api.slots_line()}"
            )

        api.on_reply = reply_line
        try:
            port = await api.start(opts.host, opts.port)
        except OSError as exc:
            return out.error(f"cannot listen on {opts.host}:{opts.port}: {exc.strerror or exc}")
        print(f"serving {model.stem} on http://{opts.host}:{port}/v1", flush=True)
        if opts.host not in ("127.0.0.1", "localhost", "::1") and not opts.api_key:
            out.info("warning: listening beyond this machine without --api-key")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await api.close()
        return 0
    finally:
        await session.close()


_NOTHING = (
    "the model said nothing: it ended its reply before the first token. If it does so for "
    "every message, its weights may be damaged: compare the file's sha256 with the "
    "publisher's, or download it again"
)


def _said_nothing(done: Done) -> bool:
    """A reply ended by the model before it said anything (not cut by --max-tokens or a
    cancel): rare from a sound model, the usual sign of damaged weights."""
    return done.stop == "eos" and not done.content.strip()


async def _recover(session: ChatSession, out: _Out, crash: InferenceCrashed) -> bool:
    """Say what broke, load again on what answers (ChatSession.recover), say how that went
    in one line. False when it could not: the error says why, /reload tries again."""
    out.event({"type": "crash", "message": str(crash)})
    out.info(f"corral: {crash}")
    out.info("corral: loading the model again on the hosts that answer…")
    try:
        line = await session.recover(crash.cause)
    except RuntimeFailure as exc:
        out.event({"type": "recover_failed", "message": str(exc)})
        out.info(f"corral: {exc}\ntype /reload to try again once the hosts are back")
        return False
    out.event({"type": "recovered", "message": line, "dropped": session.dropped})
    out.info(f"corral: {line}")
    return True


async def _chat(opts: argparse.Namespace, out: _Out) -> int:
    model = _model(opts.model)
    session = ChatSession(opts.agent)
    if opts.session:
        session.history = history.load(opts.session)
        if session.history:
            out.info(f"resuming chat {opts.session!r}: {len(session.history)} messages")
    try:
        result = await session.open(_load_settings(opts, model))
        for line in describe_load(result, model):
            out.info(line)
        if session.prediction is not None:
            out.info(f"  predicted: {session.prediction.tokens_per_s:.1f} tokens/s generating")
        if opts.prompt is not None:
            try:
                done = await _reply(session, out, opts.prompt, opts)
            except InferenceCrashed as crash:  # a fault: heal once, then ask again
                if not crash.cause:  # the user's Ctrl-C had to kill it: that is the end
                    raise
                if not await _recover(session, out, crash):
                    return EXIT_FAILURE
                done = await _reply(session, out, opts.prompt, opts)
            if opts.session:
                history.save(opts.session, session.history)
            out.event(_done_event(done, result))
            if _said_nothing(done):
                return out.error(_NOTHING)
            return 0
        loop = asyncio.get_running_loop()
        out.info(
            "type a message; an empty line or Ctrl-D ends the chat, Ctrl-C stops a reply, "
            "/regen answers the last message again, /reload loads again after a crash"
        )
        while True:
            if not out.json:
                print("> ", end="", flush=True)
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                return 0
            if line.strip() == "/regen":
                try:
                    line = session.take_back()
                except RuntimeFailure as exc:
                    out.info(str(exc))
                    continue
            if line.strip() == "/reload":
                result = await session.reload()
                for text in describe_load(result, model):
                    out.info(text)
                out.event(
                    {
                        "type": "reloaded",
                        "devices": _devices_json(result),
                        "dropped": session.dropped,
                        "history": len(session.history),
                    }
                )
                continue
            try:
                done = await _reply(session, out, line.strip(), opts)
                if opts.session:
                    history.save(opts.session, session.history)
            except history.HistoryError as exc:  # a full disk: the chat goes on in memory
                out.info(f"corral: {exc}")
            except InferenceCrashed as crash:
                # the history stays in this process; the model is loaded again at once
                await _recover(session, out, crash)
                continue
            out.event(_done_event(done, result))
            if _said_nothing(done):
                out.info(f"corral: {_NOTHING}")
    finally:
        await session.close()


async def _agents(opts: argparse.Namespace, out: _Out) -> int:
    clients = [AgentClient(a) for a in opts.agent]
    failures = 0
    for c in clients:
        try:
            await c.connect()
            inv = await c.inventory()
            link = await link_speed(c)
        except RuntimeFailure as exc:
            failures += 1
            out.event({"type": "agent", "address": c.address, "error": str(exc)})
            out.info(f"{c.address}: {exc}")
            continue
        finally:
            await c.close()
        hello = c.hello
        assert hello is not None
        # what speed planning measured on this agent's devices (per model shape), if anything
        kept = {
            key: speed
            for key, speed in SpeedCache().entries.items()
            if (split_device_key(key) or ("",))[0] == inv.agent_id
        }
        if out.json:
            from corral.engine.protocol.messages import _encode

            out.event(
                {
                    "type": "agent",
                    "address": c.address,
                    "hello": _encode(hello),
                    "inventory": _encode(inv),
                    "link": dataclasses.asdict(link),
                    "measured": {key.split("|", 1)[1]: sp for key, sp in kept.items()},
                }
            )
            continue
        gib = 1 << 30
        print(
            f"{inv.hostname} ({c.address})  agent {inv.agent_id[:8]}  corral {hello.corral_version}"
            f"  llama.cpp {hello.llama_commit}  rpc {hello.rpc_proto}"
        )
        print(
            f"  CPU {inv.cpu_model} x{inv.cpu_count}, RAM {inv.ram_free / gib:.1f}/"
            f"{inv.ram_total / gib:.1f} GiB free"
        )
        if inv.gpus:
            for g in inv.gpus:
                print(
                    f"  GPU{g.index} {g.name} (sm {g.compute_capability or '?'}): "
                    f"{g.memory_free / gib:.1f}/"
                    f"{g.memory_total / gib:.1f} GiB free, {g.utilization_pct}% busy, "
                    f"{g.temperature_c} °C, {g.power_w:.0f} W"
                )
        else:
            print(f"  no NVIDIA GPU ({inv.nvml})")
        for d in inv.devices:
            print(f"  ggml {d.name} [{d.type}] {d.description}: {d.memory_free / gib:.1f} GiB free")
        w = inv.worker
        extra = f", {w.threads} CPU threads" if w.state == "running" and w.threads else ""
        extra += f", last exit {w.last_exit}" if w.last_exit else ""
        extra += f", but its process is {w.process}" if w.process else ""
        print(
            f"  RPC worker: {w.state}{' at ' + w.endpoint if w.endpoint else ''}"
            f"{', restarts ' + str(w.restarts) if w.restarts else ''}{extra}"
        )
        bw = f"{link.bandwidth / 1e6:.0f} MB/s" if link.bandwidth else "bandwidth unknown"
        print(f"  link from this desktop: round trip {link.rtt * 1000:.2f} ms, {bw}")
        for key, sp in kept.items():
            _, device, _, threads, shape = split_device_key(key) or ("",) * 5
            print(
                f"  measured: device {device} ({threads} threads), model shape "
                f"{shape}: {sp['layer'] * 1000:.3f} ms a layer, {sp['hop'] * 1000:.2f} ms a step"
            )
    return EXIT_FAILURE if failures else 0


async def _pair(opts: argparse.Namespace, out: _Out) -> int:
    client = AgentClient(opts.address)
    code = opts.code
    if code is None:
        if not sys.stdin.isatty():
            return out.error("give the agent's code with --code (run `corral-agent pair` there)")
        code = await asyncio.get_running_loop().run_in_executor(
            None, input, f"pairing code shown by the agent at {opts.address}: "
        )
    try:
        peer = await client.pair(code)
    except PairingFailed:
        # a code used up by an earlier pairing says "expired": say what is really the case
        known = await _paired_already(opts.address)
        if known is None:
            raise
        out.info(
            f"already paired with {known} ({opts.address}): nothing to do. To pair again, "
            f"`corral unpair {opts.address}` first and use a new code from `corral-agent pair`"
        )
        return 0
    out.event(
        {
            "type": "paired",
            "address": opts.address,
            "name": peer.name,
            "agent_id": peer.peer_id,
            "fingerprint": peer.fingerprint,
        }
    )
    out.info(
        f"paired with {peer.name} ({opts.address}), agent certificate {short(peer.fingerprint)}"
    )
    if not out.json:
        print(f"paired with {peer.name}")
    return 0


async def _paired_already(address: str) -> str | None:
    """The agent's name when this desktop is paired with the agent at `address` and it
    accepts this desktop now; None otherwise."""
    keys = desktop_keys()
    if not any(p.address == address for p in keys.pins.peers()):
        return None
    client = AgentClient(address, keys=keys)
    try:
        await client.connect(timeout=3)
        return client.name
    except RuntimeFailure:
        return None
    finally:
        await client.close()


async def _unpair(opts: argparse.Namespace, out: _Out) -> int:
    keys = desktop_keys()
    peers = [p for p in keys.pins.peers() if p.matches(opts.who)]
    if not peers:
        return out.error(f"no paired agent is named {opts.who!r}: `corral paired` lists them")
    for peer in peers:
        client = AgentClient(peer.address or opts.who, keys=keys)
        told = False
        try:
            await client.connect(timeout=3)
            await client.unpair()
            told = True
        except RuntimeFailure:
            keys.pins.remove(peer.fingerprint)
        finally:
            await client.close()
        where = (
            "on both sides"
            if told
            else "here (the agent was not reachable: run "
            f"`corral-agent unpair {keys.identity.name}` there too)"
        )
        out.event({"type": "unpaired", "name": peer.name, "both_sides": told})
        if not out.json:
            print(f"unpaired {peer.name} {where}")
    return 0


def _paired(opts: argparse.Namespace, out: _Out) -> int:
    keys = desktop_keys()
    peers = keys.pins.peers()
    for p in peers:
        out.event(
            {
                "type": "agent",
                "name": p.name,
                "address": p.address,
                "agent_id": p.peer_id,
                "fingerprint": p.fingerprint,
                "paired_at": p.paired_at,
            }
        )
        if not out.json:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(p.paired_at))
            print(f"{short(p.fingerprint)}  {p.name:<24} {p.address:<22} paired {when}")
    if not peers and not out.json:
        print("no paired agents: `corral pair HOST:PORT --code CODE` pairs one")
    if not out.json:
        print(f"this desktop: {keys.identity.name}, certificate {short(keys.identity.fingerprint)}")
    return 0


def _host_json(h: Host) -> dict[str, Any]:
    hints = h.hints
    return {
        "key": h.key,
        "agent_id": h.agent_id,
        "hostname": h.hostname,
        "service": h.name,
        "address": h.address,
        "addresses": list(h.addresses),
        "port": h.port,
        "status": h.status,
        "reason": h.reason,
        "manual": h.manual,
        "advertised": h.advertised,
        "gpus": hints.gpu_count if hints else None,
        "vram_total": hints.vram_total if hints else None,
        "corral_version": hints.corral_version if hints else None,
    }


async def _hosts(opts: argparse.Namespace, out: _Out) -> int:
    from corral.discovery.interfaces import unknown_interfaces

    missing = unknown_interfaces(tuple(opts.interface))
    if missing:
        return out.error(f"no network interface named {', '.join(missing)}")

    def changed(hosts: Hosts, event: object) -> None:
        if opts.watch:
            out.event(
                {
                    "type": type(event).__name__.lower(),
                    # CLOCK_MONOTONIC is shared by every process and namespace on a host,
                    # so a bench can line these up with what it did
                    "mono": time.monotonic(),
                    "hosts": [_host_json(h) for h in hosts.values()],
                }
            )

    directory = HostDirectory(
        changed,
        browse=not opts.no_browse,
        interfaces=tuple(opts.interface),
        allow_link_local=opts.allow_link_local,
        allow_bridges=opts.allow_bridges,
    )
    for address in opts.agent:
        directory.add_manual(address)
    await directory.start()
    try:
        await asyncio.sleep(opts.wait)
    finally:
        hosts = list(directory.hosts.values())
        await directory.close()
    if opts.watch:
        return 0
    if out.json:
        print(json.dumps({"type": "hosts", "hosts": [_host_json(h) for h in hosts]}), flush=True)
        return 0
    if not hosts:
        print(f"no hosts found in {opts.wait:g} s (add one with --agent HOST:PORT)")
        return 0
    gib = 1 << 30
    print(f"{'STATUS':<8} {'HOST':<24} {'ADDRESS':<26} {'GPUS':>4} {'VRAM':>9}  NOTE")
    for h in sorted(hosts, key=lambda h: h.hostname or h.name):
        gpus = str(h.hints.gpu_count) if h.hints else "?"
        vram = f"{h.hints.vram_total / gib:.1f} GiB" if h.hints else "?"
        note = h.reason or ("added by address" if h.manual and not h.advertised else "")
        name = h.hostname or h.name.split("._corral")[0]
        print(f"{h.status:<8} {name[:24]:<24} {h.address:<26} {gpus:>4} {vram:>9}  {note}")
    return 0


def _chats(opts: argparse.Namespace, out: _Out) -> int:
    if not opts.name:
        for name in history.names():
            print(name)
        return 0
    messages = history.load(opts.name)
    if not messages:
        return out.error(f"no saved chat named {opts.name!r} (see `corral chats`)")
    if opts.format == "json":
        print(json.dumps({"name": opts.name, "messages": messages}, ensure_ascii=False, indent=1))
    else:
        print(history.to_markdown(opts.name, messages))
    return 0


def _models(opts: argparse.Namespace, out: _Out) -> int:
    path = fetch_default_model()
    out.info(f"default model ready: {path}")
    out.event({"type": "model", "path": str(path)})
    return 0


def _layers(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of layer counts like 16,15"
        ) from None
    if any(c < 0 for c in counts):
        raise argparse.ArgumentTypeError("layer counts cannot be negative")
    return counts


def _planning_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-type-k",
        default="f16",
        choices=list(KV_TYPES),
        metavar="TYPE",
        help=f"K cache type ({', '.join(KV_TYPES)})",
    )
    p.add_argument(
        "--cache-type-v",
        default="f16",
        choices=list(KV_TYPES),
        metavar="TYPE",
        help="V cache type (quantized V needs --flash-attn on)",
    )
    p.add_argument("--flash-attn", choices=["on", "off"], default="off")
    p.add_argument(
        "--swa-cache",
        choices=["full", "window"],
        default="full",
        help="sliding-window layers (gemma2/3, gpt-oss, cohere2, ...): keep the whole context "
        "(full, default: any earlier turn can be edited and resumed without re-reading the "
        "chat) or only the window (much less memory; a chat edited further back than the "
        "window is read again from its start)",
    )
    p.add_argument(
        "--strategy",
        choices=list(STRATEGIES),
        default="balanced",
        help="fewest: fewest hosts that fit; balanced: by free memory; speed: the split "
        "that fits with the best predicted tokens/s, from each device and link timed on "
        "probes of this model's shape (once per device, build and shape: kept in "
        "speeds.json)",
    )
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="time every device again for this plan instead of using what speeds.json "
        "kept (a device or link that got slower; corral doctor says when one did)",
    )
    p.add_argument(
        "--layers",
        type=_layers,
        metavar="N,N,...",
        help="layers per device in order (RPC devices, then local GPUs); must add "
        "up to the layer count + 1 (the output layer)",
    )
    p.add_argument(
        "--reserve",
        type=int,
        default=256,
        metavar="MiB",
        help="memory left free on every device (default 256)",
    )


def _model_flags(p: argparse.ArgumentParser, ctx: int, threads: bool = True) -> None:
    """The model, the agents that take its layers, the context (and the local threads): the
    same flags for chat, serve and plan."""
    p.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--agent",
        action="append",
        type=_address,
        default=[],
        metavar="HOST:PORT",
        help="an agent whose RPC worker takes layers; repeat for several",
    )
    p.add_argument(
        "--ctx",
        type=_ctx,
        default=ctx,
        help=f"context size in tokens, {MIN_CTX} to {MAX_CTX}, rounded up to a multiple of "
        f"{MIN_CTX} (default {ctx})",
    )
    if threads:
        p.add_argument("--threads", type=int, default=0, help="CPU threads of the local process")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral", description="Pool your LAN's GPUs into one llama.cpp model."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)

    chat = sub.add_parser(
        "chat", help="chat with a model split across agents (local without --agent)"
    )
    _model_flags(chat, ctx=DEFAULT_CTX)
    chat.add_argument("--prompt", help="answer this one message and exit (interactive without it)")
    chat.add_argument("--max-tokens", type=_positive, default=256)
    chat.add_argument("--temp", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--seed", type=int, default=-1, help="sampling seed (-1 = random)")
    chat.add_argument("--system", help="system prompt (kept through context shifts)")
    chat.add_argument(
        "--session", metavar="NAME", help="keep this chat's history on disk and resume it next time"
    )
    chat.add_argument(
        "--n-keep",
        type=int,
        default=-1,
        metavar="N",
        help="tokens a context shift keeps (default: the system prompt)",
    )
    chat.add_argument(
        "--ignore-eos", action="store_true", help="generate exactly --max-tokens (benchmarks)"
    )
    chat.add_argument("--json", action="store_true", help="one JSON object per line")
    _planning_flags(chat)

    serve = sub.add_parser("serve", help="an OpenAI-compatible API (/v1) for the split model")
    # 4 slots of 4096 tokens: room for an API client's longer conversations, four at once
    _model_flags(serve, ctx=16384)
    _parallel_flag(serve, 4)
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="listen port (0: any free one)")
    serve.add_argument("--api-key", default="", help="require 'Authorization: Bearer KEY'")
    serve.add_argument(
        "--queue",
        type=int,
        default=32,
        help="requests that may wait for the model at once; more get 429 (default 32)",
    )
    serve.add_argument(
        "--deadline",
        type=float,
        default=600.0,
        help="seconds a request may wait and generate in all; then it ends with an error "
        "(default 600)",
    )
    serve.add_argument(
        "--cors",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages at ORIGIN (e.g. http://localhost:3000; * for any) call the API "
        "from a browser; without it, requests that carry an Origin are refused (403)",
    )
    _planning_flags(serve)

    plan = sub.add_parser("plan", help="where each layer would go and how much memory it needs")
    _model_flags(plan, ctx=DEFAULT_CTX, threads=False)
    _parallel_flag(plan, 1)
    plan.add_argument("--json", action="store_true")
    _planning_flags(plan)

    agents = sub.add_parser("agents", help="inventory and worker state of agents")
    agents.add_argument(
        "--agent", action="append", type=_address, required=True, metavar="HOST:PORT"
    )
    agents.add_argument("--json", action="store_true")

    hosts = sub.add_parser("hosts", help="agents found on the LAN (mDNS) or added by address")
    hosts.add_argument(
        "--wait",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long to look before printing (default 2)",
    )
    hosts.add_argument(
        "--agent",
        action="append",
        type=_address,
        default=[],
        metavar="HOST:PORT",
        help="also check this agent (networks without multicast); repeatable",
    )
    hosts.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="NAME",
        help="browse only on this interface; repeatable",
    )
    hosts.add_argument(
        "--allow-link-local",
        action="store_true",
        help="also use link-local addresses (169.254/16, fe80::/10)",
    )
    hosts.add_argument(
        "--allow-bridges",
        action="store_true",
        help="also use container bridges (docker0, br-*, veth*, virbr*)",
    )
    hosts.add_argument("--no-browse", action="store_true", help="no mDNS: only --agent hosts")
    hosts.add_argument(
        "--watch", action="store_true", help="print every change as a JSON line until --wait ends"
    )
    hosts.add_argument("--json", action="store_true")

    pair = sub.add_parser(
        "pair",
        help="pair this desktop with an agent, using the one-time code the agent shows",
        description="Pair with an agent: `corral-agent pair` on the worker prints a code valid "
        "for 5 minutes; the code never crosses the network.",
    )
    pair.add_argument("address", type=_address, help="the agent's HOST:PORT")
    pair.add_argument("--code", help="the agent's pairing code (asked for when omitted)")
    pair.add_argument("--json", action="store_true")
    unpair = sub.add_parser("unpair", help="forget an agent here and, when reachable, there too")
    unpair.add_argument("who", help="the agent's name, address or fingerprint (8+ hex digits)")
    unpair.add_argument("--json", action="store_true")
    paired = sub.add_parser("paired", help="the agents this desktop has paired with")
    paired.add_argument("--json", action="store_true")

    chats = sub.add_parser("chats", help="saved chats: list them, or export one")
    chats.add_argument("name", nargs="?", help="the chat to export")
    chats.add_argument("--format", choices=["md", "json"], default="md")
    chats.add_argument("--json", action="store_true")

    models = sub.add_parser("models", help="install the default model into the cache dir")
    models.add_argument("--json", action="store_true")

    doctor = sub.add_parser(
        "doctor",
        help="check this desktop and every paired agent; each problem with its fix",
        description="Checks llama.cpp (build, RPC support, devices), NVML, the clock, mDNS, "
        "and every paired agent: reachable, its port held by the agent, versions that match.",
    )
    doctor.add_argument(
        "--wait",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long to listen for agents' mDNS announcements (default 3)",
    )
    doctor.add_argument("--json", action="store_true", help="one JSON object per check")

    demo = sub.add_parser("demo", help="start two local agents, split the default model, chat")
    demo.add_argument("--prompt", default="Name three things people do with a GPU cluster.")
    demo.add_argument("--max-tokens", type=_positive, default=48)
    demo.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    cap_malloc_arenas()  # before any thread starts (engine/procs.py says why)
    opts = build_parser().parse_args(argv)
    out = _Out(getattr(opts, "json", False))
    runners: dict[str, Callable[[], int]] = {
        "chat": lambda: asyncio.run(_chat(opts, out)),
        "agents": lambda: asyncio.run(_agents(opts, out)),
        "plan": lambda: asyncio.run(_plan(opts, out)),
        "serve": lambda: asyncio.run(_serve(opts, out)),
        "hosts": lambda: asyncio.run(_hosts(opts, out)),
        "models": lambda: _models(opts, out),
        "pair": lambda: asyncio.run(_pair(opts, out)),
        "unpair": lambda: asyncio.run(_unpair(opts, out)),
        "paired": lambda: _paired(opts, out),
        "chats": lambda: _chats(opts, out),
        "demo": lambda: _demo(opts, out),
        "doctor": lambda: _doctor(opts),
    }
    try:
        return runners[opts.cmd]()
    except PlanRefused as exc:
        out.error(str(exc))
        return EXIT_USAGE
    except (RuntimeFailure, ModelMissing, history.HistoryError, SecurityFileError) as exc:
        return out.error(str(exc))
    except BrokenPipeError:  # the reader went away (`corral paired | head`): not a bug
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug: the user gets one line and where the details are
        report = _save_traceback()
        return out.error(
            f"internal error ({type(exc).__name__}: {exc}); this is a bug in "
            f"Corral; the details are in {report}"
        )
    except KeyboardInterrupt:
        return 130


def _save_traceback() -> str:
    import traceback

    path = desktop_dir() / "last-error.txt"  # $CORRAL_STATE_DIR, else the platform's
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback.format_exc())
    except OSError:
        return "(could not be saved)"
    return str(path)


def _doctor(opts: argparse.Namespace) -> int:
    from corral.engine.doctor.desktop import run_desktop_doctor

    return run_desktop_doctor(opts)


def _demo(opts: argparse.Namespace, out: _Out) -> int:
    from corral.engine.localagents import LocalAgents

    model = _model(None)
    with LocalAgents(2) as agents:
        out.info(f"started 2 local agents: {', '.join(agents.addresses)}")
        args = ["chat", str(model), "--prompt", opts.prompt, "--max-tokens", str(opts.max_tokens)]
        for address in agents.addresses:
            args += ["--agent", address]
        chat_opts = build_parser().parse_args([*args, *(["--json"] if opts.json else [])])
        out.info(f"> {opts.prompt}")
        start = time.monotonic()
        code = asyncio.run(_chat(chat_opts, out))
        out.info(f"demo finished in {time.monotonic() - start:.1f} s")
        return code


if __name__ == "__main__":
    sys.exit(main())
