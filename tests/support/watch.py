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


_CODE = "7340-7340"


def start_agent(
    lan: Lan, i: int, listen: str | None = None, desktop: int = 3
) -> subprocess.Popen[str]:
    """Start host i's agent; the first time, pair the desktop in host `desktop` with it
    (the real exchange, over the LAN), as a user would before using it."""
    proc = lan.spawn(
        i,
        [
            sys.executable,
            "-m",
            "corral.engine.agentcli",
            "--listen",
            listen or f"{lan.address(i)}:7340",
            "--state-dir",
            lan.state_dir(i),
            "--log-dir",
            f"{lan.state_dir(i)}/log",
            "--log-level",
            "WARNING",
            "--pairing-code",
            _CODE,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    paired: set[int] = lan.__dict__.setdefault("paired", set())
    if i not in paired:
        address = (
            listen if listen and not listen.startswith("0.0.0.0") else f"{lan.address(i)}:7340"
        )
        deadline = time.monotonic() + 30
        while True:
            done = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    lan.ns(desktop),
                    sys.executable,
                    "-m",
                    "corral.engine.cli",
                    "pair",
                    address,
                    "--code",
                    _CODE,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"pairing with {address} failed: {done.stderr}")
            time.sleep(0.3)
        paired.add(i)
    return proc


def by_address(hosts: list[Snapshot], address: str) -> Snapshot | None:
    for h in hosts:
        if address in h["addresses"]:
            return h
    return None
