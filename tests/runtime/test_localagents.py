"""Agents a process starts for itself (LocalAgents: `corral demo`, the benches) go with it,
even when it is killed -9 and no `with` block gets to stop them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_OWNER = """
import asyncio
from corral.engine.runtime.agent_client import AgentClient
from corral.engine.localagents import LocalAgents

async def main(address, agent):
    client = AgentClient(address)
    await client.connect()
    worker = await client.start_rpc()
    print(agent, worker.pid, flush=True)
    await asyncio.sleep(600)

with LocalAgents(1) as agents:
    asyncio.run(main(agents.addresses[0], agents.procs[0].pid))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie no one reaps yet counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_a_kill_9_of_the_owner_takes_its_agents_and_their_workers() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert owner.stdout is not None
    try:
        agent, worker = (int(p) for p in owner.stdout.readline().split())
        assert _alive(agent) and _alive(worker)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 30  # a safety stop, not a measurement
        while (_alive(agent) or _alive(worker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(agent) and not _alive(worker)
    finally:  # whatever happened, nothing of this test stays behind
        owner.kill()
        owner.wait()
        owner.stdout.close()
        for pid in locals().get("agent", 0), locals().get("worker", 0):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
