"""The desktop bundle recipe (PyInstaller, packaging/bundle/) builds a folder whose `corral`
starts and shows its window on a real X server (Xvfb), and runs the command line too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral

REPO = Path(__file__).resolve().parents[2]
TITLE = f"Corral {corral.__version__}"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        ["bash", str(REPO / "packaging" / "bundle" / "build.sh"), str(dist)],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    program = dist / "corral" / "corral"
    assert program.exists(), done.stdout[-2000:]
    return program


@pytest.fixture
def display() -> Iterator[str]:
    """A fresh Xvfb on a display number it picks itself; stopped afterwards."""
    if shutil.which("Xvfb") is None or shutil.which("xwininfo") is None:
        pytest.skip("needs Xvfb and xwininfo (packaging/system-deps.sh installs them)")
    read, write = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1440x900x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    try:
        with os.fdopen(read) as f:
            number = f.readline().strip()  # Xvfb writes it once it accepts clients
        assert number.isdigit(), "Xvfb did not start"
        yield f":{number}"
    finally:
        xvfb.terminate()
        xvfb.wait(timeout=30)


def _window(display: str) -> str:
    done = subprocess.run(
        ["xwininfo", "-name", TITLE],
        capture_output=True,
        text=True,
        env=dict(os.environ, DISPLAY=display),
        timeout=30,
    )
    return done.stdout if done.returncode == 0 else ""


def _private_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "PYTHONPATH")}
    env.update(
        CORRAL_STATE_DIR=str(tmp_path / "desktop"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        **extra,
    )
    return env


def test_the_bundle_starts_and_shows_its_window(bundle: Path, display: str, tmp_path: Path) -> None:
    app = subprocess.Popen(
        [str(bundle)],
        env=_private_env(tmp_path, DISPLAY=display),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120  # a safety stop, not a measurement
        info = ""
        while app.poll() is None and time.monotonic() < deadline:
            info = _window(display)
            if "IsViewable" in info:
                break
            time.sleep(0.25)
        assert app.poll() is None, f"the bundle exited ({app.returncode}): {app.communicate()[0]}"
        assert "Map State: IsViewable" in info, "no window titled " + TITLE
        width = int(info.split("Width:")[1].split()[0])
        height = int(info.split("Height:")[1].split()[0])
        assert width >= 640 and height >= 400
        # the app keeps its log in the platform's log dir ($XDG_STATE_HOME/corral/log)
        assert (tmp_path / "state" / "corral" / "log" / "corral.log").exists()
    finally:
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, 9)
            app.wait()


def test_the_bundle_runs_commands_and_its_own_children(bundle: Path, tmp_path: Path) -> None:
    env = _private_env(tmp_path)
    paired = subprocess.run(
        [str(bundle), "paired"], capture_output=True, text=True, env=env, timeout=120
    )
    assert paired.returncode == 0, paired.stderr
    assert "no paired agents" in paired.stdout
    # the doctor's llama.cpp check runs `sys.executable -m corral.engine.agent.worker
    # devices`: inside the bundle that is the bundle itself answering -m
    doctor = subprocess.run(
        [str(bundle), "doctor", "--json", "--wait", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert '"name": "llama.cpp build"' in doctor.stdout, doctor.stdout + doctor.stderr
    assert "could not run the device listing" not in doctor.stdout
    assert "Traceback" not in doctor.stderr
