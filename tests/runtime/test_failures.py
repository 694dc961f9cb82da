"""What Corral does when workers die, hang or cannot be reached: clear errors, no aborts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.engine.localagents import LocalAgents
from corral.engine.runtime.agent_client import AgentClient
from tests.conftest import corral
from tests.support.agents import inventory, start_long_chat


@pytest.fixture()
def fresh_agents() -> Iterator[LocalAgents]:
    with LocalAgents(2) as agents:
        yield agents


def test_kill_9_of_a_worker_mid_generation(smollm2: Path, fresh_agents: LocalAgents) -> None:
    victim = fresh_agents.addresses[0]
    proc = start_long_chat(smollm2, fresh_agents.addresses)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # generation is under way once a token arrives
        assert json.loads(first)["type"] == "token", first + (
            proc.stderr.read() if proc.stderr else ""
        )
        pid = inventory(victim).worker.pid
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)  # a hang fails here instead of blocking CI
        exited_after = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["type"] == "error"
    assert victim in last["message"] and "killed by SIGKILL" in last["message"], last["message"]
    print(f"chat exited {exited_after:.2f} s after kill -9 of the worker")  # bench/ measures this

    # the agent saw the crash and brought the worker back
    deadline = time.monotonic() + 30
    while True:
        inv = inventory(victim)
        if inv.worker.state == "running" and inv.worker.restarts >= 1:
            break
        assert time.monotonic() < deadline, inv.worker
        time.sleep(0.2)
    assert inv.worker.last_exit == "killed by SIGKILL"
    assert inv.worker.pid != pid

    # and the restarted worker serves a new session
    again = corral(
        "chat", str(smollm2), "--agent", victim, "--prompt", "Hi", "--max-tokens", "4", "--json"
    )
    assert again.returncode == 0, again.stdout + again.stderr


def test_hung_worker_is_caught_before_llama_cpp_connects(
    smollm2: Path, fresh_agents: LocalAgents
) -> None:
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
        os.kill(pid, signal.SIGCONT)
    assert done.returncode == 1
    message = json.loads(done.stdout.strip().splitlines()[-1])["message"]
    assert address in message and "did not answer HELLO" in message, message
    assert "Traceback" not in done.stderr and "SIGABRT" not in message


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
    said = "did not stop within 15 s" if presses == 1 else "a second cancel killed"
    assert said in last["message"], last
    # its agent, asked after the kill, names the stopped worker
    assert "is stopped by a signal" in last["message"] and stuck in last["message"], last
    assert "Traceback" not in err
    print(f"{presses} Ctrl-C: the chat ended {stopped_after:.1f} s after the first")
