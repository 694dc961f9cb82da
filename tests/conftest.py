"""Shared fixtures: real agents, real models. Qt runs offscreen."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama

REPO = Path(__file__).resolve().parent.parent

# one throwaway desktop identity (and its pairings) for the whole run, inherited by every
# `corral` the tests start; the user's own pairings are never touched
_DESKTOP_DIR = tempfile.mkdtemp(prefix="corral-test-desktop-")
os.environ.setdefault("CORRAL_STATE_DIR", _DESKTOP_DIR)
atexit.register(shutil.rmtree, _DESKTOP_DIR, True)
# agents' default state, logs and config file, and the app's settings, apart from the user's
# too (the model cache, ~/.cache, is shared on purpose)
for _xdg in ("XDG_STATE_HOME", "XDG_CONFIG_HOME"):
    os.environ[_xdg] = os.path.join(_DESKTOP_DIR, _xdg.lower())
# the CPU-kernel self-test runs once per test run (a second or two), on this run's own cache:
# no verdict left by the user or an earlier run decides what the tests see
os.environ.setdefault("CORRAL_KERNELCHECK_DIR", os.path.join(_DESKTOP_DIR, "kernelcheck"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = default_model_path()
    if not path.exists():
        pytest.fail(f"the default model is missing at {path}: run `make models` (make test does)")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf", TinyLlama(n_layer=6))


@pytest.fixture(scope="module")
def two_agents() -> Iterator[LocalAgents]:
    with LocalAgents(2) as agents:
        yield agents


def corral(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the installed `corral` command line. One that runs past `timeout` is stopped
    with SIGABRT, so faulthandler prints where each of its threads was into the failure."""
    env = dict(kw.pop("env", None) or os.environ, PYTHONFAULTHANDLER="1")  # type: ignore[call-overload]
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.engine.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,  # type: ignore[call-overload]
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # what else was alive then (its inference child, agents, workers) and in what state
        table = subprocess.run(
            ["ps", "-eo", "pid,ppid,stat,etime,args"], capture_output=True, text=True
        ).stdout
        alive = "\n".join(line for line in table.splitlines() if "corral" in line)
        proc.send_signal(signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        said, _, stacks = err.partition("Fatal Python error")
        raise AssertionError(
            f"corral {' '.join(args[:2])} ran past {timeout:g} s.\nIts output:\n{out[-2000:]}"
            f"\nIts log before the abort:\n{said[-3000:]}\nIts stacks:\nFatal Python error"
            f"{stacks[:5000]}\ncorral processes at the timeout:\n{alive}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
