"""Discovery and liveness timings across network namespaces (root only).

Agent in host 1, `corral hosts --watch` in host 3, on a bridge. Per round: agent start → listed
(and → online), clean stop → removed, kill -9 → offline, link down → offline. Medians.

    sudo .venv/bin/python bench/discovery.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.netns import Lan, LanUnavailable
from tests.support.watch import Watcher, by_address, start_agent


def _status(ip: str, status: str):  # type: ignore[no-untyped-def]
    return lambda hs: (by_address(hs, ip) or {}).get("status") == status


def one_round(lan: Lan, watcher: Watcher) -> dict[str, float]:
    ip = lan.address(1)
    out = {}
    t0 = time.monotonic()
    agent = start_agent(lan, 1)
    out["start_to_listed"] = (
        watcher.wait_for(lambda hs: by_address(hs, ip) is not None)["mono"] - t0
    )
    out["start_to_online"] = watcher.wait_for(_status(ip, "online"))["mono"] - t0

    t0 = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    out["stop_to_removed"] = watcher.wait_for(lambda hs: by_address(hs, ip) is None)["mono"] - t0
    agent.wait()

    agent = start_agent(lan, 1)
    watcher.wait_for(_status(ip, "online"))
    t0 = time.monotonic()
    agent.kill()
    out["kill9_to_offline"] = watcher.wait_for(_status(ip, "offline"))["mono"] - t0
    agent.wait()

    agent = start_agent(lan, 1)
    watcher.wait_for(_status(ip, "online"))
    t0 = time.monotonic()
    lan.link(1, up=False)
    out["link_down_to_offline"] = watcher.wait_for(_status(ip, "offline"), 60)["mono"] - t0
    lan.link(1, up=True)
    agent.send_signal(signal.SIGTERM)
    watcher.wait_for(lambda hs: by_address(hs, ip) is None, 60)
    agent.wait()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    rounds = []
    try:
        with Lan(3) as lan:
            watcher = Watcher(lan, 3, seconds=3600)
            try:
                # each round's events are read from where the last one ended
                for _ in range(opts.rounds):
                    watcher.events.clear()
                    rounds.append(one_round(lan, watcher))
            finally:
                watcher.stop()
    except LanUnavailable as exc:
        print(f"skipped: {exc}")
        return 0
    targets = {
        "start_to_listed": 1.5,
        "start_to_online": None,
        "stop_to_removed": 2.0,
        "kill9_to_offline": 5.0,
        "link_down_to_offline": 10.0,
    }
    print(f"discovery across network namespaces, {opts.rounds} rounds (medians, seconds)")
    print("| what | median | range | target |")
    print("|---|---|---|---|")
    for key, target in targets.items():
        values = [r[key] for r in rounds]
        print(
            f"| {key.replace('_', ' ')} | {statistics.median(values):.2f} | "
            f"{min(values):.2f}–{max(values):.2f} | {'< ' + str(target) if target else ''} |"
        )
    print(json.dumps(rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
