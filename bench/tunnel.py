"""RPC through Corral's authenticated tunnel vs straight to the worker, same split, same run.

1. Generation: SmolLM2 split over two local agents' workers. llama.cpp registers either the
   desktop's loopback tunnel ports (TLS 1.3 mutual auth, then the connection handed over to
   ggml-rpc's own sockets at both ends: what every Corral session uses) or the workers' own
   loopback ports (no tunnel at all: the best any setup could do). A pair of agents per
   path, all models loaded; rounds rotate which generates first. Reported: median tok/s
   per path, the median of per-round ratios (target >= 0.95x), and the load time of each
   (model upload included).
2. Round trip per RPC message: ggml-rpc's DEVICE_COUNT command (1 + 8 bytes out, written in
   two pieces as ggml-rpc does, 12 bytes back), ping-pong on one connection, tunnel vs direct,
   from a child process started as the inference child is (so the tunnel's is handed over).

   More paths, each measured in the same run: --relay-tunnel, the tunnel with the native
   relay in both desktop and agent (CORRAL_RELAY=relay: two relays forward each message);
   --python-tunnel, with the Python TLS pumps (CORRAL_RELAY=off: where nothing was built).

    .venv/bin/python bench/tunnel.py [--rounds 7] [--tokens 128] [--threads 2]
                                     [--relay-tunnel] [--python-tunnel] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from corral.engine.runtime.agent_client import AgentClient
from corral.engine.runtime.childproto import Done, Generate
from corral.engine.runtime.inference import InferenceProcess
from corral.engine.runtime.session import LoadSettings
from corral.engine.security.tunnel import shim_env

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def worker_endpoint(state_dir: Path) -> str:
    """The loopback endpoint of the RPC worker the agent with `state_dir` runs (from /proc)."""
    marker = str(state_dir / "tensor-cache")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "corral.engine.agent.worker" in argv and marker in argv:
            return argv[argv.index("--endpoint") + 1]
    raise RuntimeError(f"no worker process for {state_dir}")


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """This process's environment with `env` added, for what it starts meanwhile."""
    before = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


async def loaded_child(
    endpoints: list[str], settings: LoadSettings, env: dict[str, str] | None = None
) -> tuple[InferenceProcess, float]:
    child = InferenceProcess()
    with environ(env or {}):  # what the child's data path is decided by
        await child.start()
    t0 = time.perf_counter()
    await child.load(settings.load_params(endpoints))
    return child, time.perf_counter() - t0


async def tok_s(child: InferenceProcess, tokens: int) -> float:
    done = None
    async for frame in child.generate(
        Generate.chat(PROMPT, max_tokens=tokens, temp=0.0, seed=1, ignore_eos=True, n_keep=-1)
    ):
        if isinstance(frame, Done):
            done = frame
    assert done is not None
    return float(done.n_tokens / done.gen_s)


_HELLO = bytes([14]) + struct.pack("<Q", 24) + bytes(24)
_COUNT_CMD, _COUNT_SIZE = bytes([15]), struct.pack("<Q", 0)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """n bytes from sock (ConnectionError if it ends first); bench/handover.py uses it too."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def rtt_us(endpoint: str, count: int) -> float:
    """Mean microseconds per DEVICE_COUNT round trip on one connection."""
    host, _, port = endpoint.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.settimeout(None)  # blocking, as ggml-rpc's sockets are
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_HELLO)
        recv_exactly(sock, 8 + 28)
        for _ in range(50):  # warm-up
            sock.sendall(_COUNT_CMD)
            sock.sendall(_COUNT_SIZE)
            recv_exactly(sock, 12)
        t0 = time.perf_counter()
        for _ in range(count):
            sock.sendall(_COUNT_CMD)
            sock.sendall(_COUNT_SIZE)
            recv_exactly(sock, 12)
        return (time.perf_counter() - t0) / count * 1e6


def rtt_us_apart(endpoint: str, count: int, env: dict[str, str]) -> float:
    """rtt_us from a child process with `env` (the shim's, for the tunnel: its connection is
    then handed over as the inference child's are)."""
    done = subprocess.run(
        [sys.executable, __file__, "--ping", endpoint, "--pings", str(count)],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(done.stdout.split()[-1])


# the paths compared: each gets its own two agents (a ggml RPC worker serves one client)
PATHS = {
    "direct": "direct to the workers' loopback ports (agents without the hand-over, whose "
    "workers listen on TCP)",
    "tunnel": "Corral tunnel, handed over (AES-256-GCM keyed by TLS 1.3 mutual auth)",
    "relay": "Corral tunnel, native relays (CORRAL_RELAY=relay)",
    "python": "Corral tunnel, Python TLS pumps (CORRAL_RELAY=off)",
}


def rotated(paths: list[str], r: int) -> list[str]:
    """Round r's order: who goes first rotates, so no path always runs after another."""
    k = r % len(paths)
    return paths[k:] + paths[:k]


async def run(opts: argparse.Namespace) -> dict:
    settings = LoadSettings(model=opts.model, n_ctx=1024, n_threads=opts.threads)
    paths = (
        ["direct", "tunnel"]
        + (["relay"] if opts.relay_tunnel else [])
        + (["python"] if opts.python_tunnel else [])
    )
    env = {"python": {"CORRAL_RELAY": "off"}, "relay": {"CORRAL_RELAY": "relay"}}
    # a worker with the hand-over listens on no TCP port: the direct path's agents run
    # without it, so their workers take plain TCP clients on 127.0.0.1 (docs/SECURITY.md)
    agent_env = {**env, "direct": {"CORRAL_RELAY": "relay"}}
    # One pair of agents per path, all models loaded: a ggml RPC worker serves one client at
    # a time, and reloading per round would add more noise than it measures. Each path's
    # agents and inference child run with its CORRAL_RELAY: "python" agents answer
    # OpenTunnel without a relay share, so both ends keep TLS records; "relay" ones keep
    # their native relay and do not hand connections over.
    with contextlib.ExitStack() as stack:
        agents = {
            path: stack.enter_context(LocalAgents(2, env=agent_env.get(path))) for path in paths
        }
        clients, tunnels = [], {path: [] for path in paths if path != "direct"}
        endpoints: dict[str, list[str]] = {path: [] for path in paths}
        devices = tuple(opts.devices.split(",")) if opts.devices else ()
        for path in paths:
            for i, address in enumerate(agents[path].addresses):
                client = AgentClient(address)
                await client.connect()
                await client.start_rpc(devices=devices, threads=opts.threads)  # the lease
                clients.append(client)
                if path == "direct":
                    endpoints[path].append(worker_endpoint(agents[path].state_dir(i)))
                else:  # its endpoint is the kind this path's inference child can reach
                    with environ(env.get(path, {})):
                        tunnels[path].append(client.open_tunnel())
                    endpoints[path].append(tunnels[path][-1].endpoint)
        res: dict[str, list[float]] = {p: [] for p in paths}
        ratios: dict[str, list[float]] = {p: [] for p in paths if p != "direct"}
        loads: dict[str, float] = {}
        children = {}
        for path in paths:
            children[path], loads[path] = await loaded_child(
                endpoints[path], settings, env.get(path)
            )
            await tok_s(children[path], 16)  # warm-up
        # the data path each tunnel took (set when llama.cpp connected, at the load)
        modes = {path: sorted({t.mode for t in ts}) for path, ts in tunnels.items()}
        for r in range(opts.rounds):
            got = {path: await tok_s(children[path], opts.tokens) for path in rotated(paths, r)}
            for path, v in got.items():
                res[path].append(v)
            for path in ratios:
                ratios[path].append(got[path] / got["direct"])
            print(
                f"round {r + 1}: "
                + ", ".join(f"{p} {got[p]:.1f} tok/s" for p in paths)
                + ", ratios "
                + ", ".join(f"{p} {ratios[p][-1]:.3f}" for p in ratios),
                file=sys.stderr,
                flush=True,
            )
        for child in children.values():
            await child.close()
        loop = asyncio.get_running_loop()
        rtt: dict[str, list[float]] = {p: [] for p in paths}
        for r in range(opts.rounds):
            for path in rotated(paths, r):
                desktop = shim_env() if path == "tunnel" else env.get(path, {})
                us = await loop.run_in_executor(
                    None, rtt_us_apart, endpoints[path][0], opts.pings, desktop
                )
                rtt[path].append(us)
        for ts in tunnels.values():
            for t in ts:
                t.close()
        for c in clients:
            await c.close()
    med: dict[str, float] = {}
    for path in paths:
        med[f"tok_s_{path}"] = statistics.median(res[path])
        med[f"load_s_{path}"] = loads[path]
        med[f"rtt_{path}"] = statistics.median(rtt[path])
        if path != "direct":
            med[f"ratio_{path}" if path != "tunnel" else "ratio"] = statistics.median(ratios[path])
            med[f"rtt_added_{path}" if path != "tunnel" else "rtt_added"] = (
                med[f"rtt_{path}"] - med["rtt_direct"]
            )
    return {
        "model": str(opts.model),
        "rounds": opts.rounds,
        "tokens": opts.tokens,
        "threads": opts.threads,
        "paths": paths,
        "tunnel_modes": modes,
        "median": med,
        "raw": {**res, "ratios": ratios, "rtt": rtt},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument(
        "--devices",
        default="",
        help="the workers' devices, e.g. CPU or CUDA0 (default: the agent's)",
    )
    parser.add_argument(
        "--relay-tunnel",
        action="store_true",
        help="also measure the tunnel with the native relays at both ends (another pair)",
    )
    parser.add_argument("--ping", default="", help=argparse.SUPPRESS)  # rtt_us_apart's child
    parser.add_argument(
        "--python-tunnel",
        action="store_true",
        help="also measure the tunnel with the Python TLS pumps (a third pair of agents)",
    )
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    if opts.ping:
        print(f"{rtt_us(opts.ping, opts.pings):.3f}")
        return 0
    out = asyncio.run(run(opts))
    if opts.json:
        print(json.dumps(out, indent=1))
        return 0
    m = out["median"]
    print(
        f"model {Path(out['model']).name}, split over 2 local agents, {opts.tokens} tokens x "
        f"{opts.rounds} rounds, {opts.threads} threads (medians)"
    )
    print("| path | generation tok/s | vs direct | load s | RPC round trip |")
    print("|---|---|---|---|---|")
    for path in out["paths"]:
        ratio = 1.0 if path == "direct" else m["ratio" if path == "tunnel" else f"ratio_{path}"]
        print(
            f"| {PATHS[path]} | {m[f'tok_s_{path}']:.1f} | {ratio:.3f}x | "
            f"{m[f'load_s_{path}']:.2f} | {m[f'rtt_{path}']:.0f} µs |"
        )
    print(
        f"tunnel / direct: {m['ratio']:.3f}x (median of per-round ratios; target >= 0.95x); "
        f"added per RPC round trip: {m['rtt_added']:.0f} µs; data paths taken: "
        + ", ".join(f"{p} {'/'.join(ms)}" for p, ms in out["tunnel_modes"].items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
