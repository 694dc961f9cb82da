"""`corral`: the headless command line (chat, agents, models, demo)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.discovery import Host, Hosts
from corral.engine.model import ModelMissing, default_model_path, fetch_default_model
from corral.engine.runtime.agent_client import AgentClient, parse_address
from corral.engine.runtime.errors import RuntimeFailure
from corral.engine.runtime.hosts import HostDirectory
from corral.engine.runtime.session import ChatSession, LoadResult, LoadSettings

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
    lines += [f"  warning: {w}" for w in result.warnings]
    return lines


def _devices_json(result: LoadResult) -> list[dict[str, Any]]:
    return [
        {"device": p.device, "host": p.host, "endpoint": p.endpoint, "layers": list(p.layers)}
        for p in result.placements
    ]


async def _reply(
    session: ChatSession, out: _Out, text: str, opts: argparse.Namespace
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, session.cancel)
    done: dict[str, Any] = {}
    try:
        async for frame in session.ask(
            text,
            max_tokens=opts.max_tokens,
            temp=opts.temp,
            seed=opts.seed,
            ignore_eos=opts.ignore_eos,
        ):
            if frame["op"] == "token":
                if out.json:
                    out.event({"type": "token", "text": frame["text"], "id": frame["id"]})
                    out.event({"type": "kv", "used": frame["kv_used"], "n_ctx": frame["n_ctx"]})
                else:
                    print(frame["text"], end="", flush=True)
            elif frame["op"] == "done":
                done = frame
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGINT)
    if not out.json:
        print(flush=True)
        rate = done["n_tokens"] / done["gen_s"] if done.get("gen_s") else 0.0
        out.info(
            f"[{done['n_tokens']} tokens, {rate:.1f} tok/s, stop: {done['stop']}, "
            f"KV {done['kv_used']}/{done['n_ctx']} cells]"
        )
    return done


async def _chat(opts: argparse.Namespace, out: _Out) -> int:
    model = _model(opts.model)
    session = ChatSession(opts.agent)
    try:
        result = await session.open(
            LoadSettings(model=model, n_ctx=opts.ctx, n_threads=opts.threads)
        )
        for line in describe_load(result, model):
            out.info(line)
        if opts.prompt is not None:
            done = await _reply(session, out, opts.prompt, opts)
            out.event(
                {
                    "type": "done",
                    "content": done["content"],
                    "stop": done["stop"],
                    "devices": _devices_json(result),
                    "kv": {"used": done["kv_used"], "n_ctx": done["n_ctx"]},
                    "tokens": done["n_tokens"],
                    "gen_s": done["gen_s"],
                    "prompt_s": done["prompt_s"],
                }
            )
            return 0
        loop = asyncio.get_running_loop()
        out.info("type a message; an empty line or Ctrl-D ends the chat, Ctrl-C stops a reply")
        while True:
            if not out.json:
                print("> ", end="", flush=True)
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                return 0
            done = await _reply(session, out, line.strip(), opts)
            out.event(
                {
                    "type": "done",
                    "content": done["content"],
                    "stop": done["stop"],
                    "devices": _devices_json(result),
                    "kv": {"used": done["kv_used"], "n_ctx": done["n_ctx"]},
                }
            )
    finally:
        await session.close()


async def _agents(opts: argparse.Namespace, out: _Out) -> int:
    clients = [AgentClient(a) for a in opts.agent]
    failures = 0
    for c in clients:
        try:
            await c.connect()
            inv = await c.inventory()
        except RuntimeFailure as exc:
            failures += 1
            out.event({"type": "agent", "address": c.address, "error": str(exc)})
            out.info(f"{c.address}: {exc}")
            continue
        finally:
            await c.close()
        hello = c.hello
        assert hello is not None
        if out.json:
            from corral.engine.protocol.messages import _encode

            out.event(
                {
                    "type": "agent",
                    "address": c.address,
                    "hello": _encode(hello),
                    "inventory": _encode(inv),
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
                    f"  GPU{g.index} {g.name}: {g.memory_free / gib:.1f}/"
                    f"{g.memory_total / gib:.1f} GiB free, {g.utilization_pct}% busy, "
                    f"{g.temperature_c} °C, {g.power_w:.0f} W"
                )
        else:
            print(f"  no NVIDIA GPU ({inv.nvml})")
        for d in inv.devices:
            print(f"  ggml {d.name} [{d.type}] {d.description}: {d.memory_free / gib:.1f} GiB free")
        w = inv.worker
        extra = f", last exit {w.last_exit}" if w.last_exit else ""
        print(
            f"  RPC worker: {w.state}{' at ' + w.endpoint if w.endpoint else ''}"
            f"{', restarts ' + str(w.restarts) if w.restarts else ''}{extra}"
        )
    return EXIT_FAILURE if failures else 0


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


def _models(opts: argparse.Namespace, out: _Out) -> int:
    path = fetch_default_model()
    out.info(f"default model ready: {path}")
    out.event({"type": "model", "path": str(path)})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral", description="Pool your LAN's GPUs into one llama.cpp model."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)

    chat = sub.add_parser(
        "chat", help="chat with a model split across agents (local without --agent)"
    )
    chat.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct)")
    chat.add_argument(
        "--agent",
        action="append",
        type=_address,
        default=[],
        metavar="HOST:PORT",
        help="an agent whose RPC worker takes layers; repeat for several",
    )
    chat.add_argument("--prompt", help="answer this one message and exit (interactive without it)")
    chat.add_argument("--max-tokens", type=_positive, default=256)
    chat.add_argument("--ctx", type=_positive, default=2048, help="context size in tokens")
    chat.add_argument("--temp", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--seed", type=int, default=-1, help="sampling seed (-1 = random)")
    chat.add_argument("--threads", type=int, default=0, help="CPU threads of the local process")
    chat.add_argument(
        "--ignore-eos", action="store_true", help="generate exactly --max-tokens (benchmarks)"
    )
    chat.add_argument("--json", action="store_true", help="one JSON object per line")

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

    models = sub.add_parser("models", help="install the default model into the cache dir")
    models.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="start two local agents, split the default model, chat")
    demo.add_argument("--prompt", default="Name three things people do with a GPU cluster.")
    demo.add_argument("--max-tokens", type=_positive, default=48)
    demo.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    out = _Out(getattr(opts, "json", False))
    runners: dict[str, Callable[[], int]] = {
        "chat": lambda: asyncio.run(_chat(opts, out)),
        "agents": lambda: asyncio.run(_agents(opts, out)),
        "hosts": lambda: asyncio.run(_hosts(opts, out)),
        "models": lambda: _models(opts, out),
        "demo": lambda: _demo(opts, out),
    }
    try:
        return runners[opts.cmd]()
    except (RuntimeFailure, ModelMissing) as exc:
        return out.error(str(exc))
    except KeyboardInterrupt:
        return 130


def _demo(opts: argparse.Namespace, out: _Out) -> int:
    from corral.engine.runtime.localagents import LocalAgents

    model = _model(None)
    with LocalAgents(2) as agents:
        out.info(f"started 2 local agents: {', '.join(agents.addresses)}")
        chat_opts = argparse.Namespace(
            model=str(model),
            agent=agents.addresses,
            prompt=opts.prompt,
            max_tokens=opts.max_tokens,
            ctx=2048,
            temp=0.0,
            seed=-1,
            threads=0,
            ignore_eos=False,
            json=opts.json,
        )
        out.info(f"> {opts.prompt}")
        start = time.monotonic()
        code = asyncio.run(_chat(chat_opts, out))
        out.info(f"demo finished in {time.monotonic() - start:.1f} s")
        return code


if __name__ == "__main__":
    sys.exit(main())
