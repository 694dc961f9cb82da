"""The tunnel's two data paths with real agents, real RPC workers and a real model: the native
relay when both ends have it, the Python TLS pumps when either does not, and the same reply
through both."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest

from corral.engine.ggml.probe import probe_rpc
from corral.engine.model import default_model_path
from corral.engine.runtime.agent_client import AgentClient
from corral.engine.runtime.localagents import LocalAgents
from tests.support.agents import chat_args

OFF = {"CORRAL_RELAY": "off"}


@pytest.mark.parametrize(("agent_env", "mode"), [(None, "native"), (OFF, "python")])
def test_a_tunnel_takes_the_native_relay_only_when_the_agent_has_it(
    agent_env: dict[str, str] | None, mode: str
) -> None:
    with LocalAgents(1, env=agent_env) as agents:

        async def run() -> None:
            client = AgentClient(agents.addresses[0])
            await client.connect()
            features = client.hello.features if client.hello else ()
            assert ("rpc-relay" in features) == (mode == "native")
            await client.start_rpc(threads=1)
            tunnel = client.open_tunnel()
            loop = asyncio.get_running_loop()
            try:
                for _ in range(3):  # a new connection, and data path, each time
                    version = await loop.run_in_executor(None, probe_rpc, tunnel.endpoint, 10.0)
                    assert version[0] >= 2
                    assert tunnel.mode == mode
            finally:
                tunnel.close()
                await client.close()

        asyncio.run(run())


def _reply(agents: LocalAgents, desktop_env: dict[str, str]) -> dict:
    args = chat_args(default_model_path(), agents.addresses, long=False)
    args[args.index("--max-tokens") + 1] = "24"
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=300, env=dict(os.environ, **desktop_env)
    )
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.splitlines()[-1])
    assert last["type"] == "done", done.stdout[-500:]
    return dict(last)


def test_a_split_chat_answers_the_same_through_the_relay_and_the_python_pumps() -> None:
    """Greedy decoding over the same split: the data path must not change one token."""
    with LocalAgents(2) as native, LocalAgents(2, env=OFF) as python:
        via_relay = _reply(native, {})
        via_pumps = _reply(python, {})
        desktop_off = _reply(native, OFF)  # the desktop without it: the agents fall back too
    assert via_relay["tokens"] == via_pumps["tokens"] == desktop_off["tokens"] == 24
    assert via_relay["content"] == via_pumps["content"] == desktop_off["content"]
    assert [d["device"] for d in via_relay["devices"]] == ["RPC0", "RPC1"]
