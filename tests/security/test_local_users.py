"""Another local user on a host that runs Corral (uid 65534, from a child that drops to it)
gets no raw ggml-rpc: no TCP listener of the host answers a ggml-rpc HELLO while an agent
is idle, after `corral plan` started its worker, or during a chat over it; the Unix sockets
the worker and the desktop's tunnels take connections on refuse that user; and where a
tunnel has to stay on TCP (no in-process data path), it serves only this user."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from corral.engine.localagents import LocalAgents
from corral.engine.runtime.agent_client import AgentClient
from corral.engine.security import tunnel as tunnel_mod
from tests.conftest import corral
from tests.support.agents import start_long_chat
from tests.support.otheruser import (
    answered_rpc,
    can_switch_user,
    hellos_from_nobody,
    unix_from_nobody,
)

pytestmark = pytest.mark.skipif(
    not can_switch_user(), reason="needs root to act as another user (CI runs as root)"
)


def _corral_unix_sockets() -> list[str]:
    """The Unix sockets Corral's processes listen on for RPC (hand-overs, plain clients)."""
    paths = set()
    for row in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = row.split()
        if len(f) >= 8 and "/corral-rpc-" in f[7] and Path(f[7]).exists():
            paths.add(f[7])
    return sorted(paths)


def _worker_endpoint(state_dir: Path) -> str:
    """The --endpoint the agent with `state_dir` started its worker with (from /proc)."""
    marker = str(state_dir).encode()
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"corral.engine.agent.worker" in argv and any(marker in a for a in argv):
            return argv[argv.index(b"--endpoint") + 1].decode()
    raise AssertionError(f"no worker process for {state_dir}")


def _nobody_reaches_nothing(when: str) -> list[str]:
    answered = answered_rpc(hellos_from_nobody())
    assert not answered, f"{when}: ggml-rpc answered another local user on {answered}"
    sockets = _corral_unix_sockets()
    reached = {p: o for p, o in unix_from_nobody(sockets).items() if o != "PermissionError"}
    assert not reached, f"{when}: another local user reached {reached}"
    return sockets


def test_another_local_user_gets_no_raw_rpc_idle_after_plan_and_during_chat(
    smollm2: Path,
) -> None:
    assert tunnel_mod.relay_mode() == "inproc"  # what every host with the shim runs
    with LocalAgents(1) as agents:
        _nobody_reaches_nothing("an idle agent")
        planned = corral("plan", str(smollm2), "--agent", agents.addresses[0])
        assert planned.returncode == 0, planned.stderr
        worker = _nobody_reaches_nothing("after corral plan")
        assert any("/worker-" in p for p in worker), "the worker's Unix socket was not seen"
        chat = start_long_chat(smollm2, agents.addresses)
        try:
            assert chat.stdout is not None
            first = chat.stdout.readline()  # generation is under way once a token arrives
            assert json.loads(first)["type"] == "token", first
            during = _nobody_reaches_nothing("during a chat")
            assert len(during) > len(worker), "the desktop's tunnel sockets were not seen"
        finally:
            chat.terminate()
            chat.communicate(timeout=60)


def test_a_tunnel_on_tcp_serves_only_this_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the in-process data path (CORRAL_RELAY=off here: the Python pumps), the
    desktop's endpoint is a 127.0.0.1 port: another user's HELLO is turned away unanswered,
    this user's reaches the worker, whose own port is the kernel's choice."""
    monkeypatch.setenv("CORRAL_RELAY", "off")
    assert tunnel_mod.handover_dir() == ""
    with LocalAgents(1) as agents:

        async def run() -> None:
            client = AgentClient(agents.addresses[0])
            await client.connect()
            await client.start_rpc(threads=1)
            tunnel = client.open_tunnel()
            try:
                assert tunnel.host == "127.0.0.1"
                loop = asyncio.get_running_loop()
                outcomes = await loop.run_in_executor(None, hellos_from_nobody)
                assert outcomes[tunnel.endpoint] == "closed", outcomes[tunnel.endpoint]
                assert tunnel.refused >= 1
                version = await loop.run_in_executor(None, tunnel.probe, 10.0)
                assert version[0] == 7
                # the worker's own port: asked of the kernel (port 0), never chosen and
                # bound again later, which another local user could take in between
                assert _worker_endpoint(agents.state_dir(0)) == "127.0.0.1:0"
            finally:
                tunnel.close()
                await client.close()

        asyncio.run(run())
