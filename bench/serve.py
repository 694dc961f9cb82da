"""`corral serve` under concurrent clients: aggregate tokens/s at 1, 2, 4, 8 streaming
clients, and time to first token for a short request while a long prompt is being read.

Two local agents (their workers on this machine's CPU, or on GPU 0 where the agents see
one) hold the split; `corral serve --parallel 8` serves it. Each client streams a chat reply
of --tokens tokens (llama-server's ignore_eos, so every reply has the same length) with the
official openai SDK; aggregate tokens/s is all clients' tokens over the wall time from the
first request to the last token. Rounds interleave the client counts; medians are reported.

With --llama-server BIN and --rpc-server BIN (a llama.cpp build), the same clients run
against `llama-server --rpc` over two plain rpc-servers on the same device, -np 4 and -np 8,
side by side in the same rounds.

    .venv/bin/python bench/serve.py [--rounds 3] [--tokens 64] [--model M] [--json OUT]
        [--llama-server BIN --rpc-server BIN]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from tests.support.agents import start_serve

CLIENTS = (1, 2, 4, 8)
_LONG_WORDS = 900  # ~3.6k tokens: a long document pasted into a chat


def start_corral(
    model: Path, agents: list[str], ctx: int, parallel: int, flash_attn: str = "off"
) -> tuple[subprocess.Popen[str], str]:
    """`corral serve` as the tests start it, its output read on (a long run fills a pipe)."""
    proc, url = start_serve(
        model, agents, "--ctx", str(ctx), "--parallel", str(parallel), "--queue", "64",
        "--flash-attn", flash_attn,
    )  # fmt: skip
    for stream in (proc.stdout, proc.stderr):
        assert stream is not None
        threading.Thread(target=stream.read, daemon=True).start()
    return proc, url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_llama_server(
    server: str, rpc: str, model: Path, ctx: int, parallel: int, threads: int, flash_attn: str
) -> tuple[list[subprocess.Popen[bytes]], str]:
    """llama-server over two plain rpc-servers on this machine's device (the same split);
    its log goes to llama-server-npN.log in the working directory."""
    log = open(f"llama-server-np{parallel}.log", "wb")  # noqa: SIM115 (the process keeps it)
    procs, endpoints = [], []
    for _ in range(2):
        port = free_port()
        procs.append(
            subprocess.Popen(
                [rpc, "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        endpoints.append(f"127.0.0.1:{port}")
    time.sleep(2)
    port = free_port()
    procs.append(
        subprocess.Popen(
            [
                server,
                "-m",
                str(model),
                "--rpc",
                ",".join(endpoints),
                "-ngl",
                "99",
                "-c",
                str(ctx),
                "-np",
                str(parallel),
                "--port",
                str(port),
                "-t",
                str(threads),
                "-fa",
                flash_attn,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=1)
            return procs, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit("llama-server did not start")


async def one_stream(url: str, model: str, content: str, tokens: int) -> tuple[float, float, float]:
    """Stream one chat reply over plain HTTP (a light client: the server is what is
    measured, not a client library's parsing); (sent, first content, end) times."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    body = json.dumps(
        {
            "model": model,
            "stream": True,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": content}],
        }
    ).encode()
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    await writer.drain()
    first, seen = 0.0, b""
    while b"[DONE]" not in seen[-64:]:
        data = await reader.read(65536)
        if not data:
            break
        # the first text: "content" with a non-empty string (spaced as json.dumps writes
        # it, or compact as llama-server does)
        if not first and re.search(rb'"content": ?"[^"]', data):
            first = time.monotonic()
        seen = seen[-64:] + data
    end = time.monotonic()
    writer.close()
    if b"[DONE]" not in seen:
        raise SystemExit(f"a stream ended early: {seen[-300:]!r}")
    return t0, first or end, end


def aggregate(url: str, model: str, clients: int, tokens: int) -> float:
    """All clients' tokens over the wall time, clients started together."""

    async def run() -> float:
        t0 = time.monotonic()
        out = await asyncio.gather(
            *(
                one_stream(url, model, f"Tell story number {i} about a cat.", tokens)
                for i in range(clients)
            )
        )
        return clients * tokens / (max(end for _, _, end in out) - t0)

    return asyncio.run(run())


def ttft_under_long_prompt(
    url: str, model: str, rounds: int, words: int = _LONG_WORDS
) -> tuple[float, float, float]:
    """Median time to first token of a short request, idle and while a long prompt is read,
    and of the long prompt alone (what reading it in chunks costs)."""

    def short() -> str:  # new each time too
        return f"Request {time.monotonic_ns()}: say hi."

    def long_prompt() -> str:
        # a new one each time: a prompt seen before is read from a slot's cache instead
        nonce = time.monotonic_ns()
        return f"Document {nonce}. Summarize: " + " ".join(f"w{i}" for i in range(words))

    async def run() -> tuple[list[float], list[float]]:
        idle, busy = [], []
        for _ in range(rounds):
            t0, first, _ = await one_stream(url, model, long_prompt(), 4)
            long_alone.append(first - t0)
            t0, first, _ = await one_stream(url, model, short(), 4)
            idle.append(first - t0)
            reading = asyncio.ensure_future(one_stream(url, model, long_prompt(), 4))
            await asyncio.sleep(0.05)  # its prompt is being read
            t0, first, _ = await one_stream(url, model, short(), 4)
            busy.append(first - t0)
            await reading
        return idle, busy

    long_alone: list[float] = []
    idle, busy = asyncio.run(run())
    return statistics.median(idle), statistics.median(busy), statistics.median(long_alone)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=4, help="llama-server's and rpc-server's threads"
    )
    parser.add_argument("--llama-server", default="")
    parser.add_argument("--rpc-server", default="")
    parser.add_argument("--flash-attn", choices=("on", "off"), default="off")
    parser.add_argument(
        "--long-words",
        type=int,
        default=_LONG_WORDS,
        help="the long prompt's words (~4 tokens each)",
    )
    parser.add_argument("--only-ttft", action="store_true", help="skip the throughput rounds")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    name = opts.model.stem
    # 8 slots of 4096 tokens: room for the long prompt in one of them
    ctx, parallel = 8 * 4096, 8
    results: dict[str, dict[int, list[float]]] = {"corral": {k: [] for k in CLIENTS}}
    ttft: dict[str, tuple[float, float, float]] = {}
    servers: dict[str, str] = {}
    procs: list = []
    with LocalAgents(2) as agents:
        proc, url = start_corral(opts.model, agents.addresses, ctx, parallel, opts.flash_attn)
        procs.append(proc)
        servers["corral"] = url
        if opts.llama_server:
            for np_ in (4, 8):
                ps, lurl = start_llama_server(
                    opts.llama_server,
                    opts.rpc_server,
                    opts.model,
                    np_ * 4096,
                    np_,
                    opts.threads,
                    opts.flash_attn,
                )
                procs += ps
                servers[f"llama-server -np {np_}"] = lurl
                results[f"llama-server -np {np_}"] = {k: [] for k in CLIENTS if k <= np_}
        try:
            for url in servers.values():  # warm-up: the first reply pays one-time costs
                aggregate(url, name, 1, 8)
            for r in range(0 if opts.only_ttft else opts.rounds):
                for label, url in servers.items():
                    for k in results[label]:
                        rate = aggregate(url, name, k, opts.tokens)
                        results[label][k].append(rate)
                        print(f"round {r} {label} clients {k}: {rate:.1f} tok/s", flush=True)
            for label, url in servers.items():
                ttft[label] = ttft_under_long_prompt(url, name, opts.rounds, opts.long_words)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
    print()
    print(
        "| server | "
        + " | ".join(f"{k} client{'s' if k > 1 else ''}" for k in CLIENTS)
        + " | 4 vs 1 | TTFT idle | TTFT during a long prompt |"
    )
    print("|---|" + "---|" * (len(CLIENTS) + 4))
    summary = {}
    for label, by_k in results.items():
        med = {k: statistics.median(v) for k, v in by_k.items() if v}
        ratio = med[4] / med[1] if 4 in med and 1 in med else float("nan")
        idle, busy, alone = ttft.get(label, (float("nan"),) * 3)
        cells = " | ".join(f"{med[k]:.1f}" if k in med else "-" for k in CLIENTS)
        print(
            f"| {label} | {cells} | {ratio:.2f}x | {idle * 1000:.0f} ms | "
            f"{busy * 1000:.0f} ms ({busy / idle:.2f}x) | {alone * 1000:.0f} ms |"
        )
        summary[label] = {
            "tok_s": med,
            "four_vs_one": ratio,
            "ttft_idle_s": idle,
            "ttft_busy_s": busy,
        }
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "model": str(opts.model),
                    "tokens": opts.tokens,
                    "rounds": opts.rounds,
                    "results": summary,
                    "runs": results,
                    "cpus": os.cpu_count(),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
