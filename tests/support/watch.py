"""Drive `corral hosts --watch --json` and an agent inside a test LAN (tests and bench)."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from tests.support.netns import Lan

Snapshot = dict[str, Any]


class Watcher:
    """A host browser running in one namespace; `wait_for(pred)` reads its event stream."""

    def __init__(self, lan: Lan, i: int, seconds: float = 120, extra: tuple[str, ...] = ()):
        self.proc = lan.spawn(
            i,
            [
                sys.executable,
                "-m",
                "corral.engine.cli",
                "hosts",
                "--watch",
                "--json",
                "--wait",
                str(seconds),
                "--interface",
                lan.veth(i),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[Snapshot] = []

    def wait_for(self, pred: Callable[[list[Snapshot]], bool], timeout: float = 30) -> Snapshot:
        """The first event not yet read whose host list satisfies pred."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            self.events.append(event)
            if pred(event["hosts"]):
                return event
        raise AssertionError(
            f"no such state within {timeout} s; last: {self.events[-1] if self.events else None}"
        )

    def stop(self) -> str:
        """End it; return its stderr (log lines)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return str(err)


def start_agent(lan: Lan, i: int, listen: str | None = None) -> subprocess.Popen[str]:
    return lan.spawn(
        i,
        [
            sys.executable,
            "-m",
            "corral.engine.agent.main",
            "--listen",
            listen or f"{lan.address(i)}:7340",
            "--state-dir",
            lan.state_dir(i),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def by_address(hosts: list[Snapshot], address: str) -> Snapshot | None:
    for h in hosts:
        if address in h["addresses"]:
            return h
    return None
