"""Helpers that drive real agents and `corral chat` processes, shared by tests and benches."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from corral.engine.protocol import Inventory
from corral.engine.runtime.agent_client import AgentClient

LONG_PROMPT = "Count from one to one thousand."


def inventory(address: str) -> Inventory:
    """One agent's inventory, over a connection of its own."""

    async def run() -> Inventory:
        client = AgentClient(address)
        await client.connect()
        try:
            return await client.inventory()
        finally:
            await client.close()

    return asyncio.run(run())


def chat_args(model: Path, agents: list[str], *, long: bool, ctx: int = 2048) -> list[str]:
    """`corral chat --json` over these agents: a long reply (3000 tokens, EOS ignored, long
    enough to kill something in the middle) or a short one (4 tokens: does it answer?)."""
    args = [sys.executable, "-m", "corral.engine.cli", "chat", str(model), "--json"]
    args += ["--ctx", str(ctx)]
    if long:
        args += ["--prompt", LONG_PROMPT, "--max-tokens", "3000", "--ignore-eos"]
    else:
        args += ["--prompt", "Hello!", "--max-tokens", "4"]
    for a in agents:
        args += ["--agent", a]
    return args


def start_long_chat(model: Path, agents: list[str]) -> subprocess.Popen[str]:
    """A long `corral chat --json` (see chat_args); read its first line to know generation
    is under way."""
    return subprocess.Popen(
        chat_args(model, agents, long=True, ctx=4096),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_serve(model: Path, agents: list[str], *flags: str) -> tuple[subprocess.Popen[str], str]:
    """`corral serve MODEL` over these agents on a free port (context 2048 and one slot
    unless `flags` say otherwise): the process and its /v1 URL, once it serves."""
    args = [sys.executable, "-m", "corral.engine.cli", "serve", str(model), "--port", "0"]
    args += ["--ctx", "2048", "--parallel", "1", *flags]
    for a in agents:
        args += ["--agent", a]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        proc.kill()
        raise AssertionError(line + (proc.stderr.read() if proc.stderr else ""))
    return proc, line.split()[-1]


def stop(
    proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 20
) -> tuple[str, str]:
    """Signal a `corral` process (SIGTERM: serve's shutdown; SIGINT: a chat's Ctrl-C), wait
    for it, kill it if it does not end in `timeout` s; its remaining (stdout, stderr)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out or "", err or ""
