"""Connection attempts without a paired certificate against a real agent: what they got, and
how long until the agent closed each. Also what a paired desktop sees meanwhile, and, with a
crowd holding connections (130 certificate-less peers that send Hello and hold, two that
send 4 MiB frames of nested arrays), how often it still connects and how the agent's memory
moves.

    .venv/bin/python bench/strangers.py [--attempts 1000] [--holders 130] [--bombs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corral.engine.localagents import LocalAgents
from corral.engine.runtime.agent_client import AgentClient
from corral.engine.security.desktop import DesktopKeys
from tests.support.strangers import ALL_KINDS as KINDS
from tests.support.strangers import SERVED, Crowd, attempt, paired_connects, rss_mib


async def _ping_ms(address: str) -> float:
    client = AgentClient(address)
    await client.connect()
    t0 = time.perf_counter()
    for _ in range(20):
        await client.ping()
    await client.close()
    return (time.perf_counter() - t0) / 20 * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=1000)
    parser.add_argument("--holders", type=int, default=130)
    parser.add_argument("--bombs", type=int, default=2)
    parser.add_argument("--connects", type=int, default=8)
    opts = parser.parse_args()
    stranger = DesktopKeys(Path(tempfile.mkdtemp(prefix="corral-stranger-")))
    with LocalAgents(1) as agents:
        address = agents.addresses[0]
        before = asyncio.run(_ping_ms(address))
        times: dict[str, list[float]] = {k: [] for k in KINDS}
        answers: dict[str, set[str]] = {k: set() for k in KINDS}
        for n in range(opts.attempts):
            kind = KINDS[n % len(KINDS)]
            took, got = attempt(address, kind, stranger.ctx)
            times[kind].append(took)
            answers[kind].update(got)
        after = asyncio.run(_ping_ms(address))
        pid = agents.procs[0].pid
        for code_active in (False, True):
            if code_active:
                agents.issue_code(0)
            rss = [rss_mib(pid)]
            with Crowd(address, opts.holders, opts.bombs) as crowd:
                time.sleep(2)
                ok = paired_connects(address, opts.connects)
                rss.append(rss_mib(pid))
            held = sorted(crowd.held) or [0.0]
            print(
                f"crowd of {opts.holders} holders + {opts.bombs} 4 MiB nested frames, pairing "
                f"code {'active' if code_active else 'not active'}: paired desktop connected "
                f"{ok}/{opts.connects}; agent RSS {rss[0]:.0f} -> {rss[1]:.0f} MiB; a holder's "
                f"connection lasted {statistics.median(held) * 1000:.0f} ms median, "
                f"{held[-1] * 1000:.0f} ms max"
            )
    served = sum(len(a & SERVED) for a in answers.values())
    print(f"{opts.attempts} attempts without a paired certificate; requests served: {served}")
    print("| attempt | n | answered with | closed after (median / max) |")
    print("|---|---|---|---|")
    for k in KINDS:
        t = times[k]
        print(
            f"| {k} | {len(t)} | {', '.join(sorted(answers[k])) or 'nothing'} | "
            f"{statistics.median(t) * 1000:.1f} ms / {max(t) * 1000:.1f} ms |"
        )
    print(f"paired desktop's ping before / after: {before:.2f} / {after:.2f} ms")
    return 1 if served else 0


if __name__ == "__main__":
    sys.exit(main())
