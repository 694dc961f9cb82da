"""The systemd units and the desktop entry are valid, as systemd and desktop-file-validate read
them, once filled in the way packaging/install-worker.sh fills them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # holds a real corral-agent: systemd checks ExecStart


def _render(template: str, folder: Path) -> Path:
    text = (REPO / "packaging" / "systemd" / template).read_text()
    assert "@BIN@" in text
    folder.mkdir()
    unit = folder / "corral-agent.service"
    unit.write_text(text.replace("@BIN@", str(BIN)))
    return unit


def _verify(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_system_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    assert (BIN / "corral-agent").exists()
    unit = _render("corral-agent.service", tmp_path / "system")
    done = _verify("verify", str(unit))
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stderr


def test_user_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    unit = _render("corral-agent.user.service", tmp_path / "user")
    runtime = tmp_path / "runtime"  # a user manager's runtime dir, as a login session has
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    done = _verify("--user", "verify", str(unit), env=env)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stderr


def test_verify_does_catch_a_broken_unit(tmp_path: Path) -> None:
    """The checks above mean something: a typo and a missing program are both reported."""
    unit = _render("corral-agent.service", tmp_path / "broken")
    unit.write_text(
        unit.read_text()
        .replace("Restart=on-failure", "Restrat=on-failure")
        .replace(str(BIN), "/nonexistent")
    )
    done = _verify("verify", str(unit))
    assert "Unknown key 'Restrat'" in done.stderr
    assert "/nonexistent/corral-agent is not executable" in done.stderr


def test_the_system_unit_reloads_with_sighup_and_keeps_state_in_systemd_dirs() -> None:
    text = (REPO / "packaging" / "systemd" / "corral-agent.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    for flag, folder in (
        ("--state-dir", "/var/lib/corral-agent"),  # StateDirectory=
        ("--log-dir", "/var/log/corral-agent"),  # LogsDirectory=
        ("--config", "/etc/corral/agent.toml"),  # ConfigurationDirectory=
    ):
        assert f"{flag} {folder}" in exec_start


def test_desktop_entry_validates_and_its_icon_exists() -> None:
    if shutil.which("desktop-file-validate") is None:
        pytest.skip("desktop-file-validate is not installed (apt-get install desktop-file-utils)")
    entry = REPO / "packaging" / "desktop" / "corral.desktop"
    done = subprocess.run(
        ["desktop-file-validate", str(entry)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout
    assert "Icon=corral" in entry.read_text()
    assert (REPO / "assets" / "corral.svg").read_text().startswith("<svg")
