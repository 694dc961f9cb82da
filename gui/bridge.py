"""Engine → GUI thread. The engine calls `post(fn, *args)` from its thread; the GUI thread runs
`fn(*args)` soon after.

Python objects never travel through a queued Qt signal (PySide6 crashed at interpreter exit
when they did, with a refcount error in its marshalling); they wait in a plain queue, and an
argument-less signal only wakes the GUI thread to drain it.
"""

from __future__ import annotations

import concurrent.futures
import queue
from collections.abc import Callable
from typing import Any, TypeVar

from PySide6.QtCore import QObject, Qt, Signal

T = TypeVar("T")


class Bridge(QObject):
    _wake = Signal()

    def __init__(self) -> None:
        super().__init__()
        self._pending: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._wake.connect(self._drain, Qt.ConnectionType.QueuedConnection)

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) on the GUI thread (callable from any thread)."""
        self._pending.put((fn, args))
        self._wake.emit()

    def _drain(self) -> None:
        while True:
            try:
                fn, args = self._pending.get_nowait()
            except queue.Empty:
                return
            fn(*args)

    def deliver(
        self,
        future: concurrent.futures.Future[T],
        on_ok: Callable[[T], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """When `future` (from the engine thread) completes, call one of the callbacks on the
        GUI thread: `on_ok` with its typed result, or `on_error` with what it raised. A
        future the window cancelled calls neither."""

        def done(f: concurrent.futures.Future[T]) -> None:
            if f.cancelled():
                return
            error = f.exception()
            if error is not None:
                self.post(on_error, error)
            else:
                self.post(on_ok, f.result())

        future.add_done_callback(done)
