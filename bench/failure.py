"""How fast a dead RPC worker is noticed: kill -9 mid-generation → `corral chat` exits.

Median over rounds of: seconds from the kill to the chat process's exit (target < 5 s), and
from the kill to the agent reporting the worker running again.

    .venv/bin/python bench/failure.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from tests.support.agents import inventory, start_long_chat


def one_round(agents: LocalAgents) -> tuple[float, float]:
    victim = agents.addresses[0]
    chat = start_long_chat(default_model_path(), agents.addresses)
    assert chat.stdout is not None
    chat.stdout.readline()  # first token: generation is under way
    before = inventory(victim).worker
    killed = time.monotonic()
    os.kill(before.pid, signal.SIGKILL)
    chat.communicate(timeout=60)
    exited = time.monotonic() - killed
    assert chat.returncode == 1
    while True:
        now = inventory(victim).worker
        if now.state == "running" and now.restarts > before.restarts:
            break
        time.sleep(0.05)
    return exited, time.monotonic() - killed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    exits, restarts = [], []
    with LocalAgents(2) as agents:
        for _ in range(opts.rounds):
            e, r = one_round(agents)
            exits.append(e)
            restarts.append(r)
    print(f"kill -9 of an RPC worker mid-generation, {opts.rounds} rounds (medians)")
    print(f"| chat exits non-zero after | {statistics.median(exits):.2f} s | target < 5 s |")
    print(f"| agent has the worker running again after | {statistics.median(restarts):.2f} s | |")
    print(json.dumps({"exit_s": exits, "restart_s": restarts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
