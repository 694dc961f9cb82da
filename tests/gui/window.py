"""The window as the GUI tests open it: on these agents, without mDNS, shown offscreen and
closed (its engine thread, agents' sessions and leases with it) however the test ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from pytestqt.qtbot import QtBot

from corral.gui.app import MainWindow


@contextlib.contextmanager
def open_window(qtbot: QtBot, agents: Sequence[str] = ()) -> Iterator[MainWindow]:
    win = MainWindow(browse=False, agents=tuple(agents))
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    try:
        yield win
    finally:
        win.close()
