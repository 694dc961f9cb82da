"""The desktop window opens (offscreen) and says what to do next."""

from __future__ import annotations

from pytestqt.qtbot import QtBot

from corral.gui.app import MainWindow


def test_main_window_shows(qtbot: QtBot) -> None:
    window = MainWindow()
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    assert window.windowTitle().startswith("Corral")
    assert "corral-agent" in window.status.text()
