"""The tunnel's data paths with real agents, real RPC workers and a real model: the connection
handed over to ggml-rpc's own sockets (the inference child's and the worker's), the native
relay where an end keeps it, the Python TLS pumps where either end has no record layer, and
the same reply through all of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.engine.ggml.probe import RpcProbeError
from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from corral.engine.protocol import messages
from corral.engine.runtime.agent_client import AgentClient
from corral.engine.runtime.childproto import Done, Generate
from corral.engine.runtime.inference import InferenceProcess
from corral.engine.runtime.session import LoadSettings
from corral.engine.security import tunnel as tunnel_mod
from tests.support.agents import chat_args

OFF = {"CORRAL_RELAY": "off"}
RELAY = {"CORRAL_RELAY": "relay"}  # the native relay, no hand-over


@dataclass
class Probed:
    features: tuple[str, ...]  # the agent's hello
    versions: list[tuple[int, int, int]]  # the RPC version each HELLO got back
    modes: list[str]  # the tunnel's data path after each
    error: str  # the tunnel's last error
    mode: str  # its data path at the end ("" when no connection got one)


def _open_and_probe(agents: LocalAgents, probes: int = 1) -> Probed:
    """Lease the worker, open a tunnel and send ggml-rpc HELLOs through it, each on a new
    connection (so each picks its data path anew); stops at the first that gets no answer."""

    async def run() -> Probed:
        client = AgentClient(agents.addresses[0])
        await client.connect()
        got = Probed(client.hello.features if client.hello else (), [], [], "", "")
        await client.start_rpc(threads=1)
        tunnel = client.open_tunnel()
        loop = asyncio.get_running_loop()
        try:
            for _ in range(probes):
                got.versions.append(await loop.run_in_executor(None, tunnel.probe, 10.0))
                got.modes.append(tunnel.mode)
        except RpcProbeError:
            pass
        finally:
            tunnel.close()
            await client.close()
        got.error, got.mode = tunnel.last_error, tunnel.mode
        return got

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("agent_env", "desktop_off", "mode"),
    [(None, False, "native"), (OFF, False, "python"), (None, True, "python")],
)
def test_a_tunnel_takes_the_native_relay_only_when_both_ends_have_it(
    agent_env: dict[str, str] | None,
    desktop_off: bool,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with LocalAgents(1, env=agent_env) as agents:
        if desktop_off:  # after the agents started: they keep theirs
            monkeypatch.setenv("CORRAL_RELAY", "off")
        got = _open_and_probe(agents, probes=3)
    assert ("rpc-relay" in got.features) == (agent_env is None)
    assert len(got.versions) == 3 and all(v[0] >= 2 for v in got.versions)
    assert got.modes == [mode] * 3


def test_a_desktop_of_protocol_2_0_still_opens_tunnels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2.0 desktop offers no relay share and does not know TunnelOpen (type 25): the agent
    must answer it with OkReply, as 2.0 agents did, and carry TLS records."""
    known = messages.CONTROL_MESSAGES.types
    monkeypatch.setattr(
        messages.CONTROL_MESSAGES, "types", {k: v for k, v in known.items() if k != 25}
    )
    monkeypatch.setattr(tunnel_mod, "relay_share", lambda: b"")
    with LocalAgents(1) as agents:
        got = _open_and_probe(agents)
    assert got.modes == ["python"] and got.error == ""


def test_a_relay_share_of_the_wrong_length_is_refused_with_a_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tunnel_mod, "relay_share", lambda: b"12345")
    with LocalAgents(1) as agents:
        got = _open_and_probe(agents)
    assert got.mode == "" and "relay key share is 32 bytes, this one 5" in got.error


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


def test_a_split_chat_answers_the_same_through_every_data_path() -> None:
    """Greedy decoding over the same split: the data path must not change one token."""
    with LocalAgents(2) as inproc, LocalAgents(2, env=OFF) as python:
        handed = _reply(inproc, {})
        relayed = _reply(inproc, RELAY)  # the desktop relays; the agents still hand over
        via_pumps = _reply(python, {})  # the desktop's child gets a plain stream (mode P)
        desktop_off = _reply(inproc, OFF)  # the desktop without it: the agents fall back too
    replies = [handed, relayed, via_pumps, desktop_off]
    assert [r["tokens"] for r in replies] == [24] * 4
    assert len({r["content"] for r in replies}) == 1
    assert [d["device"] for d in handed["devices"]] == ["RPC0", "RPC1"]


def _tcp_ports(pid: int) -> list[tuple[int, int]]:
    """(local port, remote port) of each TCP socket process `pid` holds (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in inodes:
                ports.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)))
    return ports


def _worker_pid(agents: LocalAgents, i: int) -> int:
    marker = str(agents.state_dir(i)).encode()
    pids = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and b"corral.engine.agent.worker" in _cmdline(p)
        and marker in _cmdline(p)
    ]
    assert len(pids) == 1
    return pids[0]


@pytest.mark.parametrize(
    ("agent_env", "child_holds", "worker_holds"),
    [(None, True, True), (RELAY, True, False), (OFF, False, False)],
)
def test_the_agent_connection_ends_in_the_processes_that_speak_ggml_rpc(
    agent_env: dict[str, str] | None, child_holds: bool, worker_holds: bool
) -> None:
    """The point of the hand-over: the TCP connection to the agent's port is held by the
    inference child at one end and by the RPC worker at the other, so no relay sits between
    them. Where an end keeps its relay (CORRAL_RELAY=relay) or has no record layer (off),
    that end's process does not hold it."""
    with LocalAgents(1, env=agent_env) as agents:
        agent_port = int(agents.addresses[0].rsplit(":", 1)[1])

        async def run() -> tuple[list[tuple[int, int]], list[tuple[int, int]], str, str]:
            client = AgentClient(agents.addresses[0])
            await client.connect()
            await client.start_rpc(threads=1)
            tunnel = client.open_tunnel()
            child = InferenceProcess()
            await child.start()
            try:
                settings = LoadSettings(model=default_model_path(), n_ctx=256, n_threads=1)
                await child.load(settings.load_params([tunnel.endpoint]))
                async for frame in child.generate(
                    Generate.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temp=0.0)
                ):
                    if isinstance(frame, Done):
                        assert frame.n_tokens == 4
                assert child.proc is not None
                held = _tcp_ports(child.proc.pid), _tcp_ports(_worker_pid(agents, 0))
                return held[0], held[1], tunnel.mode, tunnel.last_error
            finally:
                await child.close()
                tunnel.close()
                await client.close()

        child_ports, worker_ports, mode, error = asyncio.run(run())
    assert error == ""
    assert (
        mode
        == {None: "inproc", "relay": "inproc", "off": "python"}[
            (agent_env or {}).get("CORRAL_RELAY")
        ]
    )
    assert any(remote == agent_port for _, remote in child_ports) == child_holds
    assert any(local == agent_port for local, _ in worker_ports) == worker_holds


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def test_processes_that_speak_ggml_rpc_keep_rdma_off() -> None:
    """A llama.cpp built with libibverbs would move an RPC connection to RDMA after HELLO,
    out of the tunnel: the agent's worker and the inference child run with it off."""
    with LocalAgents(1) as agents:

        async def run() -> None:
            client = AgentClient(agents.addresses[0])
            await client.connect()
            await client.start_rpc(threads=1)
            child = InferenceProcess()
            await child.start()
            try:
                assert child.proc is not None
                assert _environ(child.proc.pid).get("GGML_RPC_NO_RDMA") == "1"
                worker = _worker_pid(agents, 0)  # exactly one, or it fails
                assert _environ(worker).get("GGML_RPC_NO_RDMA") == "1"
            finally:
                await child.close()
                await client.close()

        asyncio.run(run())


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_restarted_worker_takes_hand_overs_on_a_new_socket_and_the_old_one_goes() -> None:
    """The worker died and the agent restarted it on a new port: its hand-over socket is the
    new worker's, and the dead one's is removed, not left to pile up while the agent runs."""
    with LocalAgents(1) as agents:

        async def run() -> tuple[str, str]:
            client = AgentClient(agents.addresses[0])
            await client.connect()
            await client.start_rpc(threads=1)
            try:
                first = _worker_pid(agents, 0)
                before = _environ(first)["CORRAL_RPCSHIM_LISTEN"]
                os.kill(first, 9)
                for _ in range(200):  # the agent restarts it after a short backoff
                    await asyncio.sleep(0.1)
                    with contextlib.suppress(AssertionError):
                        pid = _worker_pid(agents, 0)
                        if pid != first:
                            after = _environ(pid).get("CORRAL_RPCSHIM_LISTEN", "")
                            if Path(after).is_socket():
                                return before, after
                raise AssertionError("the worker was not restarted")
            finally:
                await client.close()

        before, after = asyncio.run(run())
        assert before != after and not Path(before).exists()  # while the agent still runs
