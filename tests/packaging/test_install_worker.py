"""The worker install script, run for real into a clean virtual environment: corral[agent]
without Qt, llama-cpp-python with RPC, its doctor report, then `corral-agent` in the
foreground (no systemctl) printing a pairing code that a desktop pairs with."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_install_script_brings_up_a_pairable_agent(tmp_path: Path) -> None:
    if shutil.which("cmake") is None:
        pytest.skip("the install script needs cmake (it would build llama.cpp)")
    prefix = tmp_path / "worker"
    state = tmp_path / "state"
    env = dict(
        os.environ,
        CORRAL_STATE_DIR=str(tmp_path / "desktop"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),  # where the script writes agent.toml
    )
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    # a clean PATH: nothing of the test's own environment leaks into the worker's
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if Path(sys.executable).parent != Path(p)
    )
    script = [
        "bash",
        str(REPO / "packaging" / "install-worker.sh"),
        "--prefix",
        str(prefix),
        "--backend",
        "cpu",  # this machine's; the wheel cache already holds that build
        "--service",
        "none",
        "--start",
        "--",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(state),
        "--log-dir",
        str(tmp_path / "log"),
        "--no-advertise",
    ]
    proc = subprocess.Popen(
        script,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # the agent and its children, to end together
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        address = code = ""
        deadline = time.monotonic() + 1200  # a safety stop: pip may fetch from the registry
        for line in proc.stdout:
            seen.append(line.rstrip())
            if m := re.search(r"listening on (\S+)$", line.strip()):
                address = m.group(1)
            if m := re.match(r"pairing code: (\d{4}-\d{4})", line):
                code = m.group(1)
                break
            assert time.monotonic() < deadline, "\n".join(seen[-30:])
        transcript = "\n".join(seen)
        assert address and code, transcript[-4000:]
        # the install checked itself before starting the agent
        assert "corral-agent doctor" in transcript
        assert re.search(r"PASS\s+RPC support", transcript), transcript[-4000:]

        venv = prefix / "venv"
        no_qt = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import PySide6"], capture_output=True
        )
        assert no_qt.returncode != 0, "corral[agent] pulled in Qt"
        listed = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        names = {p["name"].lower() for p in json.loads(listed.stdout)}
        assert "corral" in names and "llama_cpp_python" in {n.replace("-", "_") for n in names}
        assert not {n for n in names if n.startswith(("pyside6", "shiboken6"))}

        # a desktop (this test's own identity) pairs with the code and sees the agent
        desktop = [sys.executable, "-m", "corral.engine.cli"]
        paired = subprocess.run(
            [*desktop, "pair", address, "--code", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert paired.returncode == 0, paired.stderr
        agents = subprocess.run(
            [*desktop, "agents", "--agent", address, "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert agents.returncode == 0, agents.stderr
        hello = json.loads(agents.stdout.splitlines()[-1])["hello"]
        assert hello["llama_version"] == "0.3.36" and hello["rpc_proto"]
        config = tmp_path / "config" / "corral-agent" / "agent.toml"
        assert 'listen = "0.0.0.0:7340"' in config.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
