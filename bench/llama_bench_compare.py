"""Corral's engine against llama-bench from the same llama.cpp build, side by side in one run.

Generation tokens/s; medians over interleaved rounds, and each ratio is the median of
per-round ratios (both sides of a round saw the same machine; the order flips every round).

1. One GPU: the inference child, as bench/generation.py measures it (tokens / generation
   seconds inside the child; also as the parent receives them), vs `llama-bench -p 0 -n N
   -ngl 99` on the same model. Target >= 0.97x. A bare llama-cpp-python loop (greedy sample +
   decode, nothing else) shows what the Python binding itself costs.
2. Two GPUs, one per agent: the model split over two local corral-agents, each started with
   CUDA_VISIBLE_DEVICES naming its GPU, through Corral's authenticated tunnel (ChatSession,
   as `corral chat` runs it; the desktop side sees no GPU), vs `llama-bench --rpc A,B`
   against two plain rpc-server processes, one per GPU, desktop side again without a GPU.
   Target >= 0.95x. Also measured: the inference child registering two other plain
   rpc-servers directly (no tunnel: the engine's own cost over RPC), the child registering
   two more agents' workers directly with the session's layer split (what the tunnel alone
   costs), and llama-bench and the engine on both GPUs locally, without RPC.

    python3 bench/llama_bench_compare.py --bin LLAMA_CPP_BUILD/bin --model M.gguf
        [--rounds 7] [--tokens 128] [--reps 3] [--threads 4] [--gpus 0,1] [--out DIR]
        [--flash-attn on|off] [--parts 1gpu,split]

`--parts 1gpu` runs part 1 alone (nothing else loaded). bench/llama_decode_costs.py splits
the one-GPU gap further (decode alone vs greedy sampling vs a numpy argmax).

packaging/gpu/llama-bench.sh builds llama.cpp and the model and runs this on a GPU host.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.engine.runtime.childproto import Done, Event

PROMPT = "Write a long story about a lighthouse keeper."


@contextlib.contextmanager
def visible(gpus: str) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES for the processes started inside the block (Corral's agents and
    inference child copy os.environ when they start)."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RpcServers:
    """Plain ggml rpc-server processes on 127.0.0.1, one per GPU (with its tensor cache)."""

    def __init__(self, binary: Path, gpus: list[str], threads: int, workdir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.endpoints: list[str] = []
        for gpu in gpus:
            port = _free_port()
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, LLAMA_CACHE=str(workdir / "cache"))
            with (workdir / f"rpc-server-gpu{gpu}-{port}.log").open("ab") as log:
                proc = subprocess.Popen(
                    [str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads), "-c"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            self.procs.append(proc)
            self.endpoints.append(f"127.0.0.1:{port}")
            self._wait(port, proc)

    @staticmethod
    def _wait(port: int, proc: subprocess.Popen[bytes]) -> None:
        # A connection closed before HELLO is dropped by the server, which then serves the next.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"rpc-server on port {port} exited ({proc.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"rpc-server on port {port} did not listen within 60 s")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


async def llama_bench(
    opts: argparse.Namespace, gpus: str, rpc: list[str], raw: list[dict[str, Any]]
) -> float:
    """Mean tokens/s of `--reps` generation runs of llama-bench (one process, one load)."""
    cmd = [
        str(opts.bin / "llama-bench"),
        "-m",
        str(opts.model),
        "-p",
        "0",
        "-n",
        str(opts.tokens),
        "-ngl",
        "99",
        "-fa",
        opts.flash_attn,
        "-t",
        str(opts.threads),
        "-r",
        str(opts.reps),
        "-o",
        "json",
    ]
    if rpc:
        cmd += ["--rpc", ",".join(rpc)]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=gpus),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {err.decode()[-2000:]}")
    row = json.loads(out)[0]
    raw.append({"CUDA_VISIBLE_DEVICES": gpus, "cmd": cmd, "result": row})
    return float(row["avg_ts"])


async def _frames_tok_s(frames: AsyncIterator[Event]) -> tuple[float, float]:
    """(tokens/s inside the child, tokens/s as the parent receives them), as generation.py."""
    first = None
    t_end = 0.0
    done: Done | None = None
    async for frame in frames:
        now = time.perf_counter()
        if type(frame).__name__ == "Token" and first is None:
            first = now
        if type(frame).__name__ == "Done":
            done, t_end = frame, now
    assert first is not None and done
    return done.n_tokens / done.gen_s, (done.n_tokens - 1) / (t_end - first)


class Engine:
    """One way of running Corral's inference child: a ChatSession, or a bare InferenceProcess
    with RPC endpoints registered directly."""

    def __init__(self, session: Any = None, child: Any = None) -> None:
        self.session = session
        self.child = child

    def _stream(self, tokens: int) -> AsyncIterator[Event]:
        if self.session is not None:
            self.session.history = []
            it: AsyncIterator[Event] = self.session.ask(PROMPT, max_tokens=tokens, ignore_eos=True)
            return it
        messages = [{"role": "user", "content": PROMPT}]
        from corral.engine.runtime.childproto import Generate

        return self.child.generate(
            Generate.chat(messages, max_tokens=tokens, temp=0.0, seed=1, ignore_eos=True, n_keep=-1)
        )

    async def tok_s(self, tokens: int, reps: int) -> tuple[float, float]:
        got = [await _frames_tok_s(self._stream(tokens)) for _ in range(reps)]
        return statistics.fmean(g[0] for g in got), statistics.fmean(g[1] for g in got)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.child is not None:
            await self.child.close()


class BareLoop:
    """The plainest llama-cpp-python loop in its own process (bench/_bare_loop.py)."""

    def __init__(self, opts: argparse.Namespace, gpus: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("_bare_loop.py")),
                str(opts.model),
                str(opts.tokens),
                str(opts.threads),
                "--flash-attn",
                opts.flash_attn,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=dict(os.environ, CUDA_VISIBLE_DEVICES=gpus),
        )

    async def tok_s(self, tokens: int, reps: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        out = self.proc.stdout
        secs = []
        for _ in range(reps):
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
            secs.append(float(await asyncio.to_thread(out.readline)))
        return statistics.fmean(tokens / s for s in secs)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def _placements(result: Any) -> list[str]:
    return [p.describe() for p in result.placements]


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    from corral.engine.localagents import LocalAgents
    from corral.engine.runtime.agent_client import AgentClient
    from corral.engine.runtime.inference import InferenceProcess
    from corral.engine.runtime.session import ChatSession, LoadSettings

    sys.path.insert(0, str(Path(__file__).parent))
    from tunnel import worker_endpoint  # bench/tunnel.py: a worker's port, from /proc

    gpus = opts.gpus.split(",")
    both = ",".join(gpus)
    fa = opts.flash_attn == "on"
    settings = LoadSettings(
        model=opts.model,
        n_ctx=1024,
        n_threads=opts.threads,
        worker_threads=opts.threads,
        flash_attn=fa,
    )
    raw_lb: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    runs: dict[str, list[float]] = {}
    engines: dict[str, Engine] = {}
    opts.out.mkdir(parents=True, exist_ok=True)
    leases: list[Any] = []  # agent clients holding a worker for the direct path
    with contextlib.ExitStack() as stack:
        # -- the one-GPU side
        with visible(gpus[0]):
            local = ChatSession([])
            info["engine_1gpu"] = _placements(await local.open(settings))
        engines["engine_1gpu"] = Engine(session=local)
        if "split" in opts.parts:
            with visible(both):
                local2 = ChatSession([])
                info["engine_local_2gpu"] = _placements(await local2.open(settings))
            engines["engine_local_2gpu"] = Engine(session=local2)
        bare = BareLoop(opts, gpus[0])
        stack.callback(bare.close)
        if "split" in opts.parts:
            # -- plain rpc-servers: one pair for llama-bench, one for the child registering them
            # directly (a ggml RPC server serves one client at a time)
            binary = opts.bin / "ggml-rpc-server"
            if not binary.exists():
                binary = opts.bin / "rpc-server"
            for_lb = RpcServers(binary, gpus, opts.threads, opts.out)
            stack.callback(for_lb.stop)
            for_child = RpcServers(binary, gpus, opts.threads, opts.out)
            stack.callback(for_child.stop)
            info["rpc_servers"] = {"llama-bench": for_lb.endpoints, "child": for_child.endpoints}
            # -- Corral: two agents, each seeing one GPU; the desktop side sees none
            addresses = []
            for gpu in gpus:
                with visible(gpu):
                    addresses += stack.enter_context(LocalAgents(1)).addresses
            with visible(""):
                split = ChatSession(addresses)
                t0 = time.perf_counter()
                res = await split.open(settings)
                info["tunnel_load_s"] = time.perf_counter() - t0
                info["engine_tunnel"] = _placements(res)
                # the tunnels' data path ('inproc' hand-over, 'native' relay, 'python' pumps)
                info["tunnel_modes"] = sorted({t.mode for t in split.tunnels.values()})
                direct = InferenceProcess()
                await direct.start()
            t0 = time.perf_counter()
            loaded = await direct.load(settings.load_params(for_child.endpoints))
            info["direct_load_s"] = time.perf_counter() - t0
            info["engine_rpc_direct_layers"] = dict(
                collections.Counter(str(d) for d in loaded.log.layers.values())
            )
            engines["engine_tunnel"] = Engine(session=split)
            engines["engine_rpc_direct"] = Engine(child=direct)
            # -- the same kind of agents' workers, registered directly (no tunnel), with the
            # session's layer split: what the tunnel alone costs, apart from the workers
            agents_direct: list[str] = []
            for gpu in gpus:
                with visible(gpu):
                    pair = stack.enter_context(LocalAgents(1))
                client = AgentClient(pair.addresses[0])
                await client.connect()
                await client.start_rpc(threads=opts.threads)  # the lease
                leases.append(client)
                agents_direct.append(worker_endpoint(pair.state_dir(0)))
            with visible(""):
                plain = InferenceProcess()
                await plain.start()
            split_of = list(split.result.plan.tensor_split) if split.result else []
            await plain.load(settings.load_params(agents_direct, split_of))
            engines["engine_agents_direct"] = Engine(child=plain)
        for e in engines.values():  # warm-up, not counted
            await e.tok_s(16, 1)
        await bare.tok_s(opts.tokens, 1)

        async def measure(name: str) -> None:
            if name.startswith("engine"):
                inside, seen = await engines[name].tok_s(opts.tokens, opts.reps)
                runs.setdefault(name, []).append(inside)
                runs.setdefault(name + "_as_received", []).append(seen)
            elif name == "bare_1gpu":
                runs.setdefault(name, []).append(await bare.tok_s(opts.tokens, opts.reps))
            elif name == "lb_1gpu":
                runs.setdefault(name, []).append(await llama_bench(opts, gpus[0], [], raw_lb))
            elif name == "lb_rpc":
                runs.setdefault(name, []).append(
                    await llama_bench(opts, "", for_lb.endpoints, raw_lb)
                )
            elif name == "lb_local_2gpu":
                runs.setdefault(name, []).append(await llama_bench(opts, both, [], raw_lb))

        order = [
            "lb_1gpu",
            "engine_1gpu",
            "bare_1gpu",
            "lb_rpc",
            "engine_tunnel",
            "engine_rpc_direct",
            "engine_agents_direct",
            "lb_local_2gpu",
            "engine_local_2gpu",
        ]
        if "split" not in opts.parts:
            order = order[:3]
        for r in range(opts.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                await measure(name)
            print(
                f"round {r + 1}: "
                + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items() if "received" not in k),
                file=sys.stderr,
                flush=True,
            )
        for e in engines.values():
            await e.close()
        for client in leases:
            await client.close()

    def ratio(a: str, b: str) -> float | None:
        if a not in runs or b not in runs:
            return None  # a part not run
        return statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True))

    pairs = {
        "engine_1gpu / llama-bench_1gpu": ("engine_1gpu", "lb_1gpu"),
        "engine_1gpu as received / llama-bench_1gpu": ("engine_1gpu_as_received", "lb_1gpu"),
        "bare loop / llama-bench_1gpu": ("bare_1gpu", "lb_1gpu"),
        "engine_1gpu / bare loop": ("engine_1gpu", "bare_1gpu"),
        "engine split via tunnel / llama-bench --rpc": ("engine_tunnel", "lb_rpc"),
        "engine split direct RPC / llama-bench --rpc": ("engine_rpc_direct", "lb_rpc"),
        "engine split via tunnel / engine split direct RPC": (
            "engine_tunnel",
            "engine_rpc_direct",
        ),
        "engine split via tunnel / engine via the agents' workers direct": (
            "engine_tunnel",
            "engine_agents_direct",
        ),
        "engine via the agents' workers direct / engine split direct RPC": (
            "engine_agents_direct",
            "engine_rpc_direct",
        ),
        "engine split via tunnel / llama-bench local 2 GPUs": ("engine_tunnel", "lb_local_2gpu"),
        "llama-bench --rpc / llama-bench local 2 GPUs": ("lb_rpc", "lb_local_2gpu"),
        "engine local 2 GPUs / llama-bench local 2 GPUs": ("engine_local_2gpu", "lb_local_2gpu"),
    }
    ratios = {k: ratio(a, b) for k, (a, b) in pairs.items()}
    return {
        "model": str(opts.model),
        "model_bytes": opts.model.stat().st_size,
        "tokens": opts.tokens,
        "rounds": opts.rounds,
        "reps_per_round": opts.reps,
        "threads": opts.threads,
        "flash_attn": opts.flash_attn,
        "parts": opts.parts,
        "median_tok_s": {k: statistics.median(v) for k, v in runs.items()},
        "ratios": {k: v for k, v in ratios.items() if v is not None},
        "info": info,
        "runs": runs,
        "llama_bench_raw": raw_lb,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, help="llama.cpp build's bin/ (llama-bench, rpc-server)")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3, help="runs per side per round")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--gpus", default="0,1", help="CUDA indices: the first for one-GPU runs")
    parser.add_argument("--flash-attn", choices=["on", "off"], default="on")
    parser.add_argument("--out", type=Path, default=Path("bench/results/llama_bench"))
    parser.add_argument(
        "--parts", default="1gpu,split", help="1gpu (engine vs llama-bench), split, or both"
    )
    opts = parser.parse_args()
    if opts.bin is None:
        parser.error("--bin is required")
    res = asyncio.run(run(opts))
    (opts.out / "results.json").write_text(json.dumps(res, indent=1))
    m = res["median_tok_s"]
    print(
        f"model {opts.model.name} ({res['model_bytes'] / 2**30:.2f} GiB), {opts.tokens} tokens, "
        f"{opts.rounds} rounds x {opts.reps} runs, {opts.threads} threads, flash attention "
        f"{opts.flash_attn} (median tok/s; ratios: median of per-round ratios)"
    )
    print("| run | tok/s |")
    print("|---|---|")
    for k, v in m.items():
        print(f"| {k} | {v:.1f} |")
    for k, v in res["ratios"].items():
        print(f"{k}: {v:.3f}x")
    print(json.dumps(res["info"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
