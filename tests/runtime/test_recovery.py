"""kill -9 of a whole agent mid-generation: the desktop survives, says who died, keeps the
history, and reloads on the agent that is left."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from corral.engine.localagents import LocalAgents
from corral.engine.runtime.childproto import Done, Token
from corral.engine.runtime.errors import InferenceCrashed
from corral.engine.runtime.session import ChatSession, LoadSettings


async def kill_agent_mid_reply(session: ChatSession, victim_pid: int, victim: str) -> float:
    """Kill the agent after the first token; return seconds from the kill to the error."""
    killed = 0.0
    with pytest.raises(InferenceCrashed) as crash:
        async for frame in session.ask(
            "Count from one to one thousand.", max_tokens=3000, ignore_eos=True
        ):
            if isinstance(frame, Token) and not killed:
                os.kill(victim_pid, signal.SIGKILL)
                killed = time.monotonic()
    took = time.monotonic() - killed
    assert victim in str(crash.value), str(crash.value)
    return took


def test_agent_killed_then_reload_on_the_rest(smollm2: Path) -> None:
    with LocalAgents(1) as stays, LocalAgents(1) as goes:

        async def run() -> None:
            session = ChatSession([stays.addresses[0], goes.addresses[0]])
            try:
                await session.open(LoadSettings(model=smollm2, n_ctx=4096))
                async for _ in session.ask("Hello!", max_tokens=4):
                    pass
                took = await kill_agent_mid_reply(session, goes.procs[0].pid, goes.addresses[0])
                print(f"failure reported {took:.2f} s after kill -9 of the agent")
                assert [m["role"] for m in session.history] == ["user", "assistant"]
                result = await session.reload()
                assert session.dropped == [goes.addresses[0]]
                hosts = {p.host for p in result.placements if p.layers}
                assert len(hosts) == 1 and stays.addresses[0] in next(iter(hosts))
                async for frame in session.ask("And now?", max_tokens=4):
                    last = frame
                assert isinstance(last, Done) and last.cached_tokens == 0
                assert len(session.history) == 4
            finally:
                await session.close()

        asyncio.run(run())
