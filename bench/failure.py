"""How fast a dead RPC worker is noticed: kill -9 mid-generation → `corral chat` says so.

Median over rounds of: seconds from the kill to the chat's `crash` event naming the host
(target < 5 s), to the agent reporting the worker running again, and to the chat's
`recovered` event (the model loaded again by itself).

    .venv/bin/python bench/failure.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from tests.support.agents import inventory, start_long_chat, stop


def _until(chat: subprocess.Popen[str], kind: str) -> float:
    assert chat.stdout is not None
    for line in chat.stdout:
        if json.loads(line)["type"] == kind:
            return time.monotonic()
    raise RuntimeError(f"the chat ended without a {kind} event")


def one_round(agents: LocalAgents) -> tuple[float, float, float]:
    victim = agents.addresses[0]
    chat = start_long_chat(default_model_path(), agents.addresses)
    try:
        _until(chat, "token")  # generation is under way
        before = inventory(victim).worker
        killed = time.monotonic()
        os.kill(before.pid, signal.SIGKILL)
        noticed = _until(chat, "crash") - killed
        healed = _until(chat, "recovered") - killed
    finally:
        stop(chat, signal.SIGINT, timeout=60)
    while True:
        now = inventory(victim).worker
        if now.state == "running" and now.pid not in (0, before.pid):
            break
        time.sleep(0.05)
    return noticed, time.monotonic() - killed, healed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    exits, restarts, heals = [], [], []
    with LocalAgents(2) as agents:
        for _ in range(opts.rounds):
            e, r, h = one_round(agents)
            exits.append(e)
            restarts.append(r)
            heals.append(h)
    print(f"kill -9 of an RPC worker mid-generation, {opts.rounds} rounds (medians)")
    print(f"| chat names the dead worker after | {statistics.median(exits):.2f} s | target < 5 s |")
    print(f"| agent has the worker running again after | {statistics.median(restarts):.2f} s | |")
    print(f"| chat has loaded the model again after | {statistics.median(heals):.2f} s | |")
    print(json.dumps({"crash_s": exits, "restart_s": restarts, "recovered_s": heals}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
