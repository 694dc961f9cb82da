"""The desktop window against real local agents (offscreen): hosts, load, chat, KV, crash."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytestqt.qtbot import QtBot

from corral.engine.runtime.localagents import LocalAgents
from corral.gui.app import MainWindow


@pytest.fixture()
def window(qtbot: QtBot) -> Iterator[MainWindow]:
    with LocalAgents(2) as agents:
        win = MainWindow(browse=False, agents=tuple(agents.addresses))
        win.agents = agents  # type: ignore[attr-defined]
        qtbot.addWidget(win)
        win.show()
        qtbot.waitExposed(win)
        try:
            yield win
        finally:
            win.close()


def test_hosts_load_chat_kv_and_a_killed_agent(
    window: MainWindow, qtbot: QtBot, smollm2: Path
) -> None:
    assert window.windowTitle().startswith("Corral")
    qtbot.waitUntil(lambda: len(window.hosts_model.online_addresses()) == 2, timeout=20000)
    assert window.hosts_model.rowCount() == 2
    # live memory from each host's inventory (this machine has no NVIDIA GPU)
    qtbot.waitUntil(lambda: all(h.inventory for h in window.hosts_model.hosts), timeout=20000)
    model = window.hosts_model
    assert model.data(model.index(0, 4)).startswith("CPU only; RAM")
    assert model.data(model.index(0, 3)) == "none"

    window.model_edit.setText(str(smollm2))
    window.load_button.click()
    qtbot.waitUntil(window.send_button.isEnabled, timeout=60000)
    assert "RPC0" in window.plan_text.toPlainText() and "RPC1" in window.plan_text.toPlainText()

    window.input.setText("Say hello.")
    window.send_button.click()
    qtbot.waitUntil(lambda: "tok/s" in window.status.text(), timeout=60000)
    reply = window.transcript.toPlainText().split("assistant: ", 1)[1]
    assert reply.strip()
    assert window.kv_bar.value() > 0

    victim = window.agents.addresses[1]  # type: ignore[attr-defined]
    os.kill(window.agents.procs[1].pid, signal.SIGKILL)  # type: ignore[attr-defined]
    qtbot.waitUntil(
        lambda: any(h.status == "offline" for h in window.hosts_model.hosts), timeout=20000
    )
    window.input.setText("Again?")
    window.send_button.click()
    qtbot.waitUntil(lambda: victim in window.banner.text(), timeout=30000)
    assert "load again" in window.banner.text()
