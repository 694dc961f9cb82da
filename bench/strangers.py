"""Connection attempts without a paired certificate against a real agent: what they got, and
how long until the agent closed each. Also what a paired desktop sees meanwhile.

    .venv/bin/python bench/strangers.py [--attempts 1000]
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

from corral.engine.runtime.agent_client import AgentClient
from corral.engine.runtime.localagents import LocalAgents
from corral.engine.security.desktop import DesktopKeys
from tests.support.strangers import ALL_KINDS as KINDS
from tests.support.strangers import SERVED, attempt


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
