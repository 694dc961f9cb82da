"""The agent's config file: parsed with the line and reason of every refusal, applied by a
real agent (shared devices, reserve, RPC threads, cache dir), overridden by flags, reloaded
on SIGHUP, and a bad reload changes nothing. Plus its JSON-lines log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.engine.agent.config import ConfigError, WorkerSettings, load_config, parse_config
from corral.engine.agent.supervisor import prune_cache
from corral.engine.localagents import LocalAgents
from corral.engine.procs import OMP_SPIN_DEFAULT, cgroup_cpu_limit, default_worker_threads
from corral.engine.protocol import Inventory
from corral.engine.runtime.agent_client import AgentClient
from tests.support.agents import inventory

FILE = Path("/etc/corral/agent.toml")


def _refusal(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, FILE)
    return caught.value


def test_a_full_file_is_read() -> None:
    config = parse_config(
        """
listen = "10.0.0.5:7400"
advertise = false
interfaces = ["eth0", "eth1"]
devices = ["CUDA0", "CUDA1"]
reserve_mib = { CUDA0 = 2048, default = 256 }
rpc_threads = 6
rpc_spin = 1000
cache_dir = "/var/cache/corral-agent"
cache_max_mib = 4096
state_dir = "/var/lib/corral-agent"
log_dir = "/var/log/corral-agent"
log_level = "debug"
""",
        FILE,
    )
    assert config.listen == ("10.0.0.5", 7400) and config.advertise is False
    assert config.interfaces == ("eth0", "eth1") and config.log_level == "DEBUG"
    w = config.worker
    assert w.devices == ("CUDA0", "CUDA1") and w.rpc_threads == 6 and w.rpc_spin == 1000
    assert w.reserve_bytes("CUDA0") == 2048 << 20 and w.reserve_bytes("CUDA1") == 256 << 20
    assert w.cache_dir == Path("/var/cache/corral-agent") and w.cache_max_mib == 4096
    assert w.shares("CUDA1") and not w.shares("CPU")


def test_nothing_set_is_the_defaults_and_flags_decide() -> None:
    config = parse_config("# all defaults\n", FILE)
    assert config.listen is None and config.state_dir is None
    assert config.worker == WorkerSettings()
    assert WorkerSettings().shares("anything")


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('listen = "0.0.0.0:7340"\nrpc_threads = "eight"\n', 2, "rpc_threads must be a whole"),
        ("\n\nrpc_thread = 4\n", 3, "unknown setting 'rpc_thread' (did you mean rpc_threads?)"),
        ("rpc_spin = 1e3\n", 1, "rpc_spin must be a whole number, 0 or more, not 1000.0"),
        ('listen = "nowhere"\n', 1, "'nowhere' is not HOST:PORT"),
        ("listen = 0.0.0.0:7340\n", 1, "not valid TOML"),
        ('devices = "CUDA0"\n', 1, "devices must be a list of names"),
        ('devices = ["CUDA 0"]\n', 1, "is not a ggml device name"),
        ("reserve_mib = { CUDA0 = -1 }\n", 1, "reserve_mib CUDA0: must be a whole number"),
        ('log_level = "LOUD"\n', 1, "log_level must be one of DEBUG, INFO, WARNING, ERROR"),
        ('advertise = "yes"\n', 1, "advertise must be true or false"),
        ('# c\n[reserve_mib]\nCUDA0 = "lots"\n', 2, "reserve_mib CUDA0: must be a whole"),
        ("cache = true\ncache = false\n", 2, "not valid TOML"),
    ],
)
def test_a_bad_file_is_refused_with_its_line_and_reason(text: str, line: int, reason: str) -> None:
    error = _refusal(text)
    assert error.line == line, str(error)
    assert reason in error.reason
    assert str(error).startswith(f"{FILE}:{line}: ")


def test_a_missing_file_is_fine_unless_named(tmp_path: Path) -> None:
    assert load_config(tmp_path / "none.toml", required=False).path is None
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "none.toml", required=True)


def test_the_cache_is_pruned_oldest_first(tmp_path: Path) -> None:
    for i in range(5):
        f = tmp_path / f"{i:02x}"
        f.write_bytes(b"x" * 1000)
        t = 1_700_000_000 + i
        os.utime(f, (t, t))
    assert prune_cache(tmp_path, 2500) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["03", "04"]


# ---------------------------------------------------------------- a real agent


def _until(read: Callable[[], Inventory], ok: Callable[[Inventory], bool]) -> Inventory:
    """Poll until the agent shows the state (the SIGHUP is handled on its own loop)."""
    deadline = time.monotonic() + 60  # a safety stop, not a measurement
    while True:
        inv = read()
        if ok(inv) or time.monotonic() > deadline:
            return inv
        time.sleep(0.1)


def _log_entry(folder: Path, match: Callable[[dict[str, object]], bool]) -> dict[str, object]:
    """The first JSON line of the agent's log that `match`es (polled: the agent writes it)."""
    deadline = time.monotonic() + 60  # a safety stop, not a measurement
    path = folder / "corral-agent.log"
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)  # every line is one JSON object
                if match(entry):
                    return dict(entry)
        time.sleep(0.1)
    raise AssertionError(f"no such entry in {path}")


def _cpu_free(inv: Inventory) -> int:
    return next(d.memory_free for d in inv.devices if d.name == "CPU")


@pytest.mark.slow
def test_an_agent_applies_the_file_flags_win_and_sighup_reloads(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    # the file names a port and a log dir; LocalAgents passes --listen :0 and --log-dir
    # (in its state dir): the flags win
    taken = 7
    config.write_text(
        f'listen = "127.0.0.1:{taken}"\n'
        'devices = ["CPU"]\n'
        "reserve_mib = 100000000\n"  # more than any host has: CPU shows 0 bytes free
        "rpc_threads = 3\n"
        f'cache_dir = "{tmp_path / "cache"}"\n'
        f'log_dir = "{tmp_path / "log"}"\n'
    )
    with LocalAgents(1, extra_args=("--config", str(config))) as agents:
        address = agents.addresses[0]
        assert not address.endswith(f":{taken}")
        inv = inventory(address)
        assert [d.name for d in inv.devices] == ["CPU"] and _cpu_free(inv) == 0

        async def start_worker() -> tuple[int, tuple[str, ...]]:
            client = AgentClient(address)
            await client.connect()
            try:
                state = await client.start_rpc()  # threads 0: the agent's rpc_threads
                return state.threads, state.devices
            finally:
                await client.stop_rpc()
                await client.close()

        assert asyncio.run(start_worker()) == (3, ("CPU",))
        assert (tmp_path / "cache").is_dir() and not (tmp_path / "log").exists()

        # a broken file on SIGHUP: refused with its line, the agent keeps its settings
        config.write_text('devices = ["CPU"]\nreserve_mib = "lots"\n')
        agents.procs[0].send_signal(signal.SIGHUP)
        log_dir = agents.state_dir(0) / "log"
        refused = _log_entry(log_dir, lambda e: "config not reloaded" in e["msg"])
        assert refused["level"] == "ERROR"
        assert f"{config}:2: reserve_mib must be MiB" in refused["msg"]
        assert _cpu_free(inventory(address)) == 0
        # a good file: the reserve goes, the CPU shows free memory again
        config.write_text('devices = ["CPU"]\nreserve_mib = 0\n')
        agents.procs[0].send_signal(signal.SIGHUP)
        inv = _until(lambda: inventory(address), lambda i: _cpu_free(i) > 0)
        assert _cpu_free(inv) > 0
        config.write_text('devices = ["CUDA7"]\n')  # a device this host lacks: nothing shared
        agents.procs[0].send_signal(signal.SIGHUP)
        inv = _until(lambda: inventory(address), lambda i: not i.devices)
        assert inv.devices == ()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("line", "env", "spins"),
    [
        ("", {}, str(OMP_SPIN_DEFAULT)),  # the default
        ("rpc_spin = 4321\n", {}, "4321"),  # the file's
        ("rpc_spin = 4321\n", {"GOMP_SPINCOUNT": "77"}, "4321"),  # the file's, over the env's
        ("", {"GOMP_SPINCOUNT": "77"}, "77"),  # the agent's environment, over the default
        ("", {"OMP_WAIT_POLICY": "ACTIVE"}, None),  # the user's policy: no count set
    ],
)
def test_the_worker_gets_the_spin_count_asked_for(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    line: str,
    env: dict[str, str],
    spins: str | None,
) -> None:
    """The RPC worker's OpenMP threads spin as rpc_spin says, else as the agent's own
    GOMP_SPINCOUNT / OMP_WAIT_POLICY says, else 30,000: read from the running worker."""
    config = tmp_path / "agent.toml"
    config.write_text('devices = ["CPU"]\n' + line)
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)  # the agent's environment is env alone
    with LocalAgents(1, extra_args=("--config", str(config)), env=env) as agents:

        async def worker_env() -> dict[str, str]:
            client = AgentClient(agents.addresses[0])
            await client.connect()
            try:
                state = await client.start_rpc()
                raw = Path(f"/proc/{state.pid}/environ").read_bytes()
                return dict(kv.split("=", 1) for kv in raw.decode().split("\0") if "=" in kv)
            finally:
                await client.stop_rpc()
                await client.close()

        got = asyncio.run(worker_env())
    if spins is None:
        assert "GOMP_SPINCOUNT" not in got and got["OMP_WAIT_POLICY"] == "ACTIVE"
    else:
        assert got["GOMP_SPINCOUNT"] == spins


def _agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.engine.agentcli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_an_agent_refuses_to_start_on_a_bad_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('listen = "127.0.0.1:0"\nrpc_threads = -2\n')
    done = _agent("--config", str(config), "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 2
    assert f"{config}:2: rpc_threads must be a whole number" in done.stderr
    assert "Traceback" not in done.stderr
    # the doctor reports it as a failed check instead
    doctor = _agent("--config", str(config), "doctor", "--json")
    checks = [json.loads(line) for line in doctor.stdout.splitlines()]
    found = next(c for c in checks if c.get("name") == "config")
    assert found["status"] == "fail" and f"{config}:2:" in found["detail"]


def test_the_log_file_rotates(tmp_path: Path) -> None:
    """Past its size cap the log moves to corral-agent.log.1 and so on, keeping four."""
    code = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from corral.engine import logfile\n"
        "logfile.MAX_BYTES = 2000\n"
        "logfile.setup_logging('corral-agent', 'INFO', Path(sys.argv[1]))\n"
        "for i in range(200):\n"
        "    logging.getLogger('corral.agent').info('line %d', i, extra={'n': i})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"corral-agent.log{s}" for s in ("", ".1", ".2", ".3", ".4")]
    last = json.loads((tmp_path / "corral-agent.log").read_text().splitlines()[-1])
    assert last["msg"] == "line 199" and last["n"] == 199 and last["level"] == "INFO"


def test_the_agent_logs_json_lines_at_its_log_level(tmp_path: Path) -> None:
    args = ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"), "--no-advertise"]
    args += ["--log-dir", str(tmp_path / "log"), "--log-level", "debug"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.engine.agentcli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        address = next(line for line in proc.stdout if " listening on " in line).split()[-1]
        started = _log_entry(tmp_path / "log", lambda e: e["msg"] == "started")
        assert started["level"] == "INFO" and started["listen"] == address
        assert {"ts", "logger", "pid", "agent_id", "config"} <= set(started)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    stopping = _log_entry(tmp_path / "log", lambda e: e["msg"] == "stopping")
    assert stopping["pid"] == proc.pid


def _pinned_agent(*extra: str) -> LocalAgents:
    """One agent started on one core (its CPU affinity, as taskset gives): the agent and
    its worker inherit it. Stop it with .stop()."""
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mine)})
    try:
        agents = LocalAgents(1, extra_args=extra)
        agents.__enter__()
    finally:
        os.sched_setaffinity(0, mine)
    return agents


async def _worker_threads(address: str) -> tuple[int, list[str], set[int]]:
    """The threads a started worker reports, its command line and its CPU affinity."""
    client = AgentClient(address)
    await client.connect()
    try:
        state = await client.start_rpc(threads=0)
        argv = Path(f"/proc/{state.pid}/cmdline").read_bytes().decode().split("\0")
        return state.threads, argv, os.sched_getaffinity(state.pid)
    finally:
        await client.stop_rpc()
        await client.close()


def test_a_worker_left_to_choose_runs_one_thread_per_usable_core() -> None:
    """A worker nobody gave a thread count runs on the cores its agent may use (its CPU
    affinity: taskset, a cpuset), not every core of the host: here an agent pinned to one
    core starts a 1-thread worker, and says so. Read from the running worker: its command
    line and the threads it reports."""
    agents = _pinned_agent()
    try:
        threads, argv, cores = asyncio.run(_worker_threads(agents.addresses[0]))
    finally:
        agents.stop()
    assert len(cores) == 1
    assert argv[argv.index("--threads") + 1] == "1", argv
    assert threads == 1


def test_rpc_threads_beyond_the_usable_cores_are_given_and_logged(tmp_path: Path) -> None:
    """rpc_threads is honoured even above the cores the agent may use, and the agent's log
    says what that costs (the doctor says it too: tests/test_doctor.py)."""
    config = tmp_path / "agent.toml"
    config.write_text("rpc_threads = 2\n")
    agents = _pinned_agent("--config", str(config))
    try:
        threads, argv, _ = asyncio.run(_worker_threads(agents.addresses[0]))
        log_dir = agents.state_dir(0) / "log"  # LocalAgents' --log-dir
        said = _log_entry(log_dir, lambda e: "may use 1 core:" in str(e["msg"]))
    finally:
        agents.stop()
    assert threads == 2 and argv[argv.index("--threads") + 1] == "2", argv
    assert said["level"] == "WARNING" and "2 threads (rpc_threads)" in str(said["msg"]), said


@pytest.mark.parametrize(
    ("own", "files", "cores"),
    [
        ("0::/a/b\n", {"/cpu.max": "max 100000", "/a/cpu.max": "150000 100000"}, 1.5),
        ("0::/a\n", {"/a/cpu.max": "max 100000\n"}, None),
        (
            "4:cpu,cpuacct:/docker/x\n3:memory:/docker/x\n",
            {
                "/cpu,cpuacct/docker/x/cpu.cfs_quota_us": "400000\n",
                "/cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
                "/cpu,cpuacct/docker/cpu.cfs_quota_us": "-1\n",
                "/cpu,cpuacct/docker/cpu.cfs_period_us": "100000\n",
            },
            4.0,
        ),
        ("0::/\n", {"/cpu.max": "garbage"}, None),
        ("", {}, None),
    ],
    ids=["v2-parent", "v2-none", "v1-docker", "v2-unreadable", "no-cgroup"],
)
def test_the_cgroup_cpu_limit_is_the_tightest_quota_on_the_way_up(
    own: str, files: dict[str, str], cores: float | None
) -> None:
    assert cgroup_cpu_limit(own, files.get) == cores


def test_a_worker_leaves_two_cores_on_a_host_of_eight_or_more() -> None:
    assert [default_worker_threads(n) for n in (1, 2, 4, 7, 8, 16, 64)] == [1, 2, 4, 7, 6, 14, 62]
