"""From another host on the LAN, a worker host shows one open TCP port: the agent's TLS port.

The llama.cpp RPC worker (unauthenticated by design) listens on the agent host's loopback
only, idle and while a desktop chats through it.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time

from corral.engine.model import default_model_path
from tests.support.netns import Lan
from tests.support.watch import start_agent


def _scan(lan: Lan, from_host: int, target: str) -> list[int]:
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lan.ns(from_host),
            sys.executable,
            "-m",
            "tests.support.portscan",
            target,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return [int(line) for line in done.stdout.split()]


def test_only_the_agent_port_is_open_idle_and_during_a_chat(lan: Lan) -> None:
    start_agent(lan, 1)
    target = lan.address(1)
    assert _scan(lan, 2, target) == [7340]
    chat = lan.spawn(
        3,
        [
            sys.executable,
            "-m",
            "corral.engine.cli",
            "chat",
            str(default_model_path()),
            "--agent",
            f"{target}:7340",
            "--prompt",
            "Tell a long story.",
            "--max-tokens",
            "400",
            "--ignore-eos",
            "--json",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert chat.stdout is not None
    deadline = time.monotonic() + 120
    tokens = 0
    while tokens < 5:  # generating: the worker is loaded and serving through the tunnel
        assert time.monotonic() < deadline and chat.poll() is None, (
            chat.stderr.read() if chat.stderr else ""
        )
        if select.select([chat.stdout], [], [], 0.5)[0]:
            line = chat.stdout.readline()
            if line and json.loads(line).get("type") == "token":
                tokens += 1
    during = _scan(lan, 2, target)
    still_chatting = chat.poll() is None
    chat.kill()
    chat.wait()
    assert during == [7340]
    assert still_chatting, "the chat ended before the scan did: scan again with more tokens"
