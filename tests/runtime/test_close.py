"""Closing a connection to an agent ends, whatever it was doing at that moment.

Python 3.11's `asyncio.wait_for` returns its result, and drops the cancellation, when a
cancel arrives after the awaited reply has landed but before the waiting task has resumed
(gh-86296, fixed in 3.12). A keep-alive cancelled by `close()` at that moment went on
pinging, and `close()` waited on it for ever: a refused `corral chat` in the validation
matrix hung that way twice in CI.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from corral.engine.localagents import LocalAgents
from corral.engine.runtime import agent_client
from corral.engine.runtime.agent_client import AgentClient


@pytest.fixture(scope="module")
def agent() -> Iterator[str]:
    with LocalAgents(1) as running:
        yield running.addresses[0]


class _CancelOnReply(dict[int, "asyncio.Future[object]"]):
    """The client's pending replies; the first one the read loop takes cancels `victim`
    right then, before the reply is set: the order in which `close()` ran in CI."""

    victim: asyncio.Task[None] | None = None

    def pop(self, key: int, default: object = None) -> object:  # type: ignore[override]
        if self.victim is not None:
            self.victim.cancel()
            self.victim = None
        return super().pop(key, default)


async def _cancel_as_a_pong_lands(address: str) -> None:
    client = AgentClient(address)
    await client.connect()
    try:
        pending = _CancelOnReply()
        client._pending = pending  # type: ignore[assignment]
        pending.victim = client._keepalive
        done, _ = await asyncio.wait({client._keepalive}, timeout=5)  # type: ignore[arg-type]
        assert done, "the keep-alive went on after it was cancelled"
    finally:
        await asyncio.wait_for(client.close(), 10)


def test_a_keepalive_cancelled_as_its_pong_lands_ends(
    agent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_client, "_KEEPALIVE", 0.02)
    for _ in range(3):
        asyncio.run(_cancel_as_a_pong_lands(agent))
