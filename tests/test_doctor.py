"""`corral doctor` and `corral-agent doctor` find real problems and say how to fix them: a
llama.cpp build without RPC, an agent of another version, the agent's port taken by another
program, mDNS blocked between desktop and agent. Real agents, real pairing, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.engine.localagents import agent_command
from corral.engine.security.pairing import new_code
from tests.support.builds import corral_of_version, with_own_cxx_runtime, without_rpc
from tests.support.netns import Lan, LanUnavailable
from tests.support.watch import start_agent as start_lan_agent

pytestmark = pytest.mark.slow


@pytest.fixture
def desktop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A desktop identity of this test's own: its doctor sees only the agents paired here."""
    folder = tmp_path / "desktop"
    monkeypatch.setenv("CORRAL_STATE_DIR", str(folder))
    return folder


def _checks(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["type"] == "summary", done.stdout + done.stderr
    return {c["name"]: c for c in lines if c["type"] == "check"}


def corral_doctor(*args: str, env: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    done = subprocess.run(
        [sys.executable, "-m", "corral.engine.cli", "doctor", "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "Traceback" not in done.stderr, done.stderr
    checks = _checks(done)
    assert done.returncode == (1 if any(c["status"] == "fail" for c in checks.values()) else 0)
    return checks


def agent_doctor(*args: str, env: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    done = subprocess.run(
        [sys.executable, "-m", "corral.engine.agentcli", *args, "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return _checks(done)


class Agent:
    """A corral-agent process on loopback, paired with the test's desktop through `corral pair`."""

    def __init__(self, state: Path, listen: str = "127.0.0.1:0", env: dict[str, str] | None = None):
        code = new_code()
        self.proc = subprocess.Popen(
            agent_command(listen, state, "--no-advertise", "--pairing-code", code),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = ""
        for line in self.proc.stdout:
            if " listening on " in line:
                break
        assert " listening on " in line, "the agent did not start"
        self.address = line.rsplit(" ", 1)[1].strip()
        paired = subprocess.run(
            [sys.executable, "-m", "corral.engine.cli", "pair", self.address, "--code", code],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert paired.returncode == 0, paired.stderr

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its worker and probes too
        except ProcessLookupError:
            pass
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def _agent(checks: dict[str, dict[str, str]]) -> dict[str, str]:
    """The one agent's reachability check, `agent HOSTNAME` (beside `... version` and so on)."""
    found = [c for name, c in checks.items() if name.startswith("agent ") and name.count(" ") == 1]
    assert len(found) == 1, list(checks)
    return found[0]


def test_a_healthy_desktop_and_agent_pass(
    desktop: Path, tmp_path: Path, agents: list[Agent]
) -> None:
    agents.append(Agent(tmp_path / "agent"))
    checks = corral_doctor("--wait", "0")
    for name in ("llama.cpp build", "RPC support", "backend devices", "NVML"):
        assert checks[name]["status"] == "pass", checks[name]
    agent = _agent(checks)
    assert agent["status"] == "pass" and agents[0].address in agent["detail"]
    version = [c for n, c in checks.items() if n.endswith(" version")]
    assert version and version[0]["status"] == "pass"
    assert checks["tunnel"]["status"] == "pass", checks["tunnel"]
    assert not [n for n in checks if n.endswith(" tunnel")]  # the agent has the relay too


def test_hosts_without_the_native_relay_are_warned(
    desktop: Path, tmp_path: Path, agents: list[Agent]
) -> None:
    off = dict(os.environ, CORRAL_RELAY="off")
    agents.append(Agent(tmp_path / "agent", env=off))
    checks = corral_doctor("--wait", "0", env=off)
    assert checks["tunnel"]["status"] == "warn" and "CORRAL_RELAY" in checks["tunnel"]["fix"]
    theirs = [c for n, c in checks.items() if n.endswith(" tunnel") and n != "tunnel"]
    assert len(theirs) == 1 and theirs[0]["status"] == "warn"
    assert "Python TLS pumps" in theirs[0]["detail"] and "libssl-dev" in theirs[0]["fix"]
    worker = agent_doctor("--state-dir", str(tmp_path / "agent2"), env=off)
    assert worker["tunnel"]["status"] == "warn"


def test_the_agent_doctor_says_how_its_worker_threads_spin(tmp_path: Path) -> None:
    """This llama.cpp is built with OpenMP (`make install`): the agent's doctor names the spin
    count its worker gets and where it comes from; PASSIVE from the environment is warned."""
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    worker = agent_doctor("--state-dir", str(tmp_path / "a"), env=base)
    assert worker["CPU threads"]["status"] == "pass"
    assert "spin 30000 times before they sleep (the default)" in worker["CPU threads"]["detail"]
    config = tmp_path / "agent.toml"
    config.write_text("rpc_spin = 500\n")
    worker = agent_doctor("--config", str(config), "--state-dir", str(tmp_path / "b"), env=base)
    assert "spin 500 times before they sleep (rpc_spin)" in worker["CPU threads"]["detail"]
    passive = dict(base, OMP_WAIT_POLICY="passive")
    worker = agent_doctor("--state-dir", str(tmp_path / "c"), env=passive)
    assert worker["CPU threads"]["status"] == "warn"
    assert "rpc_spin" in worker["CPU threads"]["fix"]


def test_the_agent_doctor_says_how_many_threads_its_worker_runs(tmp_path: Path) -> None:
    """The worker's thread count and what it comes from; an rpc_threads above the cores the
    agent may use (here: one, by its CPU affinity) is warned, with the count to set."""
    worker = agent_doctor("--state-dir", str(tmp_path / "a"))
    cores = len(os.sched_getaffinity(0))
    assert worker["worker threads"]["status"] == "pass"
    assert f"{cores} usable core" in worker["worker threads"]["detail"]
    config = tmp_path / "agent.toml"
    config.write_text("rpc_threads = 2\n")
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mine)})  # the doctor inherits it
    try:
        worker = agent_doctor("--config", str(config), "--state-dir", str(tmp_path / "b"))
    finally:
        os.sched_setaffinity(0, mine)
    check = worker["worker threads"]
    assert check["status"] == "warn", check
    assert "rpc_threads = 2" in check["detail"] and "may use 1 usable core of" in check["detail"]
    assert "set rpc_threads to 1 or less" in check["fix"], check


def test_no_rpc_support_in_the_build(desktop: Path, tmp_path: Path) -> None:
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(without_rpc(tmp_path / "lib")))
    checks = corral_doctor("--wait", "0", env=env)
    rpc = checks["RPC support"]
    assert rpc["status"] == "fail"
    assert "no RPC backend" in rpc["detail"] and "install_llama.py" in rpc["fix"]
    assert checks["llama.cpp build"]["status"] == "pass"  # it loads; it just lacks RPC
    worker = agent_doctor("--state-dir", str(tmp_path / "agent"), env=env)
    assert worker["RPC support"]["status"] == "fail"


def test_a_build_whose_libraries_carry_their_own_cxx_runtime_fails(
    desktop: Path, tmp_path: Path
) -> None:
    """A toolchain that links libstdc++ statically into each library (an H200 image's
    /opt/gcc): the doctor names the library and the rebuild, before a load crashes."""
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(with_own_cxx_runtime(tmp_path / "lib")))
    checks = corral_doctor("--wait", "0", env=env)
    runtime = checks["C++ runtime"]
    assert runtime["status"] == "fail", runtime
    assert "libggml-rpc.so" in runtime["detail"] and "CXX=/usr/bin/g++" in runtime["fix"]
    assert "C++ runtime" not in corral_doctor("--wait", "0")  # the installed build is fine


def test_an_agent_of_another_version(desktop: Path, tmp_path: Path, agents: list[Agent]) -> None:
    other = corral_of_version(tmp_path / "other-install", "0.0.9")
    env = dict(os.environ, PYTHONPATH=str(other))
    agents.append(Agent(tmp_path / "agent", env=env))
    checks = corral_doctor("--wait", "0")
    version = [c for n, c in checks.items() if n.endswith(" version")]
    assert len(version) == 1 and version[0]["status"] == "fail"
    assert "Corral 0.0.9" in version[0]["detail"]
    assert corral.__version__ in version[0]["detail"]
    assert "install Corral" in version[0]["fix"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_agents_port_taken_by_another_program(
    desktop: Path, tmp_path: Path, agents: list[Agent]
) -> None:
    port = _free_port()
    agent = Agent(tmp_path / "agent", listen=f"127.0.0.1:{port}")
    agents.append(agent)
    agent.stop()  # the agent goes, and another program takes its port
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        checks = corral_doctor("--wait", "0")
        found = _agent(checks)
        assert found["status"] == "fail"
        assert "does not answer as a Corral agent" in found["detail"]
        assert "in use by another program" in found["detail"]
        assert f"pid {os.getpid()}" in found["detail"]  # this test holds it
        assert "--listen" in found["fix"]
        # and on the worker, the agent's own doctor says the same before it tries to start
        worker = agent_doctor(
            "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "agent")
        )
        assert worker["agent port"]["status"] == "fail"
        assert f"port {port} is in use by" in worker["agent port"]["detail"]


@pytest.fixture
def lan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Lan]:
    monkeypatch.setenv("CORRAL_STATE_DIR", str(tmp_path / "desktop"))
    try:
        with Lan(2) as built:
            yield built
    except LanUnavailable as exc:
        pytest.skip(str(exc))


def _doctor_in(lan: Lan, i: int) -> dict[str, dict[str, str]]:
    doctor = [sys.executable, "-m", "corral.engine.cli", "doctor", "--json", "--wait", "5"]
    done = subprocess.run(
        ["ip", "netns", "exec", lan.ns(i), *doctor],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return _checks(done)


def _multicast_to(lan: Lan, i: int, on: bool) -> None:
    """Whether the LAN's switch forwards multicast to host i: off is what a switch or Wi-Fi
    access point with multicast filtering does; unicast and broadcast still pass."""
    port = f"{lan.prefix}p{i}"[:15]
    flood = ["mcast_flood", "on" if on else "off"]
    subprocess.run(
        ["ip", "-n", lan.bridge_ns, "link", "set", port, "type", "bridge_slave", *flood],
        check=True,
        capture_output=True,
        text=True,
    )


def test_mdns_blocked_between_desktop_and_agent(lan: Lan) -> None:
    agent = start_lan_agent(lan, 1, desktop=2)  # announces itself; paired from host 2
    try:
        heard = _doctor_in(lan, 2)
        assert heard["mDNS"]["status"] == "pass", heard["mDNS"]
        for i in (1, 2):
            _multicast_to(lan, i, on=False)
        blocked = _doctor_in(lan, 2)
        assert _agent(blocked)["status"] == "pass"  # still reachable
        mdns = blocked["mDNS"]
        assert mdns["status"] == "fail"
        assert "not heard on mDNS" in mdns["detail"] and "5353" in mdns["fix"]
    finally:
        agent.terminate()
        agent.wait(timeout=30)
