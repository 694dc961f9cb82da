"""Generation speed, side by side in one run (medians of interleaved rounds).

1. The inference child (Corral's decode loop, streaming every token to the parent) vs the
   plainest llama-cpp-python low-level loop, same model, same threads.  Target >= 0.97x.
2. The model split over two local agents' RPC workers vs the same child running locally.

    .venv/bin/python bench/generation.py [--model PATH] [--tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from corral.engine.runtime.agent_client import AgentClient
from corral.engine.runtime.childproto import Done, Token
from corral.engine.runtime.session import ChatSession, LoadSettings

PROMPT = "Write a long story about a lighthouse keeper."


async def _child_round(session: ChatSession, tokens: int) -> tuple[float, float]:
    """(tokens/s inside the child, tokens/s as the parent receives them)."""
    session.history = []
    first = None
    t_end = 0.0
    done: dict = {}
    async for frame in session.ask(PROMPT, max_tokens=tokens, ignore_eos=True):
        now = time.perf_counter()
        if isinstance(frame, Token) and first is None:
            first = now
        if isinstance(frame, Done):
            done, t_end = frame, now
    assert first is not None
    return done.n_tokens / done.gen_s, (done.n_tokens - 1) / (t_end - first)


LONG = " ".join(["The keeper climbed the stairs, trimmed the wick and watched the sea."] * 20)


async def _prompt_round(session: ChatSession, i: int) -> tuple[float, float]:
    """(time to first token as the parent sees it, prompt tokens/s in the child) for a long
    prompt whose start differs per round, so no cached prefix helps."""
    session.history = []
    t0 = time.perf_counter()
    ttft = 0.0
    async for frame in session.ask(LONG, max_tokens=2, system=f"Round {i}. Be brief."):
        if isinstance(frame, Token) and not ttft:
            ttft = time.perf_counter() - t0
        if isinstance(frame, Done):
            done = frame
    fresh = done.prompt_tokens - done.cached_tokens
    return ttft, fresh / done.prompt_s


def _start_bare(
    model: Path, tokens: int, threads: int, endpoints: list[str] | None = None
) -> subprocess.Popen[str]:
    """The bare-loop baseline in its own process (split over endpoints, if given)."""
    return subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("_bare_loop.py")),
            str(model),
            str(tokens),
            str(threads),
            *(endpoints or []),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def run(model: Path, tokens: int, rounds: int, threads: int) -> dict:
    bare = _start_bare(model, tokens, threads)
    assert bare.stdin is not None and bare.stdout is not None
    local = ChatSession([])
    await local.open(LoadSettings(model=model, n_ctx=1024, n_threads=threads))
    results: dict[str, list[float]] = {
        "bare": [],
        "child": [],
        "child_parent": [],
        "split": [],
        "bare_split": [],
        "ttft_local": [],
        "pp_local": [],
        "ttft_split": [],
        "pp_split": [],
    }
    # The bare loop gets its own two agents: a ggml RPC worker serves one client at a time.
    with LocalAgents(2) as agents, LocalAgents(2) as bare_agents:
        endpoints = []
        holders = []  # hold the leases (and the tunnels) while the bare loop uses the workers
        for address in bare_agents.addresses:
            client = AgentClient(address)
            await client.connect()
            await client.start_rpc(threads=threads)
            tunnel = client.open_tunnel()
            holders.append((client, tunnel))
            endpoints.append(tunnel.endpoint)
        bare_split = _start_bare(model, tokens, threads, endpoints)
        assert bare_split.stdin is not None and bare_split.stdout is not None
        bare_split.stdin.write("go\n")
        bare_split.stdin.flush()
        bare_split.stdout.readline()  # warm-up
        split = ChatSession(agents.addresses)
        await split.open(
            LoadSettings(model=model, n_ctx=1024, n_threads=threads, worker_threads=threads)
        )
        # one warm-up round each, not counted
        bare.stdin.write("go\n")
        bare.stdin.flush()
        bare.stdout.readline()
        await _child_round(local, tokens)
        await _child_round(split, tokens)
        for i in range(rounds):
            # alternate which runs first, so drift in machine load hits both alike
            if i % 2:
                inside, seen = await _child_round(local, tokens)
            bare.stdin.write("go\n")
            bare.stdin.flush()
            results["bare"].append(tokens / float(bare.stdout.readline()))
            if not i % 2:
                inside, seen = await _child_round(local, tokens)
            results["child"].append(inside)
            results["child_parent"].append(seen)
            results["split"].append((await _child_round(split, tokens))[0])
            bare_split.stdin.write("go\n")
            bare_split.stdin.flush()
            results["bare_split"].append(tokens / float(bare_split.stdout.readline()))
            for name, sess in (("local", local), ("split", split)):
                ttft, pp = await _prompt_round(sess, i)
                results[f"ttft_{name}"].append(ttft)
                results[f"pp_{name}"].append(pp)
        await split.close()
        bare_split.stdin.close()
        bare_split.wait()
        for client, tunnel in holders:
            tunnel.close()
            await client.close()
    await local.close()
    bare.stdin.close()
    bare.wait()
    med = {k: statistics.median(v) for k, v in results.items()}

    def paired(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(results[a], results[b], strict=True)]

    # Ratios are medians of per-round (paired) ratios: both runs of a round saw the same load.
    return {
        "model": model.name,
        "tokens": tokens,
        "rounds": rounds,
        "threads": threads,
        "tok_s_median": med,
        "runs": results,
        "child_vs_bare": statistics.median(paired("child", "bare")),
        "child_parent_vs_bare": statistics.median(paired("child_parent", "bare")),
        "split2_vs_local": statistics.median(paired("split", "child")),
        "split_vs_bare_split": statistics.median(paired("split", "bare_split")),
        "child_vs_bare_per_round": paired("child", "bare"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    opts = parser.parse_args()
    res = asyncio.run(run(opts.model, opts.tokens, opts.rounds, opts.threads))
    m = res["tok_s_median"]
    print(
        f"model {res['model']}, {opts.tokens} tokens x {opts.rounds} rounds, "
        f"{opts.threads} threads (median tok/s; ratio = median of per-round ratios)"
    )
    print("| run | tok/s | ratio |")
    print("|---|---|---|")
    print(f"| bare llama-cpp-python loop | {m['bare']:.1f} | 1.00 |")
    print(f"| inference child (inside) | {m['child']:.1f} | {res['child_vs_bare']:.3f}x bare |")
    print(
        f"| inference child (as streamed to parent) | {m['child_parent']:.1f} | "
        f"{res['child_parent_vs_bare']:.3f}x bare |"
    )
    print(f"| split over 2 local agents | {m['split']:.1f} | {res['split2_vs_local']:.3f}x local |")
    print(
        f"| prompt ({len(LONG.split())} words), local | {m['pp_local']:.0f} tok/s | "
        f"first token after {m['ttft_local'] * 1000:.0f} ms |"
    )
    print(
        f"| prompt, split over 2 local agents | {m['pp_split']:.0f} tok/s | "
        f"first token after {m['ttft_split'] * 1000:.0f} ms |"
    )
    print(
        f"| bare loop over the same 2-agent split | {m['bare_split']:.1f} | "
        f"engine split {res['split_vs_bare_split']:.3f}x bare split |"
    )
    print("child/bare per round: " + ", ".join(f"{r:.3f}" for r in res["child_vs_bare_per_round"]))
    if opts.json:
        opts.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
