"""kill -9 of a whole agent during generation, N times in one desktop session.

Per round: a fresh agent joins (`add_agent` + `reload`), the chat generates, the agent is
killed after the first token; we record the seconds to the error naming it, whether the
history survived, and whether a reload on the remaining agent answers. Target: the desktop
survives every round and reports within 3 s.

    .venv/bin/python bench/agent_kill.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from corral.engine.runtime.childproto import Done
from corral.engine.runtime.session import ChatSession, LoadSettings
from tests.runtime.test_recovery import kill_agent_mid_reply


async def run(rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        "report_s": [],
        "reload_s": [],
        "history_ok": [],
        "reload_ok": [],
    }
    with LocalAgents(1) as stays:
        session = ChatSession([stays.addresses[0]])
        await session.open(LoadSettings(model=default_model_path(), n_ctx=4096))
        try:
            for _ in range(rounds):
                with LocalAgents(1) as goes:
                    session.add_agent(goes.addresses[0])
                    await session.reload()
                    session.history = []
                    async for _frame in session.ask("Hello!", max_tokens=4):
                        pass
                    out["report_s"].append(
                        await kill_agent_mid_reply(session, goes.procs[0].pid, goes.addresses[0])
                    )
                    out["history_ok"].append(float(len(session.history) == 2))
                    t0 = time.monotonic()
                    result = await session.reload()
                    out["reload_s"].append(time.monotonic() - t0)
                    async for frame in session.ask("Still there?", max_tokens=4):
                        last = frame
                    out["reload_ok"].append(
                        float(isinstance(last, Done) and len(result.placements) >= 1)
                    )
        finally:
            await session.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    opts = parser.parse_args()
    res = asyncio.run(run(opts.rounds))
    n = opts.rounds
    print(f"kill -9 of an agent mid-generation, {n} rounds in one desktop session")
    print("| what | result | target |")
    print("|---|---|---|")
    print(f"| desktop survived | {n}/{n} | {n}/{n} |")
    print(
        f"| failure reported, naming the agent, after | median "
        f"{statistics.median(res['report_s']):.2f} s, worst {max(res['report_s']):.2f} s "
        "| < 3 s |"
    )
    print(f"| history intact | {int(sum(res['history_ok']))}/{n} | {n}/{n} |")
    print(f"| reload on the remaining agent answers | {int(sum(res['reload_ok']))}/{n} | {n}/{n} |")
    print(f"| reload took | median {statistics.median(res['reload_s']):.2f} s | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
