"""What Corral does when workers die, hang or cannot be reached: clear errors, no aborts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.engine.localagents import LocalAgents
from corral.engine.runtime import inference
from corral.engine.runtime.agent_client import AgentClient
from corral.engine.runtime.childproto import Done
from corral.engine.runtime.errors import InferenceCrashed, RuntimeFailure
from corral.engine.runtime.session import ChatSession, LoadSettings
from tests.conftest import corral
from tests.support.agents import inventory, start_long_chat


@pytest.fixture()
def fresh_agents() -> Iterator[LocalAgents]:
    with LocalAgents(2) as agents:
        yield agents


def _until(proc: subprocess.Popen[str], kind: str, timeout: float = 90) -> list[dict]:
    """The --json events of `corral chat` up to and including the first of `kind`."""
    assert proc.stdout is not None
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(json.loads(line))
        if seen[-1]["type"] == kind:
            return seen
    raise AssertionError(
        f"no {kind} event: {[e['type'] for e in seen][-20:]} "
        + (proc.stderr.read()[-2000:] if proc.stderr and proc.poll() is not None else "")
    )


def _end_reply(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Ctrl-C: the reply stops at its next token and the chat ends."""
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=60)


def test_kill_9_of_a_worker_mid_generation(smollm2: Path, fresh_agents: LocalAgents) -> None:
    """The model comes back without the user: the chat says what died and how it was
    loaded again, and answers on."""
    victim = fresh_agents.addresses[0]
    proc = start_long_chat(smollm2, fresh_agents.addresses)
    try:
        _until(proc, "token")  # generation is under way
        pid = inventory(victim).worker.pid
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        events = _until(proc, "recovered")
        usable_after = time.monotonic() - killed_at
        crash = next(e for e in events if e["type"] == "crash")
        assert victim in crash["message"] and "killed by SIGKILL" in crash["message"], crash
        said = events[-1]["message"]  # "the RPC worker on HOST (ADDRESS) died (…); reloaded…"
        assert said.startswith("the RPC worker on ") and victim in said, said
        assert "died (killed by SIGKILL); reloaded over " in said, said
        _until(proc, "token")  # answering again, on the worker the agent restarted
        _out, err = _end_reply(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    print(f"answering again {usable_after:.1f} s after kill -9 of the worker")  # bench/ too
    inv = inventory(victim)
    assert inv.worker.state == "running" and inv.worker.pid != pid, inv.worker
    assert inv.worker.last_exit == "killed by SIGKILL"


def test_a_stopped_worker_stalls_the_reply_and_the_chat_heals(
    smollm2: Path, fresh_agents: LocalAgents
) -> None:
    """SIGSTOP: the agent's heartbeats still answer, the worker says nothing. The stall
    watch ends the reply, names the stopped worker, and the chat loads again (the agent
    restarts the stopped worker) and answers, with nobody pressing a key."""
    stuck = fresh_agents.addresses[1]
    proc = start_long_chat(smollm2, fresh_agents.addresses)
    pid = 0
    try:
        _until(proc, "token")
        pid = inventory(stuck).worker.pid
        stopped_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        events = _until(proc, "recovered")
        usable_after = time.monotonic() - stopped_at
        crash = next(e for e in events if e["type"] == "crash")["message"]
        assert "made no progress for" in crash, crash
        assert stuck in crash and "is stopped by a signal" in crash, crash
        assert events[-1]["message"].startswith("the reply stalled for"), events[-1]
        _until(proc, "token")
        _out, err = _end_reply(proc)
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert inventory(stuck).worker.pid != pid  # the stopped one was replaced
    print(f"answering again {usable_after:.1f} s after SIGSTOP of a worker")


def test_a_worker_stopped_before_the_load_is_restarted_by_its_agent(
    smollm2: Path, fresh_agents: LocalAgents
) -> None:
    """A worker stopped (SIGSTOP) looks alive to its agent and answers nothing: starting it
    again for the next load restarts it instead of handing llama.cpp a silent endpoint."""
    address = fresh_agents.addresses[1]
    asyncio.run(_start_worker(address))
    pid = inventory(address).worker.pid
    os.kill(pid, signal.SIGSTOP)  # alive to the agent, silent on the wire
    try:
        done = corral(
            "chat",
            str(smollm2),
            "--json",
            "--agent",
            fresh_agents.addresses[0],
            "--agent",
            address,
            "--prompt",
            "Hi",
            "--max-tokens",
            "4",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["type"] == "done"
    assert inventory(address).worker.pid != pid
    assert "Traceback" not in done.stderr


def test_a_worker_stopped_during_the_load_ends_the_load_and_the_session_heals(
    smollm2: Path, fresh_agents: LocalAgents, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP of a worker while the weights go out: llama.cpp would wait on it forever.
    With no load progress for LOAD_STALL s the load is ended, the stopped worker named,
    and recover() loads again on the worker its agent restarted. (LOAD_STALL is 120 s in
    use; 6 s here, so the test does not wait two minutes.)"""
    monkeypatch.setattr(inference, "LOAD_STALL", 6.0)
    stuck = fresh_agents.addresses[1]
    asyncio.run(_start_worker(stuck))
    pid = inventory(stuck).worker.pid

    def stop_at_first_progress(fraction: float) -> None:
        if 0 < fraction < 1 and not stopped:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(time.monotonic())

    stopped: list[float] = []

    async def run() -> tuple[str, str, float]:
        session = ChatSession(fresh_agents.addresses)
        try:
            with pytest.raises(InferenceCrashed) as crash:
                await session.open(LoadSettings(model=smollm2, n_ctx=512), stop_at_first_progress)
            ended_after = time.monotonic() - stopped[0]
            said = await session.recover(crash.value.cause)
            async for frame in session.ask("Hi", max_tokens=4):
                last = frame
            assert isinstance(last, Done), last
            return str(crash.value), said, ended_after
        finally:
            await session.close()

    try:
        message, said, ended_after = asyncio.run(run())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert stopped, "the load reported no progress before it ended"
    assert "the load made no progress for 6 s" in message, message
    assert stuck in message and "is stopped by a signal" in message, message
    assert said.startswith("the load stalled for 6 s"), said
    assert "reloaded over " in said, said
    assert inventory(stuck).worker.pid != pid  # the stopped one was replaced
    print(f"the load ended {ended_after:.1f} s after SIGSTOP; {said}")


async def _start_worker(address: str) -> None:
    client = AgentClient(address)
    await client.connect()
    await client.start_rpc()
    await client.close()


def test_unreachable_agent_fails_cleanly(smollm2: Path, fresh_agents: LocalAgents) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    done = corral(
        "chat",
        str(smollm2),
        "--agent",
        fresh_agents.addresses[0],
        "--agent",
        dead,
        "--prompt",
        "Hi",
        "--max-tokens",
        "4",
    )
    assert done.returncode == 1
    assert f"cannot reach agent {dead}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("presses", [1, 2], ids=["one-ctrl-c", "two-ctrl-c"])
def test_ctrl_c_ends_a_reply_stuck_on_a_stopped_worker(
    smollm2: Path, fresh_agents: LocalAgents, presses: int
) -> None:
    """llama.cpp waiting on a worker that stopped answering never looks at a cancel: Ctrl-C
    kills the inference process after STOP_GRACE s, a second Ctrl-C at once, and the chat
    says why instead of hanging the terminal."""
    stuck = fresh_agents.addresses[1]
    proc = start_long_chat(smollm2, fresh_agents.addresses)
    pid = 0
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert json.loads(first)["type"] == "token", first + (
            proc.stderr.read() if proc.stderr else ""
        )
        pid = inventory(stuck).worker.pid
        os.kill(pid, signal.SIGSTOP)  # alive to its agent, silent on the wire
        time.sleep(1)  # the child is now blocked inside llama_decode on that worker
        pressed_at = time.monotonic()
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
        out, err = proc.communicate(timeout=60)  # a hang fails here instead of blocking CI
        stopped_after = time.monotonic() - pressed_at
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-2000:]
    last = json.loads(out.strip().splitlines()[-1])
    assert last["type"] == "error", last
    # one press: the cancel's grace (15 s) or the stall watch, whichever ends it first
    said = "did not stop" if presses == 1 else "a second cancel killed"
    assert said in last["message"], last
    # its agent, asked after the kill, names the stopped worker
    assert "is stopped by a signal" in last["message"] and stuck in last["message"], last
    assert "Traceback" not in err
    print(f"{presses} Ctrl-C: the chat ended {stopped_after:.1f} s after the first")


def test_a_worker_killed_while_speed_times_it_is_named_and_the_plan_heals(
    smollm2: Path, fresh_agents: LocalAgents, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """kill -9 of a worker while `--strategy speed` times its device on a probe: the plan
    is refused naming that host and how the worker ended, nothing is kept for it, and the
    same plan again (the agent has restarted its worker) measures it and succeeds."""
    from corral.engine.runtime import speeds

    monkeypatch.setenv("CORRAL_SPEEDS_DIR", str(tmp_path))
    victim = fresh_agents.addresses[1]
    asyncio.run(_start_worker(victim))
    pid = inventory(victim).worker.pid
    real = speeds.time_device
    killed: list[int] = []

    async def kill_then_time(
        child: object, params: list, weights: object = None
    ) -> tuple[list[float], list[float]]:
        split = params[0].tensor_split
        if not killed and len(split) == 2 and split[1] == 1.0:  # the victim's device
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return await real(child, params, weights)

    monkeypatch.setattr(speeds, "time_device", kill_then_time)
    monkeypatch.setattr("corral.engine.runtime.session.time_device", kill_then_time)

    settings = LoadSettings(model=smollm2, n_ctx=512, strategy="speed")

    async def first() -> str:
        session = ChatSession(fresh_agents.addresses)
        try:
            await session.connect(0)
            with pytest.raises(RuntimeFailure) as refused:
                await session.plan(settings)
            return str(refused.value)
        finally:
            await session.close()

    async def again() -> int:
        session = ChatSession(fresh_agents.addresses)
        try:
            await session.connect(0)
            _, plan = await session.plan(settings)
            assert session.speeds is not None and session.prediction is not None
            return len(plan.devices)
        finally:
            await session.close()

    message = asyncio.run(first())
    assert not (tmp_path / "speeds.json").exists()  # nothing kept from the failed timing
    n_devices = asyncio.run(again())
    assert killed, "the victim's device was never timed"
    assert victim in message and "SIGKILL" in message, message
    assert "speed" in message, message
    assert n_devices == 2
    kept = json.loads((tmp_path / "speeds.json").read_text())["devices"]
    assert len(kept) == 3, kept  # the desktop and both devices, measured the second time
    print(f"refused: {message}")


async def _until_lost(client: AgentClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not client.closed_reason:
        assert time.monotonic() < deadline, f"agent {client.address} was never seen gone"
        await asyncio.sleep(0.05)


def test_an_agent_lost_after_connect_is_reached_again_before_llama_cpp_is_handed_its_worker(
    smollm2: Path, fresh_agents: LocalAgents
) -> None:
    """An agent that restarted after the desktop connected (its connection, worker and
    tunnel gone with it): the next plan reaches it again before the inference child is
    given its endpoint, and says so; ggml-rpc aborts a child on an endpoint that refuses
    ("Failed to connect to 127.0.0.1:PORT": the H100 host's curve, three times). An agent
    that stays gone is refused by name, and the child is not touched."""
    settings = LoadSettings(model=smollm2, n_ctx=512)
    back = fresh_agents.addresses[1]

    async def go() -> tuple[str, str, str]:
        session = ChatSession(fresh_agents.addresses)
        try:
            await session.connect(0)
            assert session.child.proc is not None
            child = session.child.proc.pid
            lost = session.clients[1]
            await asyncio.to_thread(fresh_agents.restart, 1)  # off the loop: heartbeats go on
            await _until_lost(lost)
            await session.plan(settings)
            result = await session.open_after_connect(settings)
            assert session.child.proc.pid == child  # the child was never aborted
            said = next(w for w in session.warnings if back in w and "again" in w)
            assert any(back in p.host and p.layers for p in result.placements), result
            text = ""
            async for frame in session.ask("Hi", max_tokens=4):
                if isinstance(frame, Done):
                    text = frame.content
            assert text
            # now for good: the plan is refused by name, before the child hears of it
            gone = session.clients[1]
            os.killpg(fresh_agents.procs[1].pid, signal.SIGKILL)
            await _until_lost(gone)
            with pytest.raises(RuntimeFailure) as refused:
                await session.plan(settings)
            assert session.child.proc.pid == child and session.child.proc.returncode is None
            return said, str(refused.value), type(refused.value).__name__
        finally:
            await session.close()

    said, message, kind = asyncio.run(go())
    assert back in message and "lost" in message, message
    assert kind == "AgentUnreachable", kind
    print(f"reconnected: {said}\nrefused: {message}")
