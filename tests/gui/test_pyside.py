"""The Qt binding itself: signals into Python slots must not leak or drop references.

PySide6 6.12.0 dropped a reference to None on every signal delivered to a Python slot; the
desktop app (every token is a signal) aborted with "none_dealloc" after a few thousand.
pyproject excludes that version; this catches the next one that does it.
"""

from __future__ import annotations

import sys
import time

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication


def test_signals_into_python_slots_keep_refcounts(qapp: QApplication) -> None:
    calls = [0]

    def slot() -> None:
        calls[0] += 1

    timer = QTimer()
    timer.setInterval(0)
    timer.timeout.connect(slot)
    before = sys.getrefcount(None)
    timer.start()
    deadline = time.monotonic() + 10
    while calls[0] < 2000 and time.monotonic() < deadline:
        qapp.processEvents()
    timer.stop()
    assert calls[0] >= 2000
    assert abs(sys.getrefcount(None) - before) < 100, "the Qt binding drops references"
